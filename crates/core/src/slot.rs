//! The two values every M2N message is about: which pipeline [`Slot`] it belongs to, and
//! which attention replicas take part in an iteration ([`Members`]).

use serde::{Deserialize, Serialize};
use std::fmt;

/// One pipeline slot: MoE layer `layer` of micro-batch `micro_batch` in `iteration`. Slots
/// order by iteration, then layer, then micro-batch (the order expert workers take them in
/// when several are complete).
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Slot {
    pub iteration: u64,
    pub layer: u32,
    pub micro_batch: u32,
}

impl Slot {
    pub fn new(iteration: u64, layer: u32, micro_batch: u32) -> Self {
        Self {
            iteration,
            layer,
            micro_batch,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "(iteration {}, layer {}, micro-batch {})",
            self.iteration, self.layer, self.micro_batch
        )
    }
}

/// A set of attention replica ids (`0..Members::CAPACITY`), as sent on the wire: bit `r` is
/// replica `r`.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Default)]
pub struct Members(u64);

impl Members {
    /// The most replicas a set can hold, hence the most attention replicas of a deployment.
    pub const CAPACITY: usize = 64;
    pub const NONE: Members = Members(0);

    /// The set holding only replica `r` (`r < CAPACITY`).
    pub fn one(r: u32) -> Self {
        debug_assert!((r as usize) < Self::CAPACITY);
        Self(1u64 << r)
    }

    /// Replicas `0..n` (`n <= CAPACITY`).
    pub fn first(n: usize) -> Self {
        debug_assert!(n <= Self::CAPACITY);
        if n >= Self::CAPACITY {
            Self(u64::MAX)
        } else {
            Self((1u64 << n) - 1)
        }
    }

    pub fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    pub fn contains(self, r: u32) -> bool {
        (r as usize) < Self::CAPACITY && self.0 & (1u64 << r) != 0
    }

    pub fn insert(&mut self, r: u32) {
        *self = self.with(r);
    }

    pub fn remove(&mut self, r: u32) {
        if (r as usize) < Self::CAPACITY {
            self.0 &= !(1u64 << r);
        }
    }

    /// This set and replica `r`.
    pub fn with(self, r: u32) -> Self {
        self.union(Self::one(r))
    }

    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// The replica ids, smallest first.
    pub fn iter(self) -> impl Iterator<Item = u32> {
        (0..Self::CAPACITY as u32).filter(move |r| self.contains(*r))
    }
}

impl fmt::Debug for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl FromIterator<u32> for Members {
    fn from_iter<I: IntoIterator<Item = u32>>(it: I) -> Self {
        it.into_iter().fold(Self::NONE, Self::with)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_a_set_of_replica_ids() {
        let mut m: Members = [3, 0, 63].into_iter().collect();
        assert_eq!(m.bits(), 1 | 1 << 3 | 1 << 63);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 3, 63]);
        assert_eq!(m.len(), 3);
        assert!(m.contains(63) && !m.contains(1) && !m.contains(64));
        m.remove(3);
        m.remove(70);
        m.insert(1);
        assert_eq!(format!("{m:?}"), "{0, 1, 63}");
        assert_eq!(Members::first(3), [0, 1, 2].into_iter().collect());
        assert_eq!(Members::first(64).len(), 64);
        assert!(Members::NONE.is_empty() && Members::first(0).is_empty());
    }

    #[test]
    fn slots_order_by_iteration_then_layer_then_micro_batch() {
        let mut s = vec![
            Slot::new(2, 0, 0),
            Slot::new(1, 3, 1),
            Slot::new(1, 3, 0),
            Slot::new(1, 1, 1),
        ];
        s.sort();
        assert_eq!(
            s,
            vec![
                Slot::new(1, 1, 1),
                Slot::new(1, 3, 0),
                Slot::new(1, 3, 1),
                Slot::new(2, 0, 0),
            ]
        );
        assert_eq!(
            Slot::new(4, 2, 1).to_string(),
            "(iteration 4, layer 2, micro-batch 1)"
        );
    }
}
