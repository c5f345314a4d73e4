//! The page allocator of the paged KV cache: fixed-size pages handed out from a free list,
//! shared by reference count (beams of one prompt share its pages), copied on write.
//!
//! The allocator only does the bookkeeping; the page contents live in the device's
//! `k_cache, v_cache: [num_pages, page_size, Hkv, D]` tensors and the caller performs the
//! copies that [`PagePool::reserve`] asks for. Every operation either succeeds completely or
//! changes nothing, so running out of pages never leaves a sequence half-extended: the engine
//! can preempt a request (release its pages, recompute it later) or refuse it.

use crate::error::{Error, Result};
pub use crate::lm::paged::PageCopy;

/// The pages of one sequence, in token order, and how many tokens they hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeqPages {
    pages: Vec<u32>,
    len: usize,
}

impl SeqPages {
    /// The page numbers (the sequence's row of the block table).
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }
    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A pool of `num_pages` pages of `page_size` tokens.
#[derive(Debug)]
pub struct PagePool {
    page_size: usize,
    /// Reference count per page; 0 = free.
    refs: Vec<u32>,
    /// Free pages; the next allocation pops from the end (lowest numbers first on a new pool).
    free: Vec<u32>,
}

impl PagePool {
    /// A pool of `num_pages` free pages of `page_size` tokens (a power of two).
    pub fn new(num_pages: usize, page_size: usize) -> Result<PagePool> {
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Error::index(
                "page_size",
                format!("{page_size} is not a power of two (16 is the usual choice)"),
            ));
        }
        if num_pages == 0 || num_pages > i32::MAX as usize {
            return Err(Error::index(
                "num_pages",
                format!("{num_pages}: expected 1..={}", i32::MAX),
            ));
        }
        Ok(PagePool {
            page_size,
            refs: vec![0; num_pages],
            free: (0..num_pages as u32).rev().collect(),
        })
    }

    /// Tokens a page holds.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.refs.len()
    }
    /// Pages not held by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Pages held by at least one sequence.
    pub fn used_pages(&self) -> usize {
        self.num_pages() - self.free_pages()
    }
    /// Sequences holding page `page` (0 = free).
    pub fn ref_count(&self, page: u32) -> u32 {
        self.refs[page as usize]
    }
    /// Pages needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Pages that [`reserve`](Self::reserve) would take from the free list to grow `seq` to
    /// `new_len` tokens (its own new pages plus a private copy of a shared partial last page).
    pub fn pages_needed(&self, seq: &SeqPages, new_len: usize) -> usize {
        if new_len <= seq.len {
            return 0;
        }
        let grow = self.pages_for(new_len) - seq.pages.len();
        grow + usize::from(self.cow_page(seq).is_some())
    }

    /// The index (in `seq.pages`) of a shared, partially filled last page that the next write
    /// would land in: it must be copied first.
    fn cow_page(&self, seq: &SeqPages) -> Option<usize> {
        let last = seq.pages.len().checked_sub(1)?;
        let partial = seq.len % self.page_size != 0;
        (partial && self.refs[seq.pages[last] as usize] > 1).then_some(last)
    }

    /// Makes room for `seq` to hold `new_len` tokens (rows `seq.len()..new_len` become
    /// writable) and records the new length. Returns the copy to perform first when the page
    /// the new rows start in was shared. On too few free pages nothing changes and the error
    /// says how many were needed.
    pub fn reserve(&mut self, seq: &mut SeqPages, new_len: usize) -> Result<Option<PageCopy>> {
        if new_len <= seq.len {
            return Ok(None);
        }
        let needed = self.pages_needed(seq, new_len);
        if needed > self.free.len() {
            return Err(Error::OutOfPages {
                needed,
                free: self.free.len(),
                total: self.num_pages(),
            });
        }
        let mut copy = None;
        if let Some(last) = self.cow_page(seq) {
            let src = seq.pages[last];
            let dst = self.take();
            self.refs[src as usize] -= 1;
            seq.pages[last] = dst;
            copy = Some(PageCopy {
                src,
                dst,
                rows: seq.len % self.page_size,
            });
        }
        while seq.pages.len() < self.pages_for(new_len) {
            let p = self.take();
            seq.pages.push(p);
        }
        seq.len = new_len;
        Ok(copy)
    }

    /// A second sequence sharing every page of `seq` (a beam forked from its parent); its next
    /// write into the shared partial page copies it first.
    pub fn fork(&mut self, seq: &SeqPages) -> SeqPages {
        for &p in &seq.pages {
            self.refs[p as usize] += 1;
        }
        SeqPages {
            pages: seq.pages.clone(),
            len: seq.len,
        }
    }

    /// Gives back `seq`'s pages; a page returns to the free list when no sequence holds it.
    pub fn release(&mut self, seq: SeqPages) {
        // Released in reverse so that a sequence freed and re-admitted gets its pages back in
        // the same order (deterministic placement, easier to debug).
        for &p in seq.pages.iter().rev() {
            let r = &mut self.refs[p as usize];
            debug_assert!(*r > 0, "page {p} released more often than held");
            *r -= 1;
            if *r == 0 {
                self.free.push(p);
            }
        }
    }

    /// Shortens `seq` to `new_len` tokens, giving back the pages past it.
    pub fn truncate(&mut self, seq: &mut SeqPages, new_len: usize) {
        if new_len >= seq.len {
            return;
        }
        let keep = self.pages_for(new_len);
        let tail = SeqPages {
            pages: seq.pages.split_off(keep),
            len: 0,
        };
        self.release(tail);
        seq.len = new_len;
    }

    fn take(&mut self) -> u32 {
        // Callers check the free count first; an empty list here is a bookkeeping bug.
        let p = self.free.pop().expect("free page counted before taking");
        self.refs[p as usize] = 1;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every page's count equals the number of sequences holding it, and the free list holds
    /// exactly the pages nobody holds, once each.
    fn check_invariants(pool: &PagePool, seqs: &[&SeqPages]) {
        let mut held = vec![0u32; pool.num_pages()];
        for s in seqs {
            assert_eq!(s.pages.len(), pool.pages_for(s.len));
            for &p in &s.pages {
                held[p as usize] += 1;
            }
        }
        assert_eq!(held, pool.refs);
        let mut free = pool.free.clone();
        free.sort_unstable();
        let expect: Vec<u32> = (0..pool.num_pages() as u32)
            .filter(|&p| held[p as usize] == 0)
            .collect();
        assert_eq!(free, expect);
    }

    #[test]
    fn bad_pool_sizes_are_errors() {
        assert!(PagePool::new(8, 12)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        assert!(PagePool::new(0, 16).is_err());
    }

    #[test]
    fn full_freed_reused() {
        let mut pool = PagePool::new(4, 16).unwrap();
        let mut a = SeqPages::default();
        assert_eq!(pool.reserve(&mut a, 33).unwrap(), None);
        assert_eq!(a.pages(), &[0, 1, 2]);
        let mut b = SeqPages::default();
        let err = pool.reserve(&mut b, 17).unwrap_err();
        assert!(
            err.to_string().contains("2 pages needed, 1 free of 4"),
            "{err}"
        );
        assert!(
            b.is_empty() && b.pages().is_empty(),
            "a failed reserve changes nothing"
        );
        pool.reserve(&mut b, 16).unwrap();
        assert_eq!(pool.free_pages(), 0);
        assert!(pool.reserve(&mut a, 49).is_err());
        assert_eq!(a.len(), 33);
        check_invariants(&pool, &[&a, &b]);
        pool.release(a);
        assert_eq!(pool.free_pages(), 3);
        let mut c = SeqPages::default();
        pool.reserve(&mut c, 48).unwrap();
        assert_eq!(c.pages(), &[0, 1, 2], "freed pages come back in order");
        check_invariants(&pool, &[&b, &c]);
    }

    #[test]
    fn fork_copies_the_shared_partial_page_on_write() {
        let mut pool = PagePool::new(8, 4).unwrap();
        let mut parent = SeqPages::default();
        pool.reserve(&mut parent, 6).unwrap(); // pages 0 (full), 1 (2 rows)
        let mut child = pool.fork(&parent);
        assert_eq!(pool.ref_count(0), 2);
        assert_eq!(pool.pages_needed(&child, 7), 1);
        let copy = pool.reserve(&mut child, 7).unwrap();
        assert_eq!(
            copy,
            Some(PageCopy {
                src: 1,
                dst: 2,
                rows: 2
            })
        );
        assert_eq!(child.pages(), &[0, 2]);
        // The parent is now the only holder of page 1: it writes in place.
        assert_eq!(pool.reserve(&mut parent, 7).unwrap(), None);
        check_invariants(&pool, &[&parent, &child]);
        // A shared *full* page needs no copy: new rows go to a new page.
        let mut p2 = SeqPages::default();
        pool.reserve(&mut p2, 4).unwrap();
        let mut c2 = pool.fork(&p2);
        assert_eq!(pool.reserve(&mut c2, 5).unwrap(), None);
        check_invariants(&pool, &[&parent, &child, &p2, &c2]);
        for s in [parent, child, p2, c2] {
            pool.release(s);
        }
        assert_eq!(pool.free_pages(), 8);
    }

    #[test]
    fn out_of_pages_during_copy_on_write_changes_nothing() {
        let mut pool = PagePool::new(2, 4).unwrap();
        let mut a = SeqPages::default();
        pool.reserve(&mut a, 2).unwrap();
        let mut b = pool.fork(&a);
        let mut c = SeqPages::default();
        pool.reserve(&mut c, 4).unwrap(); // the last free page
        assert!(pool.reserve(&mut b, 3).is_err());
        assert_eq!(b.pages(), a.pages());
        assert_eq!(pool.ref_count(a.pages()[0]), 2);
        check_invariants(&pool, &[&a, &b, &c]);
    }

    #[test]
    fn truncate_gives_back_the_tail() {
        let mut pool = PagePool::new(8, 4).unwrap();
        let mut a = SeqPages::default();
        pool.reserve(&mut a, 13).unwrap();
        pool.truncate(&mut a, 5);
        assert_eq!((a.len(), a.pages().len(), pool.free_pages()), (5, 2, 6));
        check_invariants(&pool, &[&a]);
    }

    /// Random admissions, forks, growth and releases keep the counts exact and never lose or
    /// double-hand a page.
    #[test]
    fn random_workload_keeps_the_books() {
        let mut rng = Rng::new(0x9a6e5);
        let mut pool = PagePool::new(64, 8).unwrap();
        let mut seqs: Vec<SeqPages> = Vec::new();
        for _ in 0..5000 {
            match rng.below(4) {
                0 => {
                    let mut s = SeqPages::default();
                    let n = 1 + rng.below(40) as usize;
                    if pool.reserve(&mut s, n).is_ok() {
                        seqs.push(s);
                    }
                }
                1 if !seqs.is_empty() => {
                    let i = rng.below(seqs.len() as u64) as usize;
                    let f = pool.fork(&seqs[i]);
                    seqs.push(f);
                }
                2 if !seqs.is_empty() => {
                    let i = rng.below(seqs.len() as u64) as usize;
                    let before = seqs[i].pages.clone();
                    let n = seqs[i].len + 1 + rng.below(10) as usize;
                    let free = pool.free_pages();
                    match pool.reserve(&mut seqs[i], n) {
                        Ok(Some(c)) => assert_eq!(c.src, before[before.len() - 1]),
                        Ok(None) => {}
                        Err(_) => {
                            assert_eq!(seqs[i].pages, before);
                            assert_eq!(pool.free_pages(), free);
                        }
                    }
                }
                _ if !seqs.is_empty() => {
                    let i = rng.below(seqs.len() as u64) as usize;
                    let s = seqs.swap_remove(i);
                    pool.release(s);
                }
                _ => {}
            }
            let refs: Vec<&SeqPages> = seqs.iter().collect();
            check_invariants(&pool, &refs);
        }
        for s in seqs {
            pool.release(s);
        }
        assert_eq!(pool.free_pages(), 64);
    }
}
