//! Per-core partial aggregates. An upload folds into whichever shard is free, so several
//! uploads accumulate at once; the round's commit merges the shards (DESIGN.md invariant 7).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use starling_core::params::Layout;
use starling_core::update::UpdateView;
use starling_core::FedAvg;

/// A round's partial aggregates.
#[derive(Debug)]
pub struct Shards {
    parts: Vec<Mutex<FedAvg>>,
    next: AtomicUsize,
    folded: AtomicU64,
}

fn lock(m: &Mutex<FedAvg>) -> MutexGuard<'_, FedAvg> {
    // A panic while folding cannot leave a shard half-updated in a way we could repair, but
    // `accept` does not panic on checked input; keep serving rather than poisoning the round.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shards {
    /// `n` empty partial aggregates for a layout (at least one).
    pub fn new(layout: &Layout, n: usize) -> Self {
        Self {
            parts: (0..n.max(1))
                .map(|_| Mutex::new(FedAvg::new(layout)))
                .collect(),
            next: AtomicUsize::new(0),
            folded: AtomicU64::new(0),
        }
    }

    /// Folds a checked update into a free shard (blocking briefly if all are busy) and
    /// returns how many updates this round holds now.
    pub fn fold(&self, update: &UpdateView<'_>) -> u64 {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.parts.len();
        let mut guard = (0..n)
            .find_map(|i| self.parts[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| lock(&self.parts[start % n]));
        guard.accept(update);
        drop(guard);
        self.folded.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Merges every shard into one aggregate.
    pub fn merged(&self) -> FedAvg {
        let mut parts = self.parts.iter();
        let mut total = lock(parts.next().expect("at least one shard")).clone();
        for p in parts {
            total
                .merge(&lock(p))
                .expect("all shards share the round's layout");
        }
        total
    }
}
