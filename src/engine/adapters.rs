//! Which adapter sits in which slot of the device prefix table.
//!
//! The prefix table holds up to `capacity` adapters (`[NP, P_max, L, 2, Hkv, D]` on the
//! device, `prefix_len[np]` valid rows each); requests name adapters, the model sees slots.
//! Adapters are added and removed at run time; when the table is full, loading another evicts
//! the least recently used adapter that no running request holds (never one in use).
//! This type only keeps the books; the caller writes and clears the device rows.

use crate::error::{Error, Result};
use std::collections::HashMap;

#[derive(Clone, Debug)]
struct Entry {
    name: String,
    prefix_len: usize,
    /// Running requests holding the slot.
    holders: usize,
    /// Logical time of the last acquire.
    last_used: u64,
}

/// The slot assignment of the prefix table.
#[derive(Clone, Debug)]
pub struct AdapterSlots {
    slots: Vec<Option<Entry>>,
    by_name: HashMap<String, u32>,
    max_prefix_len: usize,
    clock: u64,
}

/// Where [`AdapterSlots::insert`] put an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The slot to write the adapter's prefix into.
    pub slot: u32,
    /// The adapter that was evicted from it, if any.
    pub evicted: Option<String>,
}

impl AdapterSlots {
    /// An empty table of `capacity` slots of at most `max_prefix_len` rows.
    pub fn new(capacity: usize, max_prefix_len: usize) -> Result<AdapterSlots> {
        if capacity == 0 || capacity > i32::MAX as usize {
            return Err(Error::index(
                "adapter capacity",
                format!("{capacity}: expected 1..={}", i32::MAX),
            ));
        }
        Ok(AdapterSlots {
            slots: vec![None; capacity],
            by_name: HashMap::new(),
            max_prefix_len,
            clock: 0,
        })
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
    /// Adapters loaded.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
    /// Whether no adapter is loaded.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
    /// The slot of a loaded adapter.
    pub fn slot(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }
    /// The prefix length of the adapter in `slot`.
    pub fn prefix_len(&self, slot: u32) -> Option<usize> {
        self.slots
            .get(slot as usize)?
            .as_ref()
            .map(|e| e.prefix_len)
    }
    /// The name of the adapter in `slot`.
    pub fn name(&self, slot: u32) -> Option<&str> {
        self.slots
            .get(slot as usize)?
            .as_ref()
            .map(|e| e.name.as_str())
    }
    /// Whether [`AdapterSlots::insert`] would find a slot: a free one, or an adapter that no
    /// running request holds.
    pub fn has_room(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.as_ref().is_none_or(|e| e.holders == 0))
    }
    /// Loaded adapter names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Places adapter `name` (`prefix_len` rows), evicting the least recently used idle one
    /// when the table is full. Errors: the name is already loaded, the prefix is longer than
    /// the table's rows, or every slot is held by a running request.
    pub fn insert(&mut self, name: &str, prefix_len: usize) -> Result<Placed> {
        if self.by_name.contains_key(name) {
            return Err(Error::index(
                "adapter",
                format!("{name:?} is already loaded"),
            ));
        }
        if prefix_len == 0 || prefix_len > self.max_prefix_len {
            return Err(Error::index(
                "adapter",
                format!(
                    "{name:?} has {prefix_len} virtual tokens; the prefix table takes 1..={}",
                    self.max_prefix_len
                ),
            ));
        }
        let (slot, evicted) = match self.slots.iter().position(|s| s.is_none()) {
            Some(i) => (i, None),
            None => {
                let victim = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| s.as_ref().map(|e| (i, e)))
                    .filter(|(_, e)| e.holders == 0)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(i, _)| i)
                    .ok_or_else(|| {
                        Error::index(
                            "adapter",
                            format!(
                                "cannot load {name:?}: all {} prefix-table slots are in use by \
                                 running requests",
                                self.slots.len()
                            ),
                        )
                    })?;
                let old = self.slots[victim].take().expect("victim slot is occupied");
                self.by_name.remove(&old.name);
                (victim, Some(old.name))
            }
        };
        self.clock += 1;
        self.slots[slot] = Some(Entry {
            name: name.to_string(),
            prefix_len,
            holders: 0,
            last_used: self.clock,
        });
        self.by_name.insert(name.to_string(), slot as u32);
        Ok(Placed {
            slot: slot as u32,
            evicted,
        })
    }

    /// Marks `name` in use by one more request (it cannot be evicted until released) and
    /// returns its slot.
    pub fn acquire(&mut self, name: &str) -> Result<u32> {
        let slot = self
            .slot(name)
            .ok_or_else(|| Error::index("adapter", format!("{name:?} is not loaded")))?;
        self.clock += 1;
        let e = self.slots[slot as usize]
            .as_mut()
            .expect("named slot is occupied");
        e.holders += 1;
        e.last_used = self.clock;
        Ok(slot)
    }

    /// One request holding `slot` ended.
    pub fn release(&mut self, slot: u32) {
        if let Some(Some(e)) = self.slots.get_mut(slot as usize) {
            e.holders = e.holders.saturating_sub(1);
        }
    }

    /// Unloads `name`; an error if it is not loaded or a running request holds it.
    pub fn remove(&mut self, name: &str) -> Result<u32> {
        let slot = self
            .slot(name)
            .ok_or_else(|| Error::index("adapter", format!("{name:?} is not loaded")))?;
        let e = self.slots[slot as usize]
            .as_ref()
            .expect("named slot is occupied");
        if e.holders > 0 {
            return Err(Error::index(
                "adapter",
                format!("{name:?} is in use by {} running requests", e.holders),
            ));
        }
        self.slots[slot as usize] = None;
        self.by_name.remove(name);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_idle_adapter_is_evicted() {
        let mut t = AdapterSlots::new(3, 10).unwrap();
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(
                t.insert(n, 5).unwrap(),
                Placed {
                    slot: i as u32,
                    evicted: None
                }
            );
        }
        let a = t.acquire("a").unwrap(); // a is the most recent and held
        t.acquire("b").unwrap();
        t.release(t.slot("b").unwrap()); // b recent but idle
        let p = t.insert("d", 4).unwrap();
        assert_eq!(
            p,
            Placed {
                slot: 2,
                evicted: Some("c".into())
            }
        );
        let p = t.insert("e", 4).unwrap();
        assert_eq!(
            p.evicted.as_deref(),
            Some("b"),
            "b's last use came before d's placement"
        );
        assert_eq!(t.names(), vec!["a", "d", "e"]);
        // Everything held: loading fails and changes nothing.
        t.acquire("d").unwrap();
        t.acquire("e").unwrap();
        let err = t.insert("f", 4).unwrap_err().to_string();
        assert!(err.contains("all 3 prefix-table slots are in use"), "{err}");
        assert_eq!(t.len(), 3);
        assert!(t
            .remove("a")
            .unwrap_err()
            .to_string()
            .contains("in use by 1"));
        t.release(a);
        assert_eq!(t.remove("a").unwrap(), 0);
        assert_eq!(t.insert("f", 10).unwrap().slot, 0);
    }

    #[test]
    fn bad_names_and_lengths_are_errors() {
        let mut t = AdapterSlots::new(2, 8).unwrap();
        t.insert("a", 8).unwrap();
        assert!(t
            .insert("a", 8)
            .unwrap_err()
            .to_string()
            .contains("already loaded"));
        assert!(t.insert("b", 9).unwrap_err().to_string().contains("1..=8"));
        assert!(t.insert("b", 0).is_err());
        assert!(t
            .acquire("zz")
            .unwrap_err()
            .to_string()
            .contains("not loaded"));
        assert!(t.remove("zz").is_err());
        assert!(AdapterSlots::new(0, 8).is_err());
        assert_eq!((t.prefix_len(0), t.name(0)), (Some(8), Some("a")));
    }
}
