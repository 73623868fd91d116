//! A round's partial sums, one per core. An upload folds into whichever partial sum is free,
//! so several uploads accumulate at once without a global lock; the commit merges them
//! (DESIGN.md invariant 7: per-core, per-replica and hierarchical aggregation are one merge).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use starling_core::wire::params::Layout;
use starling_core::wire::update::CheckedUpdate;
use starling_core::WeightedSum;

/// A round's partial sums.
#[derive(Debug)]
pub struct PartialSums {
    parts: Vec<Mutex<WeightedSum>>,
    next: AtomicUsize,
    folded: AtomicU64,
}

fn lock(m: &Mutex<WeightedSum>) -> MutexGuard<'_, WeightedSum> {
    // `accept` does not panic on checked input; keep serving rather than poisoning the round.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PartialSums {
    /// `n` empty partial sums for a layout (at least one).
    pub fn new(layout: &Layout, n: usize) -> Self {
        Self {
            parts: (0..n.max(1))
                .map(|_| Mutex::new(WeightedSum::new(layout)))
                .collect(),
            next: AtomicUsize::new(0),
            folded: AtomicU64::new(0),
        }
    }

    /// Folds a checked update into a free partial sum (blocking briefly if all are busy) and
    /// returns how many updates this round holds now. The update is consumed: its bytes are
    /// dropped here (the serving binary's allocator zeroes them).
    pub fn fold(&self, update: CheckedUpdate) -> u64 {
        self.fold_discounted(update, 1.0)
    }

    /// [`PartialSums::fold`] with the update's values scaled by `discount`
    /// ([`WeightedSum::accept_discounted`]).
    pub fn fold_discounted(&self, update: CheckedUpdate, discount: f64) -> u64 {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.parts.len();
        let mut guard = (0..n)
            .find_map(|i| self.parts[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| lock(&self.parts[start % n]));
        guard.accept_discounted(&update, discount);
        drop(guard);
        drop(update);
        self.folded.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Merges every partial sum into one.
    pub fn merged(&self) -> WeightedSum {
        let mut parts = self.parts.iter();
        let mut total = lock(parts.next().expect("at least one partial sum")).clone();
        for p in parts {
            total
                .merge(&lock(p))
                .expect("all partial sums share the round's layout");
        }
        total
    }
}
