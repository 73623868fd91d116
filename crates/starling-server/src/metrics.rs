//! Counters for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::{CheckIn, EngineError, Receipt, TaskHandle};

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    checkins_assigned: AtomicU64,
    checkins_retry: AtomicU64,
    updates_accepted: AtomicU64,
    updates_rejected: Mutex<BTreeMap<&'static str, u64>>,
    rounds_committed: AtomicU64,
    rounds_abandoned: AtomicU64,
}

impl Metrics {
    pub(crate) fn count_checkin(&self, answer: &CheckIn) {
        match answer {
            CheckIn::Assigned(_) => &self.checkins_assigned,
            CheckIn::Retry { .. } => &self.checkins_retry,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_update(&self, result: &Result<Receipt, EngineError>) {
        match result {
            Ok(_) => {
                self.updates_accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.count_refusal(e.code()),
        }
    }

    /// An upload refused before it reached a task's engine (unknown task, bad round number,
    /// a body over the limit or empty).
    pub(crate) fn count_refusal(&self, code: &'static str) {
        let mut m = self
            .updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(code).or_default() += 1;
    }

    pub(crate) fn count_round(&self, committed: bool) {
        if committed {
            &self.rounds_committed
        } else {
            &self.rounds_abandoned
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Updates rejected so far, over all reasons.
    pub fn updates_rejected(&self) -> u64 {
        self.updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// Renders the counters and the tasks' gauges.
    pub fn render(&self, tasks: &[TaskHandle]) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP starling_checkins_total Check-ins answered, by outcome."
        );
        let _ = writeln!(out, "# TYPE starling_checkins_total counter");
        let _ = writeln!(
            out,
            "starling_checkins_total{{outcome=\"assigned\"}} {}",
            get(&self.checkins_assigned)
        );
        let _ = writeln!(
            out,
            "starling_checkins_total{{outcome=\"retry\"}} {}",
            get(&self.checkins_retry)
        );
        let _ = writeln!(
            out,
            "# HELP starling_updates_total Updates received, by outcome."
        );
        let _ = writeln!(out, "# TYPE starling_updates_total counter");
        let _ = writeln!(
            out,
            "starling_updates_total{{outcome=\"accepted\"}} {}",
            get(&self.updates_accepted)
        );
        for (code, n) in self
            .updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "starling_updates_total{{outcome=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP starling_rounds_total Rounds closed, by outcome."
        );
        let _ = writeln!(out, "# TYPE starling_rounds_total counter");
        let _ = writeln!(
            out,
            "starling_rounds_total{{outcome=\"committed\"}} {}",
            get(&self.rounds_committed)
        );
        let _ = writeln!(
            out,
            "starling_rounds_total{{outcome=\"abandoned\"}} {}",
            get(&self.rounds_abandoned)
        );
        let _ = writeln!(
            out,
            "# HELP starling_model_version Current model version per task."
        );
        let _ = writeln!(out, "# TYPE starling_model_version gauge");
        for t in tasks {
            let s = t.status();
            let _ = writeln!(
                out,
                "starling_model_version{{task=\"{}\"}} {}",
                t.name(),
                s.model.version
            );
        }
        let _ = writeln!(
            out,
            "# HELP starling_round_updates Updates folded into the open round per task."
        );
        let _ = writeln!(out, "# TYPE starling_round_updates gauge");
        for t in tasks {
            let s = t.status();
            let _ = writeln!(
                out,
                "starling_round_updates{{task=\"{}\"}} {}",
                t.name(),
                s.round.updates
            );
        }
        out
    }
}
