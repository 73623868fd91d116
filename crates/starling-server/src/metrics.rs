//! Counters and gauges for `GET /metrics`, in the Prometheus text format.
//!
//! The engine counts what it answers (`count_checkin`, `count_update`, `count_round`,
//! `count_secure`); the
//! HTTP layer counts uploads it refuses before the engine sees them (`count_refusal`), upload
//! bodies cut off by their client (`count_client_disconnected`) and requests over a rate
//! limit (`count_rate_limited`), and keeps the gauges of
//! uploads in flight and open connections (`track_upload`, `track_connection`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use starling_core::wire::protocol::ErrorCode;

use crate::engine::{CheckIn, EngineError, Receipt, TaskHandle};

/// Process-wide counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    checkins_assigned: AtomicU64,
    checkins_retry: AtomicU64,
    updates_accepted: AtomicU64,
    updates_rejected: Mutex<BTreeMap<&'static str, u64>>,
    updates_client_disconnected: AtomicU64,
    rounds_committed: AtomicU64,
    rounds_abandoned: AtomicU64,
    uploads_in_flight: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    rate_limited_address: AtomicU64,
    rate_limited_credential: AtomicU64,
    rate_limited_enrollment: AtomicU64,
    /// Secure-aggregation messages by (step, outcome).
    secagg_messages: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// Holds one unit of a gauge (an upload in flight, an open connection) until dropped.
#[derive(Debug)]
pub(crate) struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: fn(&Metrics) -> &AtomicU64,
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.gauge)(&self.metrics).fetch_sub(1, Ordering::Relaxed);
    }
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

    /// An upload refused outside [`TaskHandle::upload`]: before the body was read (unknown
    /// task, bad round number, missing token, a declared size over the limit, too many
    /// uploads in flight, the engine's admission check) or while it was (over the limit,
    /// too slow, empty).
    pub(crate) fn count_refusal(&self, code: ErrorCode) {
        let mut m = self
            .updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(code.as_str()).or_default() += 1;
    }

    /// An upload whose client hung up before its whole body arrived. Not a refusal: nothing
    /// was answered, and the update never reached the engine.
    pub(crate) fn count_client_disconnected(&self) {
        self.updates_client_disconnected
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_round(&self, committed: bool) {
        if committed {
            &self.rounds_committed
        } else {
            &self.rounds_abandoned
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// A secure round's message (`step`: `keys`, `shares`, `input`, `unmask`, or `poll` for
    /// the questions between them) and the engine's answer: `accepted`, or the refusal's
    /// code. Polls are counted only when refused (a device asks many times while it waits).
    pub(crate) fn count_secure(
        &self,
        step: &'static str,
        result: &Result<crate::engine::secagg::SecureAnswer, EngineError>,
    ) {
        let outcome = match result {
            Ok(_) if step == "poll" => return,
            Ok(_) => "accepted",
            Err(e) => e.code().as_str(),
        };
        let mut m = self
            .secagg_messages
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry((step, outcome)).or_default() += 1;
    }

    /// A request refused by a rate limit.
    pub(crate) fn count_rate_limited(&self, scope: crate::ratelimit::Scope) {
        match scope {
            crate::ratelimit::Scope::Address => &self.rate_limited_address,
            crate::ratelimit::Scope::Credential => &self.rate_limited_credential,
            crate::ratelimit::Scope::Enrollment => &self.rate_limited_enrollment,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// A connection closed at once because its address already had its share open.
    pub(crate) fn count_connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    fn track(self: &Arc<Self>, gauge: fn(&Metrics) -> &AtomicU64) -> GaugeGuard {
        gauge(self).fetch_add(1, Ordering::Relaxed);
        GaugeGuard {
            metrics: self.clone(),
            gauge,
        }
    }

    /// Counts an upload in flight until the guard is dropped.
    pub(crate) fn track_upload(self: &Arc<Self>) -> GaugeGuard {
        self.track(|m| &m.uploads_in_flight)
    }

    /// Counts an open connection until the guard is dropped.
    pub(crate) fn track_connection(self: &Arc<Self>) -> GaugeGuard {
        self.track(|m| &m.connections_open)
    }

    /// Updates rejected so far, over all reasons (client disconnects are not rejections).
    pub fn updates_rejected(&self) -> u64 {
        self.updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// Upload bodies being received or checked now.
    pub fn uploads_in_flight(&self) -> u64 {
        self.uploads_in_flight.load(Ordering::Relaxed)
    }

    /// HTTP connections open now.
    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Renders the counters and the tasks' gauges.
    pub fn render(&self, tasks: &[TaskHandle]) -> String {
        let mut out = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "starling_checkins_total",
            "counter",
            "Check-ins answered, by outcome.",
        );
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
        family(
            &mut out,
            "starling_updates_total",
            "counter",
            "Updates received, by outcome: accepted, an error code, or client_disconnected.",
        );
        let _ = writeln!(
            out,
            "starling_updates_total{{outcome=\"accepted\"}} {}",
            get(&self.updates_accepted)
        );
        let _ = writeln!(
            out,
            "starling_updates_total{{outcome=\"client_disconnected\"}} {}",
            get(&self.updates_client_disconnected)
        );
        for (code, n) in self
            .updates_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "starling_updates_total{{outcome=\"{code}\"}} {n}");
        }
        family(
            &mut out,
            "starling_uploads_in_flight",
            "gauge",
            "Upload bodies being received or checked now.",
        );
        let _ = writeln!(
            out,
            "starling_uploads_in_flight {}",
            get(&self.uploads_in_flight)
        );
        family(
            &mut out,
            "starling_connections_open",
            "gauge",
            "HTTP connections open now.",
        );
        let _ = writeln!(
            out,
            "starling_connections_open {}",
            get(&self.connections_open)
        );
        family(
            &mut out,
            "starling_connections_refused_total",
            "counter",
            "Connections closed at once because their address had max_connections_per_address open.",
        );
        let _ = writeln!(
            out,
            "starling_connections_refused_total {}",
            get(&self.connections_refused)
        );
        family(
            &mut out,
            "starling_rate_limited_total",
            "counter",
            "Requests refused with 429 rate_limited, by the limit they hit.",
        );
        for (scope, n) in [
            ("address", &self.rate_limited_address),
            ("credential", &self.rate_limited_credential),
            ("enrollment", &self.rate_limited_enrollment),
        ] {
            let _ = writeln!(
                out,
                "starling_rate_limited_total{{scope=\"{scope}\"}} {}",
                get(n)
            );
        }
        family(
            &mut out,
            "starling_secagg_messages_total",
            "counter",
            "Secure-aggregation messages the engine answered, by step (keys, shares, input, unmask; poll: refused questions only) and outcome (accepted or an error code).",
        );
        for ((step, outcome), n) in self
            .secagg_messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "starling_secagg_messages_total{{step=\"{step}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        family(
            &mut out,
            "starling_rounds_total",
            "counter",
            "Rounds closed, by outcome.",
        );
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
        family(
            &mut out,
            "starling_model_version",
            "gauge",
            "Current model version per task.",
        );
        for t in tasks {
            let _ = writeln!(
                out,
                "starling_model_version{{task=\"{}\"}} {}",
                t.name(),
                t.status().model.version
            );
        }
        family(
            &mut out,
            "starling_round_updates",
            "gauge",
            "Updates folded into the open round per task.",
        );
        for t in tasks {
            let _ = writeln!(
                out,
                "starling_round_updates{{task=\"{}\"}} {}",
                t.name(),
                t.status().round.updates
            );
        }
        out
    }
}
