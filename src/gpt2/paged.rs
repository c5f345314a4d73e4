//! GPT-2 over the engine's paged K/V cache: one model step for a batch of sequences that
//! each feed their uncached tokens (a prompt, or one token), with every sequence's own
//! adapter slot (or none) in the prefix table.
//!
//! Sequences feeding the same number of tokens run as one `[B, t]` pass: the new keys and
//! values go into their pages first, then each sequence's keys are gathered from its pages
//! and attention runs over `[its prefix ; its keys]` with the per-sequence prefix index and
//! key lengths of the attention contract.
//!
//! Adapters of different lengths share the table (`P` rows a slot, `p ≤ P` valid): a
//! sequence's real tokens sit at positions `p ..` after its own adapter's `p`; the decode
//! kernel masks each slot's rows past its length, and a prefill pass runs one attention call
//! per distinct length among its sequences, over the table narrowed to that length.

use super::model::BlockMlpBufs;
use super::Gpt2;
use crate::attn::paged::PagedAttnArgs;
use crate::attn::{AttnFwdArgs, AttnFwdOut, Meta};
use crate::device::{Backend, MatmulOpts};
use crate::error::{Error, Result};
use crate::lm::paged::{PagedKv, PagedSeq, PrefixMode, PrefixTable};
use crate::tensor::Tensor;

/// The most new tokens a sequence may feed to the decode kernel (its contract's `Tq`).
const MAX_DECODE_TOKENS: usize = 16;

impl Gpt2 {
    /// One engine step: feeds every sequence's uncached tokens, writes their keys and values
    /// into `kv`, and returns each sequence's last-position logits `[V]`, in order.
    ///
    /// With [`PrefixMode::CopiedIntoCache`] (the naive method, for comparison) a sequence
    /// with an adapter starts with `P` placeholder tokens whose cache rows receive a copy of
    /// its adapter's prefix instead of being computed, and attention runs without a prefix.
    pub(crate) fn step_paged_impl(
        &self,
        be: &dyn Backend,
        seqs: &[PagedSeq],
        kv: &mut PagedKv,
        prefixes: &PrefixTable,
        mode: PrefixMode,
    ) -> Result<Vec<Vec<f32>>> {
        let start = |s: &PagedSeq| match (mode, s.adapter) {
            (PrefixMode::CopiedIntoCache, Some(a)) => s.cached.max(prefixes.slot_len(a)),
            _ => s.cached,
        };
        let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        let mut fed: Vec<usize> = seqs.iter().map(|s| s.tokens.len() - start(s)).collect();
        fed.sort_unstable();
        fed.dedup();
        for t in fed {
            if t == 0 {
                return Err(Error::index(
                    "sequence",
                    "nothing to feed after the copied prefix (the prompt needs a real token)",
                ));
            }
            let mut group: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].tokens.len() - start(&seqs[i]) == t)
                .collect();
            // Equal prefix lengths side by side: a prefill pass attends per run of them.
            group.sort_by_key(|&i| seqs[i].adapter.map(|a| prefixes.slot_len(a)));
            let members: Vec<&PagedSeq> = group.iter().map(|&i| &seqs[i]).collect();
            let logits = self.paged_pass(be, &members, t, kv, prefixes, mode)?;
            for (i, l) in group.into_iter().zip(logits) {
                out[i] = Some(l);
            }
        }
        Ok(out
            .into_iter()
            .map(|l| l.expect("every sequence is in one group"))
            .collect())
    }

    fn paged_pass(
        &self,
        be: &dyn Backend,
        seqs: &[&PagedSeq],
        t: usize,
        kv: &mut PagedKv,
        prefixes: &PrefixTable,
        mode: PrefixMode,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let w = &self.weights;
        let (b, e, h, d) = (seqs.len(), c.n_embd, c.n_head, c.head_dim());
        let m = b * t;
        let dt = self.dtype;
        // Each sequence's prefix rows: its adapter's (0 without one).
        let plen: Vec<usize> = seqs
            .iter()
            .map(|s| s.adapter.map_or(0, |a| prefixes.slot_len(a)))
            .collect();
        let mut ids = Vec::with_capacity(m);
        let mut positions = Vec::with_capacity(m);
        let copied = mode == PrefixMode::CopiedIntoCache;
        // The block table `[B, width]` (kv_append and the decode kernel read it).
        let width = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(1).max(1);
        let mut bt = vec![0i32; b * width];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &pg) in s.pages.iter().enumerate() {
                bt[i * width + j] = pg as i32;
            }
        }
        // (sequence, adapter slot, first prefix row) of the prefix rows to copy.
        let mut prefix_copies: Vec<(usize, usize, usize)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let offset = if copied { 0 } else { plen[i] };
            let first = s.tokens.len() - t;
            if let (true, Some(a)) = (copied, s.adapter) {
                if s.cached < plen[i] {
                    prefix_copies.push((i, a as usize, s.cached));
                }
            }
            if offset + s.tokens.len() > c.n_positions {
                return Err(Error::index(
                    "sequence",
                    format!(
                        "{} tokens after a prefix of {offset} exceed n_positions = {}",
                        s.tokens.len(),
                        c.n_positions
                    ),
                ));
            }
            for pos in first..s.tokens.len() {
                ids.push(s.tokens[pos] as i32);
                positions.push((offset + pos) as i32);
            }
        }
        let len_max = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        // The decode kernel takes up to 16 new queries a sequence and reads the pages through
        // the block table; longer feeds (prompts) gather their keys for the prefill kernel.
        let decode = t <= MAX_DECODE_TOKENS;
        let starts: Vec<i32> = seqs.iter().map(|s| (s.tokens.len() - t) as i32).collect();
        let (key_rows, len_max) = if decode {
            (Vec::new(), 1)
        } else {
            (kv.rows_of(seqs, len_max), len_max)
        };
        let lens_q = vec![t as i32; b];
        let lens_k: Vec<i32> = seqs.iter().map(|s| s.tokens.len() as i32).collect();
        let prefix_index: Vec<i32> = seqs
            .iter()
            .map(|s| match s.adapter {
                Some(a) if !copied => a as i32,
                _ => -1,
            })
            .collect();
        let slot_lens = prefixes.slot_lens();
        // Runs of sequences `[b0, b1)` sharing one prefix length (the group is sorted by it).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..b {
            match runs.last_mut() {
                Some(r) if plen[r.0] == plen[i] => r.1 = i + 1,
                _ => runs.push((i, i + 1)),
            }
        }
        let scale = if c.scale_attn_weights {
            1.0 / (d as f32).sqrt()
        } else {
            1.0
        };
        let eps = c.layer_norm_epsilon;

        let z = |shape: &[usize]| be.zeros(shape, dt);
        let mut x = z(&[m, e])?;
        let mut pos_emb = z(&[m, e])?;
        be.gather_rows(&w.wte.view(), &ids, &mut x.view_mut())?;
        be.gather_rows(&w.wpe.view(), &positions, &mut pos_emb.view_mut())?;
        be.add_assign(&mut x.view_mut(), &pos_emb.view())?;
        drop(pos_emb);
        let (mut ln, mut qkv, mut q) = (z(&[m, e])?, z(&[m, 3 * e])?, z(&[m, e])?);
        let (mut k_all, mut v_all) = (z(&[b * len_max, e])?, z(&[b * len_max, e])?);
        let (mut atty, mut mid, mut fch, mut fcg) = (
            z(&[m, e])?,
            z(&[m, e])?,
            z(&[m, c.n_inner])?,
            z(&[m, c.n_inner])?,
        );
        let mut next = z(&[m, e])?;
        let (mut mean, mut rstd) = (
            be.zeros(&[m], crate::tensor::DType::F32)?,
            be.zeros(&[m], crate::tensor::DType::F32)?,
        );
        for l in 0..c.n_layer {
            self.block_qkv(
                be,
                l,
                &x.view(),
                &mut ln.view_mut(),
                &mut mean.view_mut(),
                &mut rstd.view_mut(),
                &mut qkv.view_mut(),
            )?;
            let (kp, vp) = prefixes.layer(l)?;
            for &(i, a, from) in &prefix_copies {
                let n = plen[i] - from;
                let kr = kp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
                let vr = vp.select(0, a)?.narrow(0, from, n)?.unsqueeze(0)?;
                let row = &bt[i * width..(i + 1) * width];
                kv.append(be, l, &kr, &vr, row, &[from as i32])?;
            }
            let qkv_v = qkv.view().reshape(&[b, t, 3, h, d])?;
            kv.append(
                be,
                l,
                &qkv_v.select(2, 1)?,
                &qkv_v.select(2, 2)?,
                &bt,
                &starts,
            )?;
            be.copy(
                &qkv_v.select(2, 0)?,
                &mut q.view_mut().reshape(&[b, t, h, d])?,
            )?;
            let (kc, vc) = kv.layer(l);
            let out = AttnFwdOut {
                o: atty.view_mut().reshape(&[b, t, h, d])?,
                lse: None,
            };
            if decode {
                // Up to 16 new tokens a sequence: the decode kernel reads the pages in place.
                let pages = kv.num_pages();
                let ps = kv.page_size();
                let args = PagedAttnArgs::new(
                    q.view().reshape(&[b, t, h, d])?,
                    kc.view().reshape(&[pages, ps, h, d])?,
                    vc.view().reshape(&[pages, ps, h, d])?,
                    Meta::Host(&bt),
                    Meta::Host(&lens_k),
                )
                .prefix(kp, vp)
                .prefix_index(Meta::Host(&prefix_index))
                .prefix_len(Meta::Host(&slot_lens))
                .scale(scale);
                be.attn_decode(&args, out)?;
            } else {
                // Longer prompts: gather the keys from the pages, then prefill attention, one
                // call per run of equal prefix lengths over the table narrowed to it.
                be.gather_rows(&kc.view(), &key_rows, &mut k_all.view_mut())?;
                be.gather_rows(&vc.view(), &key_rows, &mut v_all.view_mut())?;
                let mut o = out.o;
                for &(b0, b1) in &runs {
                    let n = b1 - b0;
                    let args = AttnFwdArgs::new(
                        q.view().reshape(&[b, t, h, d])?.narrow(0, b0, n)?,
                        k_all
                            .view()
                            .reshape(&[b, len_max, h, d])?
                            .narrow(0, b0, n)?,
                        v_all
                            .view()
                            .reshape(&[b, len_max, h, d])?
                            .narrow(0, b0, n)?,
                    )
                    .seqlens(&lens_q[b0..b1], &lens_k[b0..b1])
                    .causal(true)
                    .scale(scale);
                    // A run without an adapter attends over no prefix at all.
                    let args = match plen[b0] {
                        0 => args,
                        pl => args
                            .prefix(kp.narrow(1, 0, pl)?, vp.narrow(1, 0, pl)?)
                            .prefix_index(&prefix_index[b0..b1]),
                    };
                    let run_out = AttnFwdOut {
                        o: o.reborrow().narrow(0, b0, n)?,
                        lse: None,
                    };
                    be.attn_fwd(&args, run_out)?;
                }
            }
            self.block_mlp(
                be,
                l,
                &x.view(),
                &atty.view(),
                BlockMlpBufs {
                    mid: mid.view_mut(),
                    ln: ln.view_mut(),
                    mean: mean.view_mut(),
                    rstd: rstd.view_mut(),
                    fch: fch.view_mut(),
                    fcg: fcg.view_mut(),
                    out: next.view_mut(),
                },
            )?;
            std::mem::swap(&mut x, &mut next);
        }
        // Only the last fed token of each sequence goes through the head.
        let last: Vec<i32> = (0..b).map(|i| (i * t + t - 1) as i32).collect();
        let mut xl = z(&[b, e])?;
        be.gather_rows(&x.view(), &last, &mut xl.view_mut())?;
        let mut lnf = z(&[b, e])?;
        let (mut mean_l, mut rstd_l) = (
            be.zeros(&[b], crate::tensor::DType::F32)?,
            be.zeros(&[b], crate::tensor::DType::F32)?,
        );
        be.layernorm(
            &xl.view(),
            &w.lnf_w.view(),
            &w.lnf_b.view(),
            eps,
            &mut lnf.view_mut(),
            &mut mean_l.view_mut(),
            &mut rstd_l.view_mut(),
        )?;
        let v = c.vocab_size;
        let mut logits: Tensor = z(&[b, v])?;
        be.matmul(
            &lnf.view(),
            &w.wte.view(),
            None,
            &mut logits.view_mut(),
            MatmulOpts::nt(),
        )?;
        let host = be.download(&logits)?.to_f32_vec();
        Ok(host.chunks(v).map(|r| r.to_vec()).collect())
    }
}
