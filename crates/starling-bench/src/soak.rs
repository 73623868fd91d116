//! The soak benchmark: honest devices, aborted and malformed uploads and slow clients, all at
//! once, for a fixed time against a real `starling serve` on 127.0.0.1.
//!
//! One run ([`run`]) starts a server process ([`ServerProcess`]) with one `logistic` task of
//! about `params` parameters and drives it for `secs` seconds with:
//!
//! - **devices** (`devices` loops): check in, download the model when its version changed,
//!   "train" for 100 to 300 ms, upload. Each upload is, at random, one of
//!   - *honest*: a small random delta, encoded with [`update::encode`], with the token in
//!     [`protocol::TOKEN_HEADER`] (a `busy` answer is retried after `Retry-After`);
//!   - *aborted* (`abort_fraction`): written by hand on a raw TCP connection, the whole body
//!     or only part of it, then closed without reading the answer, half with a FIN and half
//!     with a RST (`SO_LINGER` 0);
//!   - *malformed* (`malformed_fraction`): garbage, a NaN, a wrong shape, a truncated body,
//!     zero examples, a body token that differs from the header's, or no token header; each
//!     must be refused with a 4xx.
//! - **slow clients** (`slow_clients` connections, in three kinds): one trickles its headers
//!   forever, one trickles a body behind a made-up token, one trickles a body behind a real
//!   assignment; a few bytes per half second. The server's header and body timeouts must cut
//!   them; how each connection ended is counted.
//!
//! Every second the server's resident memory (`VmRSS`) is sampled and the task's open round
//! polled: a round whose number does not move for 3x the deadline counts as **stuck**. When
//! the time is up the traffic stops, and a clean **drain** follows: fresh honest devices must
//! see the round that was open close and the next one commit, which it cannot if the faults
//! stranded a reservation. `/metrics` is read when the traffic stops (rounds and updates by
//! outcome) and after the drain (any `in_flight` gauge must be 0).
//!
//! With `quiet_baseline` the same honest load runs first, alone, on a fresh server, and the
//! report compares the two runs' peak RSS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::{self, CheckInAnswer, CheckInRequest, ErrorBody};
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{wire::checkpoint, Parameters, Tensor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::machine::peak_rss_mib;
use crate::server::ServerProcess;
use crate::{quantile, BenchError};

/// The task the soak creates.
const TASK: &str = "soak";
/// Bytes a slow client sends per step.
const TRICKLE_BYTES: usize = 8;
/// Time between a slow client's steps.
const TRICKLE_EVERY: Duration = Duration::from_millis(500);
/// How long past its timeout a slow connection may stay open before it counts as not cut.
const CUT_GRACE_SECS: f64 = 5.0;
/// How many error messages a run keeps for its report.
const KEEP_ERRORS: usize = 10;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The `starling` binary to start as the server.
    pub exe: PathBuf,
    /// Seconds of traffic (per run: the quiet baseline runs as long).
    pub secs: f64,
    /// Parameters per update, about: a `logistic` model of `params / 10` inputs and 10
    /// classes (`params + 10` parameters when `params` is a multiple of 10).
    pub params: usize,
    /// Device loops (honest, aborting and malformed uploads alike).
    pub devices: usize,
    /// Share of uploads that drop the connection after all or part of the body.
    pub abort_fraction: f64,
    /// Share of uploads whose body or token is wrong.
    pub malformed_fraction: f64,
    /// Slow connections open at once.
    pub slow_clients: usize,
    /// Run the honest load alone first, and compare peak RSS.
    pub quiet_baseline: bool,
    /// The round goal.
    pub goal: u32,
    /// The fewest updates a round commits with at its deadline.
    pub min: u32,
    /// The round deadline, seconds.
    pub deadline_secs: f64,
    /// Assignments per round as a multiple of `goal`.
    pub overcommit: f64,
    /// The server's `header_timeout_secs`.
    pub header_timeout_secs: f64,
    /// The server's `body_timeout_secs`.
    pub body_timeout_secs: f64,
    /// Seed of every random choice of the load generator.
    pub seed: u64,
}

impl SoakOptions {
    /// The defaults of `starling bench soak`, for the binary `exe`.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            secs: 120.0,
            params: 100_000,
            devices: 32,
            abort_fraction: 0.2,
            malformed_fraction: 0.1,
            slow_clients: 50,
            quiet_baseline: false,
            goal: 20,
            min: 10,
            deadline_secs: 10.0,
            overcommit: 2.0,
            header_timeout_secs: 5.0,
            body_timeout_secs: 10.0,
            seed: 1,
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let usage = |m: &str| Err(BenchError::Usage(m.into()));
        if !(self.secs.is_finite() && self.secs >= 1.0) {
            return usage("secs must be at least 1");
        }
        if self.params < 20 {
            return usage("params must be at least 20");
        }
        if self.devices == 0 {
            return usage("devices must be at least 1");
        }
        let (a, m) = (self.abort_fraction, self.malformed_fraction);
        if !((0.0..=1.0).contains(&a) && (0.0..=1.0).contains(&m) && a + m <= 1.0) {
            return usage("abort and malformed fractions must be in [0, 1] and sum to at most 1");
        }
        if self.min == 0 || self.min > self.goal {
            return usage("rounds need 1 <= min <= goal");
        }
        for (name, v) in [
            ("deadline", self.deadline_secs),
            ("header timeout", self.header_timeout_secs),
            ("body timeout", self.body_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return usage(&format!("the {name} must be positive"));
            }
        }
        if !(self.overcommit.is_finite() && self.overcommit >= 1.0) {
            return usage("overcommit must be at least 1");
        }
        Ok(())
    }

    /// The server's settings file.
    fn config(&self) -> String {
        format!(
            r#"
[server]
header_timeout_secs = {header}
body_timeout_secs = {body}
max_connections_per_address = 1024

[[tasks]]
name = "{TASK}"
admission = "open"
model = "logistic"
inputs = {inputs}
outputs = 10
min_cohort = {cohort}
max_assignments_per_address = 100000

[tasks.rounds]
goal = {goal}
min = {min}
deadline_secs = {deadline}
overcommit = {overcommit}
retry_secs = 0.5
"#,
            header = toml_f64(self.header_timeout_secs),
            body = toml_f64(self.body_timeout_secs),
            inputs = (self.params / 10).max(1),
            cohort = self.min.min(10),
            goal = self.goal,
            min = self.min,
            deadline = toml_f64(self.deadline_secs),
            overcommit = toml_f64(self.overcommit),
        )
    }
}

/// A float as TOML writes it (always with a decimal point or exponent).
fn toml_f64(v: f64) -> String {
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E']) {
        s
    } else {
        format!("{s}.0")
    }
}

/// What the load generator saw, counted as it happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Check-ins answered with an assignment.
    pub checkins_assigned: u64,
    /// Check-ins answered "come back later".
    pub checkins_retry: u64,
    /// Check-ins that failed (transport, or an answer that is not a check-in answer).
    pub checkin_errors: u64,
    /// Model downloads.
    pub model_downloads: u64,
    /// Model downloads that failed.
    pub model_errors: u64,
    /// Honest uploads (not counting `busy` retries).
    pub honest_sent: u64,
    /// Honest uploads answered 202.
    pub honest_accepted: u64,
    /// Answers other than 202 to honest uploads, by error code (`http_<status>` when the body
    /// has none; `busy` answers are retried and each counted).
    pub honest_refused: BTreeMap<String, u64>,
    /// Honest uploads that failed in transport.
    pub honest_transport_errors: u64,
    /// Aborted uploads by kind (`full_fin`, `full_rst`, `mid_fin`, `mid_rst`).
    pub aborted: BTreeMap<String, u64>,
    /// Aborted uploads that could not even be written (connect or write failed).
    pub abort_errors: u64,
    /// Malformed uploads: kind, then the answer (error code, `accepted`, `transport`).
    pub malformed: BTreeMap<String, BTreeMap<String, u64>>,
    /// Slow connections: kind, then how each ended (`answered_<status>`, `closed`, `reset`,
    /// `open_at_stop`, `gave_up`, `connect_failed`).
    pub slow: BTreeMap<String, BTreeMap<String, u64>>,
    /// Seconds from the start of each slow connection (for bodies: from the end of the
    /// headers) until the server ended it, by kind.
    pub slow_cut_secs: BTreeMap<String, Vec<f64>>,
    /// Slow connections still open well past the timeout that should have cut them.
    pub slow_uncut: u64,
    /// The first few failures, for people.
    pub errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, e: impl std::fmt::Display) {
        if self.errors.len() < KEEP_ERRORS {
            self.errors.push(e.to_string());
        }
    }

    /// Records an error with its chain of causes (reqwest's own message names only the URL).
    fn error_chain(&mut self, what: &str, e: &(dyn std::error::Error + 'static)) {
        if self.errors.len() < KEEP_ERRORS {
            let mut msg = format!("{what}: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                let s_text = s.to_string();
                if !msg.contains(&s_text) {
                    msg.push_str(&format!(": {s_text}"));
                }
                source = s.source();
            }
            self.errors.push(msg);
        }
    }

    /// Malformed uploads the server accepted (each one a failure).
    pub fn malformed_accepted(&self) -> u64 {
        self.malformed
            .values()
            .filter_map(|m| m.get("accepted"))
            .sum()
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_default() += 1;
}

/// One sample of the server's resident memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RssSample {
    /// Seconds since the traffic started.
    pub t_secs: f64,
    /// `VmRSS`, MiB.
    pub rss_mib: f64,
}

/// The server's own counters from `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerCounters {
    /// `starling_rounds_total{outcome="committed"}`.
    pub rounds_committed: Option<u64>,
    /// `starling_rounds_total{outcome="abandoned"}`.
    pub rounds_abandoned: Option<u64>,
    /// `starling_updates_total` by outcome.
    pub updates: BTreeMap<String, u64>,
    /// The sum of every gauge whose name says `in_flight`, if the server has any.
    pub in_flight: Option<f64>,
    /// Those gauges' names.
    pub in_flight_metrics: Vec<String>,
    /// `starling_connections_open`.
    pub connections_open: Option<u64>,
    /// `starling_connections_refused_total` (over `max_connections_per_address`).
    pub connections_refused: Option<u64>,
}

/// The clean load after the traffic stopped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DrainReport {
    /// The open round when the traffic stopped.
    pub from_round: u64,
    /// The open round when the drain ended.
    pub to_round: u64,
    /// The model version when the traffic stopped.
    pub from_version: u64,
    /// The model version when the drain ended.
    pub to_version: u64,
    /// Whether the round open at the stop closed and a later round committed.
    pub ok: bool,
    /// Seconds the drain took.
    pub secs: f64,
    /// Honest updates the drain's devices got accepted.
    pub accepted: u64,
    /// Check-ins of the drain's devices answered with an assignment, and "come back later".
    pub checkins: (u64, u64),
    /// The drain's answers other than 202 to its uploads, by code.
    pub refused: BTreeMap<String, u64>,
    /// The open round as the server described it when the drain ended
    /// (`GET /v1/tasks/{task}`'s `round`).
    pub final_round: Value,
}

/// How the slow connections of one kind ended.
#[derive(Debug, Clone, Serialize)]
pub struct SlowSummary {
    /// The kind.
    pub kind: String,
    /// Connections, by how they ended.
    pub ended: BTreeMap<String, u64>,
    /// Median seconds until the server ended one.
    pub p50_cut_secs: f64,
    /// Longest seconds until the server ended one.
    pub max_cut_secs: f64,
}

/// One run: the soak itself, or the quiet baseline.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `soak` or `quiet`.
    pub phase: String,
    /// Seconds of traffic.
    pub secs: f64,
    /// The task's parameters.
    pub parameter_count: usize,
    /// Bytes of one honest update.
    pub update_bytes: usize,
    /// Model versions committed during the traffic (seen by polling).
    pub versions_committed: u64,
    /// The server's counters when the traffic stopped.
    pub at_stop: ServerCounters,
    /// The server's counters after the drain.
    pub at_end: ServerCounters,
    /// Rounds that did not move for 3x the deadline.
    pub rounds_stuck: u64,
    /// The longest a round stayed open, seconds.
    pub longest_round_secs: f64,
    /// Status polls that failed (the server did not answer within 5 s).
    pub poll_errors: u64,
    /// What the load generator saw during the traffic.
    pub tally: Tally,
    /// Slow connections by kind.
    pub slow: Vec<SlowSummary>,
    /// The clean load after the traffic.
    pub drain: DrainReport,
    /// `VmRSS` every second.
    pub rss: Vec<RssSample>,
    /// The server's peak resident memory (`VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
}

/// The pass/fail judgement of a soak.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// No problem found.
    pub pass: bool,
    /// What went wrong, for people.
    pub problems: Vec<String>,
    /// The soak's peak RSS over the quiet run's, if there was one.
    pub rss_ratio: Option<f64>,
}

/// Everything a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Seconds of traffic per run.
    pub secs: f64,
    /// Device loops.
    pub devices: usize,
    /// Share of uploads aborted.
    pub abort_fraction: f64,
    /// Share of uploads malformed.
    pub malformed_fraction: f64,
    /// Slow connections.
    pub slow_clients: usize,
    /// Round goal, min and deadline.
    pub goal: u32,
    /// The fewest updates a round commits with.
    pub min: u32,
    /// Round deadline, seconds.
    pub deadline_secs: f64,
    /// The server's header timeout, seconds.
    pub header_timeout_secs: f64,
    /// The server's body timeout, seconds.
    pub body_timeout_secs: f64,
    /// The quiet baseline, if it ran.
    pub quiet: Option<PhaseReport>,
    /// The soak.
    pub soak: PhaseReport,
    /// The judgement.
    pub verdict: Verdict,
}

/// Where a run is, once a second.
#[derive(Debug, Clone)]
pub struct Progress {
    /// `quiet`, `soak` or `drain`.
    pub phase: &'static str,
    /// Seconds into the phase.
    pub elapsed_secs: f64,
    /// The phase's length (the drain's bound for `drain`).
    pub total_secs: f64,
    /// The open round.
    pub round: u64,
    /// The model version.
    pub version: u64,
    /// The server's `VmRSS`, MiB.
    pub rss_mib: Option<f64>,
    /// Honest updates accepted so far.
    pub accepted: u64,
    /// Rounds stuck so far.
    pub stuck: u64,
}

/// Runs the soak (after the quiet baseline, if asked), calling `progress` once a second.
pub async fn run(
    o: &SoakOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<SoakReport, BenchError> {
    o.validate()?;
    let quiet = if o.quiet_baseline {
        Some(run_phase(o, false, &mut progress).await?)
    } else {
        None
    };
    let soak = run_phase(o, true, &mut progress).await?;
    let verdict = judge(&soak, quiet.as_ref());
    Ok(SoakReport {
        secs: o.secs,
        devices: o.devices,
        abort_fraction: o.abort_fraction,
        malformed_fraction: o.malformed_fraction,
        slow_clients: o.slow_clients,
        goal: o.goal,
        min: o.min,
        deadline_secs: o.deadline_secs,
        header_timeout_secs: o.header_timeout_secs,
        body_timeout_secs: o.body_timeout_secs,
        quiet,
        soak,
        verdict,
    })
}

/// Judges a soak run against the acceptance criteria: rounds commit and none is stuck, the
/// drain commits and nothing stays in flight, no malformed upload is accepted, every slow
/// connection is cut, and peak RSS stays within 2x of the quiet run's.
pub fn judge(soak: &PhaseReport, quiet: Option<&PhaseReport>) -> Verdict {
    let mut problems = Vec::new();
    for (label, r) in std::iter::once(("", soak)).chain(quiet.map(|q| ("quiet run: ", q))) {
        match (r.at_stop.rounds_committed, r.at_stop.rounds_abandoned) {
            (Some(c), Some(a)) => {
                if c == 0 {
                    problems.push(format!("{label}no round committed"));
                }
                if a > 0 {
                    problems.push(format!("{label}{a} round(s) abandoned"));
                }
            }
            _ => problems.push(format!("{label}/metrics has no round counters")),
        }
        if r.rounds_stuck > 0 {
            problems.push(format!(
                "{label}{} round(s) stuck (open longer than 3x the deadline; longest {:.1} s)",
                r.rounds_stuck, r.longest_round_secs
            ));
        }
        if r.tally.honest_accepted == 0 {
            problems.push(format!("{label}no honest update was accepted"));
        }
        if !r.drain.ok {
            problems.push(format!(
                "{label}after the traffic stopped, round {} did not close and a later round \
                 commit (open round {}, version {} -> {})",
                r.drain.from_round, r.drain.to_round, r.drain.from_version, r.drain.to_version
            ));
        }
        if let Some(n) = r.at_end.in_flight.filter(|&n| n != 0.0) {
            problems.push(format!(
                "{label}{n} upload(s) still in flight after the traffic stopped ({})",
                r.at_end.in_flight_metrics.join(", ")
            ));
        }
        let bad = r.tally.malformed_accepted();
        if bad > 0 {
            problems.push(format!("{label}{bad} malformed upload(s) accepted"));
        }
        if r.tally.slow_uncut > 0 {
            problems.push(format!(
                "{label}{} slow connection(s) not cut within their timeout + {CUT_GRACE_SECS} s",
                r.tally.slow_uncut
            ));
        }
    }
    let rss_ratio = match (soak.peak_rss_mib, quiet.and_then(|q| q.peak_rss_mib)) {
        (Some(s), Some(q)) if q > 0.0 => Some(s / q),
        _ => None,
    };
    if let Some(r) = rss_ratio.filter(|&r| r > 2.0) {
        problems.push(format!(
            "server peak RSS is {r:.2}x the quiet run's (limit 2x)"
        ));
    }
    if quiet.is_some() && rss_ratio.is_none() {
        problems.push("the server's peak RSS could not be read".into());
    }
    Verdict {
        pass: problems.is_empty(),
        problems,
        rss_ratio,
    }
}

/// A value of `key` (e.g. `VmRSS`) in a `/proc/<pid>/status` text, in KiB.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The current resident memory of a process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(status_kib(&status, "VmRSS")? as f64 / 1024.0)
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSample {
    /// The metric's name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// Parses the Prometheus text format, skipping comments and lines it cannot read.
pub fn parse_metrics(text: &str) -> Vec<MetricSample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = match l.rfind('}') {
                Some(close) => (&l[..=close], l[close + 1..].trim()),
                None => l.split_once(char::is_whitespace)?,
            };
            // A timestamp may follow the value.
            let value: f64 = value.split_whitespace().next()?.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            let name = name.trim();
            (!name.is_empty()).then(|| MetricSample {
                name: name.to_string(),
                labels,
                value,
            })
        })
        .collect()
}

/// `a="x",b="y"` into a map (escapes in values are kept as written).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once('=') {
        let Some(after) = after.trim_start().strip_prefix('"') else {
            break;
        };
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(end) = end else { break };
        out.insert(
            key.trim().trim_start_matches(',').trim().to_string(),
            after[..end].to_string(),
        );
        rest = &after[end + 1..];
    }
    out
}

/// The counters a soak reads from `/metrics`.
pub fn server_counters(samples: &[MetricSample]) -> ServerCounters {
    let mut c = ServerCounters::default();
    let mut in_flight = None::<f64>;
    for s in samples {
        let outcome = s.labels.get("outcome").map(String::as_str);
        match (s.name.as_str(), outcome) {
            ("starling_rounds_total", Some("committed")) => {
                c.rounds_committed = Some(s.value as u64)
            }
            ("starling_rounds_total", Some("abandoned")) => {
                c.rounds_abandoned = Some(s.value as u64)
            }
            ("starling_updates_total", Some(o)) => {
                *c.updates.entry(o.to_string()).or_default() += s.value as u64;
            }
            ("starling_connections_open", _) => c.connections_open = Some(s.value as u64),
            ("starling_connections_refused_total", _) => {
                c.connections_refused = Some(s.value as u64);
            }
            (name, _) if name.contains("in_flight") => {
                *in_flight.get_or_insert(0.0) += s.value;
                if !c.in_flight_metrics.iter().any(|n| n == name) {
                    c.in_flight_metrics.push(name.to_string());
                }
            }
            _ => {}
        }
    }
    c.in_flight = in_flight;
    c
}

/// Watches the open round's number and counts rounds that stay open too long.
#[derive(Debug, Clone)]
pub struct RoundWatch {
    limit_secs: f64,
    current: Option<u64>,
    since: f64,
    flagged: bool,
    /// Rounds that stayed open longer than the limit.
    pub stuck: u64,
    /// The longest a round stayed open, seconds (as far as seen).
    pub longest_secs: f64,
}

impl RoundWatch {
    /// A watch that calls a round stuck after `limit_secs`.
    pub fn new(limit_secs: f64) -> Self {
        Self {
            limit_secs,
            current: None,
            since: 0.0,
            flagged: false,
            stuck: 0,
            longest_secs: 0.0,
        }
    }

    /// The open round is `round` at `t_secs`.
    pub fn observe(&mut self, round: u64, t_secs: f64) {
        match self.current {
            Some(r) if r == round => {}
            Some(_) => {
                self.longest_secs = self.longest_secs.max(t_secs - self.since);
                self.current = Some(round);
                self.since = t_secs;
                self.flagged = false;
            }
            None => {
                self.current = Some(round);
                self.since = t_secs;
            }
        }
        let open = t_secs - self.since;
        self.longest_secs = self.longest_secs.max(open);
        if open > self.limit_secs && !self.flagged {
            self.flagged = true;
            self.stuck += 1;
        }
    }
}

/// The head of an HTTP/1.1 upload, without the blank line that ends it.
fn upload_head(host: &str, round: u64, token: Option<&str>, content_length: usize) -> String {
    let mut h = format!(
        "POST /v1/tasks/{TASK}/rounds/{round}/updates HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {content_length}\r\n"
    );
    if let Some(t) = token {
        h.push_str(&format!("{}: {t}\r\n", protocol::TOKEN_HEADER));
    }
    h
}

/// The status code of an HTTP/1.1 answer's first bytes.
fn answer_status(bytes: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(bytes.get(..bytes.len().min(32))?).ok()?;
    let mut parts = line.strip_prefix("HTTP/1.")?.split(' ');
    parts.next()?;
    parts.next()?.parse().ok()
}

/// SplitMix64: the load generator's seeded randomness.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Small random deltas in `layout`.
fn random_delta(layout: &Layout, rng: &mut Rng) -> Parameters {
    Parameters::new(
        layout
            .entries()
            .iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let data = (0..n).map(|_| (rng.unit() as f32 - 0.5) * 2e-3).collect();
                (
                    name.clone(),
                    Tensor::new(shape.clone(), data).expect("the layout's shape"),
                )
            })
            .collect(),
    )
    .expect("the layout's names are unique")
}

/// The ways an upload is malformed, and the code each should be refused with.
const MALFORMED: [(&str, &str); 7] = [
    ("garbage", "malformed_update"),
    ("nan", "not_finite"),
    ("wrong_shape", "wrong_tensors"),
    ("truncated", "malformed_update"),
    ("zero_examples", "invalid_examples"),
    ("token_mismatch", "invalid_token"),
    ("missing_token", "missing_token"),
];

/// The ways an upload is aborted.
const ABORTS: [&str; 4] = ["full_fin", "full_rst", "mid_fin", "mid_rst"];

/// The slow client kinds.
const SLOW: [&str; 3] = ["slow_headers", "slow_body_bogus_token", "slow_body"];

/// A malformed body of the kind `MALFORMED[kind]` for an assignment, and whether to send the
/// token header.
fn malformed_body(
    kind: usize,
    valid: &Parameters,
    wrong_shape: &Parameters,
    meta: &UpdateMeta,
    rng: &mut Rng,
) -> (Vec<u8>, bool) {
    match MALFORMED[kind % MALFORMED.len()].0 {
        "garbage" => {
            let len = update::encode(valid, meta).len();
            let mut b: Vec<u8> = (0..len.div_ceil(8))
                .flat_map(|_| rng.next_u64().to_le_bytes())
                .collect();
            b.truncate(len);
            (b, true)
        }
        "nan" => {
            let mut b = update::encode(valid, meta);
            let header = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
            let at = 8 + header;
            b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            (b, true)
        }
        "wrong_shape" => (update::encode(wrong_shape, meta), true),
        "truncated" => {
            let mut b = update::encode(valid, meta);
            b.truncate(b.len() / 2);
            (b, true)
        }
        "zero_examples" => (
            update::encode(
                valid,
                &UpdateMeta {
                    examples: 0,
                    ..meta.clone()
                },
            ),
            true,
        ),
        "token_mismatch" => (
            update::encode(
                valid,
                &UpdateMeta {
                    token: meta.token.chars().rev().collect::<String>() + "0",
                    ..meta.clone()
                },
            ),
            true,
        ),
        _ => (update::encode(valid, meta), false),
    }
}

/// What every actor of a run shares.
struct Env {
    http: reqwest::Client,
    base: String,
    addr: SocketAddr,
    host: String,
    /// The open round, as last polled.
    round: AtomicU64,
    deltas: Vec<Parameters>,
    wrong_shape: Parameters,
    abort_fraction: f64,
    malformed_fraction: f64,
    header_timeout_secs: f64,
    body_timeout_secs: f64,
}

/// One actor's handles: the shared environment, its tally, and the stop signal.
#[derive(Clone)]
struct Actor {
    env: Arc<Env>,
    tally: Arc<Mutex<Tally>>,
    stop: watch::Receiver<bool>,
}

impl Actor {
    fn count(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut self.tally.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps for `d` unless the run stops first; true when it stopped.
    async fn pause(&mut self, d: Duration) -> bool {
        if self.stopped() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopped(),
            _ = self.stop.changed() => true,
        }
    }

    /// Checks in as `device`; `None` when it failed (counted).
    async fn check_in(&self, device: &str) -> Option<CheckInAnswer> {
        let body = CheckInRequest {
            device: Some(device.to_string()),
        };
        let url = format!("{}/v1/tasks/{TASK}/checkin", self.env.base);
        let answer = async {
            let r = self.env.http.post(&url).json(&body).send().await?;
            let status = r.status();
            let text = r.text().await?;
            serde_json::from_str::<CheckInAnswer>(&text)
                .map_err(|_| BenchError::Server(format!("check-in answered {status}: {text}")))
        }
        .await;
        match answer {
            Ok(a) => {
                self.count(|t| match a {
                    CheckInAnswer::Assigned { .. } => t.checkins_assigned += 1,
                    CheckInAnswer::Retry { .. } => t.checkins_retry += 1,
                });
                Some(a)
            }
            Err(e) => {
                self.count(|t| {
                    t.checkin_errors += 1;
                    t.error_chain("check-in", &e);
                });
                None
            }
        }
    }

    /// Checks in until assigned: `(round, base_version, token)`, or `None` once stopped.
    async fn assignment(&mut self, device: &str) -> Option<(u64, u64, String)> {
        while !self.stopped() {
            let wait = match self.check_in(device).await {
                Some(CheckInAnswer::Assigned {
                    round,
                    base_version,
                    token,
                    ..
                }) => return Some((round, base_version, token)),
                Some(CheckInAnswer::Retry {
                    retry_after_secs, ..
                }) => retry_after_secs.clamp(0.05, 2.0),
                None => 1.0,
            };
            if self.pause(Duration::from_secs_f64(wait)).await {
                break;
            }
        }
        None
    }

    async fn download_model(&self) -> bool {
        let url = format!("{}/v1/tasks/{TASK}/model", self.env.base);
        let ok = async {
            let r = self.env.http.get(&url).send().await?.error_for_status()?;
            Ok::<_, reqwest::Error>(!r.bytes().await?.is_empty())
        }
        .await;
        self.count(|t| match &ok {
            Ok(true) => t.model_downloads += 1,
            Ok(false) => {
                t.model_errors += 1;
                t.error("the model download was empty");
            }
            Err(e) => {
                t.model_errors += 1;
                t.error_chain("model download", e);
            }
        });
        matches!(ok, Ok(true))
    }

    /// Posts an upload; the answer's status and error code (`accepted` for 202) and its
    /// `Retry-After`, or the transport error.
    async fn post_upload(
        &self,
        round: u64,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(u16, String, Option<f64>), reqwest::Error> {
        let url = format!("{}/v1/tasks/{TASK}/rounds/{round}/updates", self.env.base);
        let mut req = self
            .env
            .http
            .post(url)
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(t) = token {
            req = req.header(protocol::TOKEN_HEADER, t);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok());
        let text = r.text().await.unwrap_or_default();
        let code = if status == 202 {
            "accepted".to_string()
        } else {
            serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error.code)
                .unwrap_or_else(|_| format!("http_{status}"))
        };
        Ok((status, code, retry_after))
    }

    async fn honest_upload(&mut self, round: u64, meta: UpdateMeta, rng: &mut Rng) {
        let delta = &self.env.deltas[rng.below(self.env.deltas.len() as u64) as usize];
        let body = update::encode(delta, &meta);
        self.count(|t| t.honest_sent += 1);
        for _ in 0..5 {
            match self
                .post_upload(round, Some(&meta.token), body.clone())
                .await
            {
                Ok((202, _, _)) => {
                    self.count(|t| t.honest_accepted += 1);
                    return;
                }
                Ok((status, code, retry_after)) => {
                    let busy = code == "busy" || status == 503;
                    self.count(|t| {
                        bump(&mut t.honest_refused, &code);
                        if !busy && !matches!(code.as_str(), "round_closed" | "stale_version") {
                            t.error(format!("honest upload refused: {status} {code}"));
                        }
                    });
                    let wait = retry_after.unwrap_or(0.5).clamp(0.05, 2.0);
                    if !busy || self.pause(Duration::from_secs_f64(wait)).await {
                        return;
                    }
                }
                Err(e) => {
                    self.count(|t| {
                        t.honest_transport_errors += 1;
                        t.error_chain("honest upload", &e);
                    });
                    return;
                }
            }
        }
    }

    async fn malformed_upload(&self, round: u64, meta: UpdateMeta, rng: &mut Rng) {
        let kind = rng.below(MALFORMED.len() as u64) as usize;
        let delta = &self.env.deltas[0];
        let (body, with_token) = malformed_body(kind, delta, &self.env.wrong_shape, &meta, rng);
        let token = with_token.then_some(meta.token.as_str());
        let outcome = match self.post_upload(round, token, body).await {
            Ok((_, code, _)) => code,
            Err(_) => "transport".to_string(),
        };
        let name = MALFORMED[kind].0;
        self.count(|t| {
            bump(t.malformed.entry(name.into()).or_default(), &outcome);
            if outcome == "accepted" {
                t.error(format!("a malformed upload ({name}) was accepted"));
            }
        });
    }

    /// Writes an upload on a raw connection and hangs up without reading the answer.
    async fn aborted_upload(&self, round: u64, meta: UpdateMeta, rng: &mut Rng) {
        let kind = ABORTS[rng.below(ABORTS.len() as u64) as usize];
        let body = update::encode(&self.env.deltas[0], &meta);
        let cut = if kind.starts_with("mid") {
            body.len() * (1 + rng.below(9) as usize) / 10
        } else {
            body.len()
        };
        let head = upload_head(&self.env.host, round, Some(&meta.token), body.len()) + "\r\n";
        let written = tokio::time::timeout(Duration::from_secs(30), async {
            let mut s = TcpStream::connect(self.env.addr).await?;
            s.write_all(head.as_bytes()).await?;
            s.write_all(&body[..cut]).await?;
            s.flush().await?;
            if kind.ends_with("rst") {
                s.set_zero_linger()?;
            } else {
                s.shutdown().await?;
            }
            drop(s);
            Ok::<_, std::io::Error>(())
        })
        .await;
        self.count(|t| match written {
            Ok(Ok(())) => bump(&mut t.aborted, kind),
            Ok(Err(e)) => {
                t.abort_errors += 1;
                t.error(format!("aborted upload ({kind}): {e}"));
            }
            Err(_) => {
                t.abort_errors += 1;
                t.error(format!("aborted upload ({kind}): timed out"));
            }
        });
    }
}

/// A device loop: check in, download the model when it changed, train, upload.
async fn device(mut a: Actor, id: String, seed: u64, faulty: bool) {
    let mut rng = Rng(seed);
    let mut known_version = None;
    while let Some((round, base_version, token)) = a.assignment(&id).await {
        if known_version != Some(base_version) && a.download_model().await {
            known_version = Some(base_version);
        }
        let train = Duration::from_millis(100 + rng.below(200));
        if a.pause(train).await {
            break;
        }
        let meta = UpdateMeta {
            base_version,
            examples: 10 + rng.below(90),
            loss: Some(0.5 + rng.unit() as f32),
            accuracy: None,
            token,
        };
        let r = rng.unit();
        if faulty && r < a.env.abort_fraction {
            a.aborted_upload(round, meta, &mut rng).await;
        } else if faulty && r < a.env.abort_fraction + a.env.malformed_fraction {
            a.malformed_upload(round, meta, &mut rng).await;
        } else {
            a.honest_upload(round, meta, &mut rng).await;
        }
    }
}

/// How one slow connection ended, and after how many seconds.
enum SlowEnd {
    Answered(u16, f64),
    Closed(f64),
    Reset(f64),
    OpenAtStop(f64),
    GaveUp,
}

/// A slow client: one connection after another of its kind, each trickling a few bytes per
/// half second until the server ends it or the run stops.
async fn slow_client(mut a: Actor, index: usize, seed: u64) {
    let kind = SLOW[index % SLOW.len()];
    let device = format!("slow-{index}");
    let mut rng = Rng(seed);
    let limit = match kind {
        "slow_headers" => a.env.header_timeout_secs,
        _ => a.env.body_timeout_secs,
    } + CUT_GRACE_SECS;
    while !a.stopped() {
        // What to send at once, then what to trickle.
        let (head, trickle): (String, Vec<u8>) = match kind {
            "slow_headers" => {
                let round = a.env.round.load(Ordering::Relaxed).max(1);
                (
                    String::new(),
                    upload_head(&a.env.host, round, None, 1).into_bytes(),
                )
            }
            "slow_body_bogus_token" => {
                // The open round, so that only the token is wrong.
                let url = format!("{}/v1/tasks/{TASK}", a.env.base);
                if let Ok((round, _)) = poll_status(&a.env.http, &url).await {
                    a.env.round.store(round, Ordering::Relaxed);
                }
                let token: String = (0..4)
                    .map(|_| format!("{:08x}", rng.next_u64() as u32))
                    .collect();
                let body = update::encode(
                    &a.env.deltas[0],
                    &UpdateMeta {
                        base_version: 0,
                        examples: 10,
                        loss: None,
                        accuracy: None,
                        token: token.clone(),
                    },
                );
                let round = a.env.round.load(Ordering::Relaxed).max(1);
                let head = upload_head(&a.env.host, round, Some(&token), body.len()) + "\r\n";
                (head, body)
            }
            _ => {
                let Some((round, base_version, token)) = a.assignment(&device).await else {
                    break;
                };
                let meta = UpdateMeta {
                    base_version,
                    examples: 10,
                    loss: None,
                    accuracy: None,
                    token,
                };
                let body = update::encode(&a.env.deltas[0], &meta);
                let head = upload_head(&a.env.host, round, Some(&meta.token), body.len()) + "\r\n";
                (head, body)
            }
        };
        let end = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(a.env.addr))
            .await
        {
            Ok(Ok(s)) => trickle_until_cut(&mut a, s, head, trickle, limit * 3.0).await,
            _ => {
                a.count(|t| bump(t.slow.entry(kind.into()).or_default(), "connect_failed"));
                if a.pause(Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        a.count(|t| {
            let (outcome, secs) = match end {
                SlowEnd::Answered(s, secs) => (format!("answered_{s}"), Some(secs)),
                SlowEnd::Closed(secs) => ("closed".into(), Some(secs)),
                SlowEnd::Reset(secs) => ("reset".into(), Some(secs)),
                SlowEnd::OpenAtStop(secs) => {
                    if secs > limit {
                        t.slow_uncut += 1;
                    }
                    ("open_at_stop".into(), None)
                }
                SlowEnd::GaveUp => {
                    t.slow_uncut += 1;
                    ("gave_up".into(), None)
                }
            };
            bump(t.slow.entry(kind.into()).or_default(), &outcome);
            if let Some(secs) = secs {
                t.slow_cut_secs.entry(kind.into()).or_default().push(secs);
            }
        });
        if a.pause(Duration::from_millis(500 + rng.below(500))).await {
            break;
        }
    }
}

/// Sends `head` at once, then `trickle` a few bytes at a time (for headers, padding header
/// lines follow forever), until the server answers or hangs up, the run stops, or
/// `give_up_secs` pass. Times count from the end of `head`.
async fn trickle_until_cut(
    a: &mut Actor,
    stream: TcpStream,
    head: String,
    trickle: Vec<u8>,
    give_up_secs: f64,
) -> SlowEnd {
    let (mut rd, mut wr) = stream.into_split();
    let endless = head.is_empty();
    if !head.is_empty() && wr.write_all(head.as_bytes()).await.is_err() {
        return SlowEnd::Reset(0.0);
    }
    let started = Instant::now();
    let mut pending = trickle;
    let mut at = 0usize;
    let mut pad = 0u64;
    let mut buf = [0u8; 256];
    loop {
        let secs = started.elapsed().as_secs_f64();
        if secs > give_up_secs {
            return SlowEnd::GaveUp;
        }
        tokio::select! {
            r = rd.read(&mut buf) => {
                let secs = started.elapsed().as_secs_f64();
                return match r {
                    Ok(0) => SlowEnd::Closed(secs),
                    Ok(n) => match answer_status(&buf[..n]) {
                        Some(s) => SlowEnd::Answered(s, secs),
                        None => SlowEnd::Closed(secs),
                    },
                    Err(_) => SlowEnd::Reset(secs),
                };
            }
            _ = a.stop.changed() => return SlowEnd::OpenAtStop(started.elapsed().as_secs_f64()),
            _ = tokio::time::sleep(TRICKLE_EVERY) => {
                if at >= pending.len() {
                    if !endless {
                        // The whole body went out: wait for the answer.
                        continue;
                    }
                    pending = format!("x-slow-{pad}: {pad}\r\n").into_bytes();
                    pad += 1;
                    at = 0;
                }
                let end = (at + TRICKLE_BYTES).min(pending.len());
                if wr.write_all(&pending[at..end]).await.is_err() {
                    return SlowEnd::Reset(started.elapsed().as_secs_f64());
                }
                at = end;
            }
        }
        if a.stopped() {
            return SlowEnd::OpenAtStop(started.elapsed().as_secs_f64());
        }
    }
}

/// The open round's number and the model version.
async fn poll_status(http: &reqwest::Client, task_url: &str) -> Result<(u64, u64), BenchError> {
    let v = task_status(http, task_url).await?;
    let round = v["round"]["round"]
        .as_u64()
        .ok_or_else(|| BenchError::Server(format!("no round in {v}")))?;
    Ok((round, v["version"].as_u64().unwrap_or(0)))
}

/// `GET /v1/tasks/{task}`.
async fn task_status(http: &reqwest::Client, task_url: &str) -> Result<Value, BenchError> {
    Ok(http
        .get(task_url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn scrape(http: &reqwest::Client, base: &str) -> ServerCounters {
    let text = async {
        http.get(format!("{base}/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
    .await;
    text.map(|t| server_counters(&parse_metrics(&t)))
        .unwrap_or_default()
}

/// Stops a run's actors: signals, waits a little, then aborts whatever is left.
async fn stop_actors(stop: &watch::Sender<bool>, set: &mut JoinSet<()>) {
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.shutdown().await;
}

fn summarise_slow(t: &Tally) -> Vec<SlowSummary> {
    t.slow
        .iter()
        .map(|(kind, ended)| {
            let mut secs = t.slow_cut_secs.get(kind).cloned().unwrap_or_default();
            secs.sort_by(f64::total_cmp);
            SlowSummary {
                kind: kind.clone(),
                ended: ended.clone(),
                p50_cut_secs: quantile(&secs, 0.5),
                max_cut_secs: secs.last().copied().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

/// One run on a fresh server: `faulty` adds aborted and malformed uploads and slow clients.
async fn run_phase(
    o: &SoakOptions,
    faulty: bool,
    progress: &mut impl FnMut(&Progress),
) -> Result<PhaseReport, BenchError> {
    let phase = if faulty { "soak" } else { "quiet" };
    let server = ServerProcess::start(&o.exe, &o.config())?;
    let host = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let addr: SocketAddr = host
        .parse()
        .map_err(|_| BenchError::Server(format!("cannot read the address in {}", server.url)))?;
    if !addr.ip().is_loopback() {
        return Err(BenchError::Server(format!(
            "{addr} is not a loopback address"
        )));
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()?;
    let task_url = format!("{}/v1/tasks/{TASK}", server.url);
    let task: Value = http
        .get(&task_url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let model = http
        .get(format!("{task_url}/model"))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let layout = checkpoint::decode(&model)
        .map_err(|e| BenchError::Server(format!("the served model does not decode: {e}")))?
        .spec
        .layout();
    let parameter_count = task["parameter_count"]
        .as_u64()
        .map_or(layout.numel(), |n| n as usize);
    let mut rng = Rng(o.seed);
    let deltas: Vec<Parameters> = (0..4).map(|_| random_delta(&layout, &mut rng)).collect();
    let wrong_layout = Layout::new(
        layout
            .entries()
            .iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let mut s = s.clone();
                if i == 0 {
                    s[0] = if s[0] > 1 { s[0] - 1 } else { 2 };
                }
                (n.clone(), s)
            })
            .collect(),
    );
    let wrong_shape = random_delta(&wrong_layout, &mut rng);
    let update_bytes = update::encode(
        &deltas[0],
        &UpdateMeta {
            base_version: 0,
            examples: 10,
            loss: Some(0.5),
            accuracy: None,
            token: "0".repeat(32),
        },
    )
    .len();
    let env = Arc::new(Env {
        http: http.clone(),
        base: server.url.clone(),
        addr,
        host,
        round: AtomicU64::new(0),
        deltas,
        wrong_shape,
        abort_fraction: o.abort_fraction,
        malformed_fraction: o.malformed_fraction,
        header_timeout_secs: o.header_timeout_secs,
        body_timeout_secs: o.body_timeout_secs,
    });

    // The traffic.
    let (stop, stop_rx) = watch::channel(false);
    let actor = Actor {
        env: env.clone(),
        tally: Arc::new(Mutex::new(Tally::default())),
        stop: stop_rx,
    };
    let mut set = JoinSet::new();
    for i in 0..o.devices {
        let seed = o.seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
        set.spawn(device(actor.clone(), format!("soak-{i}"), seed, faulty));
    }
    if faulty {
        for i in 0..o.slow_clients {
            let seed = o.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            set.spawn(slow_client(actor.clone(), i, seed));
        }
    }
    let pid = server.pid();
    let started = Instant::now();
    let mut watch = RoundWatch::new(3.0 * o.deadline_secs);
    let mut rss = Vec::new();
    let (mut poll_errors, mut first_version, mut last) = (0u64, None, (0u64, 0u64));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64();
        let now_rss = rss_mib(pid);
        if let Some(m) = now_rss {
            rss.push(RssSample {
                t_secs: t,
                rss_mib: m,
            });
        }
        match poll_status(&http, &task_url).await {
            Ok((round, version)) => {
                env.round.store(round, Ordering::Relaxed);
                watch.observe(round, started.elapsed().as_secs_f64());
                first_version.get_or_insert(version);
                last = (round, version);
            }
            Err(_) => poll_errors += 1,
        }
        progress(&Progress {
            phase,
            elapsed_secs: t.min(o.secs),
            total_secs: o.secs,
            round: last.0,
            version: last.1,
            rss_mib: now_rss,
            accepted: actor.tally.lock().map_or(0, |t| t.honest_accepted),
            stuck: watch.stuck,
        });
        if t >= o.secs {
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    stop_actors(&stop, &mut set).await;
    let tally = actor
        .tally
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let at_stop = scrape(&http, &server.url).await;

    // The drain: clean devices until the round open at the stop closed and a later one
    // committed.
    let (from_round, from_version) = poll_status(&http, &task_url).await.unwrap_or(last);
    let bound = 3.0 * o.deadline_secs + o.body_timeout_secs + o.header_timeout_secs + 10.0;
    let (drain_stop, drain_rx) = watch::channel(false);
    let drainer = Actor {
        env,
        tally: Arc::new(Mutex::new(Tally::default())),
        stop: drain_rx,
    };
    for i in 0..o.goal as usize + 5 {
        set.spawn(device(
            drainer.clone(),
            format!("drain-{i}"),
            o.seed ^ (i as u64 + 7).wrapping_mul(0xD1B5_4A32_D192_ED03),
            false,
        ));
    }
    let drain_started = Instant::now();
    let mut now = (from_round, from_version);
    let mut ok = false;
    while drain_started.elapsed().as_secs_f64() < bound {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(s) = poll_status(&http, &task_url).await {
            now = s;
        }
        ok = now.0 >= from_round + 2 && now.1 > from_version;
        progress(&Progress {
            phase: "drain",
            elapsed_secs: drain_started.elapsed().as_secs_f64(),
            total_secs: bound,
            round: now.0,
            version: now.1,
            rss_mib: rss_mib(pid),
            accepted: drainer.tally.lock().map_or(0, |t| t.honest_accepted),
            stuck: watch.stuck,
        });
        if ok {
            break;
        }
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    stop_actors(&drain_stop, &mut set).await;
    // Let the server finish what the drain's hang-ups left.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_end = scrape(&http, &server.url).await;
    let final_round = task_status(&http, &task_url)
        .await
        .map_or(Value::Null, |v| v["round"].clone());
    let drained = drainer
        .tally
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let peak_rss_mib = peak_rss_mib(pid);
    drop(server);

    Ok(PhaseReport {
        phase: phase.into(),
        secs,
        parameter_count,
        update_bytes,
        versions_committed: last.1.saturating_sub(first_version.unwrap_or(last.1)),
        at_stop,
        at_end,
        rounds_stuck: watch.stuck,
        longest_round_secs: watch.longest_secs,
        poll_errors,
        slow: summarise_slow(&tally),
        tally,
        drain: DrainReport {
            from_round,
            to_round: now.0,
            from_version,
            to_version: now.1,
            ok,
            secs: drain_secs,
            accepted: drained.honest_accepted,
            checkins: (drained.checkins_assigned, drained.checkins_retry),
            refused: drained.honest_refused,
            final_round,
        },
        rss,
        peak_rss_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_from_proc_status() {
        let status = "Name:\tstarling\nVmPeak:\t  123456 kB\nVmHWM:\t   80000 kB\n\
                      VmRSS:\t   65536 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(65536));
        assert_eq!(status_kib(status, "VmHWM"), Some(80000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        // A prefix of another key is not the key.
        assert_eq!(status_kib("VmRSSx:\t 5 kB\n", "VmRSS"), None);
        let me = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if !me.is_empty() {
            assert!(status_kib(&me, "VmRSS").unwrap() > 0);
        }
    }

    #[test]
    fn parses_prometheus_text_tolerantly() {
        let text = "# HELP starling_rounds_total Rounds closed.\n\
                    # TYPE starling_rounds_total counter\n\
                    starling_rounds_total{outcome=\"committed\"} 41\n\
                    starling_rounds_total{outcome=\"abandoned\"} 0\n\
                    starling_updates_total{outcome=\"accepted\"} 800\n\
                    starling_updates_total{outcome=\"not_finite\"} 12\n\
                    starling_updates_total{outcome=\"busy\", task=\"a,b\"} 3 1700000000000\n\
                    starling_uploads_in_flight 0\n\
                    starling_round_in_flight{task=\"soak\"} 2\n\
                    garbage line\n\
                    \n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[4].labels["task"], "a,b");
        assert_eq!(samples[4].value, 3.0);
        let c = server_counters(&samples);
        assert_eq!(c.rounds_committed, Some(41));
        assert_eq!(c.rounds_abandoned, Some(0));
        assert_eq!(c.updates["accepted"], 800);
        assert_eq!(c.updates["not_finite"], 12);
        assert_eq!(c.updates["busy"], 3);
        assert_eq!(c.in_flight, Some(2.0));
        assert_eq!(c.in_flight_metrics.len(), 2);

        let none = server_counters(&parse_metrics("starling_model_version{task=\"x\"} 3\n"));
        assert_eq!(none.in_flight, None);
        assert_eq!(none.rounds_committed, None);
    }

    #[test]
    fn a_round_open_too_long_is_stuck_once() {
        let mut w = RoundWatch::new(30.0);
        w.observe(1, 0.0);
        w.observe(1, 10.0);
        w.observe(2, 12.0);
        assert_eq!((w.stuck, w.longest_secs), (0, 12.0));
        w.observe(2, 40.0);
        w.observe(2, 43.0);
        w.observe(2, 50.0);
        assert_eq!(w.stuck, 1, "one stuck round, counted once");
        w.observe(3, 51.0);
        w.observe(3, 80.0);
        assert_eq!(w.stuck, 1);
        assert_eq!(w.longest_secs, 39.0);
    }

    #[test]
    fn malformed_bodies_fail_the_way_they_are_named() {
        let layout = Layout::new(vec![("W".into(), vec![6, 3]), ("b".into(), vec![3])]);
        let mut rng = Rng(7);
        let valid = random_delta(&layout, &mut rng);
        let wrong = random_delta(
            &Layout::new(vec![("W".into(), vec![5, 3]), ("b".into(), vec![3])]),
            &mut rng,
        );
        let meta = UpdateMeta {
            base_version: 0,
            examples: 10,
            loss: None,
            accuracy: None,
            token: "ab".repeat(16),
        };
        assert!(update::decode(&update::encode(&valid, &meta), &layout, None).is_ok());
        for (kind, (name, _)) in MALFORMED.iter().enumerate() {
            let (body, with_token) = malformed_body(kind, &valid, &wrong, &meta, &mut rng);
            let decoded = update::decode(&body, &layout, None);
            match *name {
                "nan" => assert!(matches!(decoded, Err(update::UpdateError::NotFinite(_)))),
                "zero_examples" => {
                    assert!(matches!(decoded, Err(update::UpdateError::NoExamples(0))))
                }
                "garbage" | "truncated" | "wrong_shape" => assert!(decoded.is_err(), "{name}"),
                "token_mismatch" => assert_ne!(decoded.unwrap().meta.token, meta.token),
                "missing_token" => assert!(!with_token && decoded.is_ok()),
                other => panic!("untested kind {other}"),
            }
            assert_eq!(with_token, *name != "missing_token");
        }
    }

    #[test]
    fn raw_requests_and_answers() {
        let head = upload_head("127.0.0.1:9", 4, Some("t0k"), 10) + "\r\n";
        assert!(head.starts_with("POST /v1/tasks/soak/rounds/4/updates HTTP/1.1\r\n"));
        assert!(head.contains("\r\nContent-Length: 10\r\n"));
        assert!(head.contains(&format!("\r\n{}: t0k\r\n", protocol::TOKEN_HEADER)));
        assert!(head.ends_with("\r\n\r\n"));
        assert_eq!(
            answer_status(b"HTTP/1.1 408 Request Timeout\r\n"),
            Some(408)
        );
        assert_eq!(answer_status(b"HTTP/1.0 503 x"), Some(503));
        assert_eq!(answer_status(b"garbage"), None);
        assert_eq!(toml_f64(10.0), "10.0");
        assert_eq!(toml_f64(0.5), "0.5");
    }

    fn phase(peak: f64) -> PhaseReport {
        PhaseReport {
            phase: "soak".into(),
            secs: 10.0,
            parameter_count: 100,
            update_bytes: 500,
            versions_committed: 5,
            at_stop: ServerCounters {
                rounds_committed: Some(5),
                rounds_abandoned: Some(0),
                ..ServerCounters::default()
            },
            at_end: ServerCounters {
                in_flight: Some(0.0),
                ..ServerCounters::default()
            },
            rounds_stuck: 0,
            longest_round_secs: 2.0,
            poll_errors: 0,
            tally: Tally {
                honest_accepted: 100,
                ..Tally::default()
            },
            slow: vec![],
            drain: DrainReport {
                ok: true,
                ..DrainReport::default()
            },
            rss: vec![],
            peak_rss_mib: Some(peak),
        }
    }

    #[test]
    fn the_verdict_names_every_problem() {
        let v = judge(&phase(30.0), Some(&phase(20.0)));
        assert!(v.pass, "{:?}", v.problems);
        assert_eq!(v.rss_ratio, Some(1.5));

        let mut bad = phase(50.0);
        bad.at_stop.rounds_abandoned = Some(2);
        bad.rounds_stuck = 1;
        bad.drain.ok = false;
        bad.at_end.in_flight = Some(3.0);
        bad.tally.slow_uncut = 4;
        bump(
            bad.tally.malformed.entry("nan".into()).or_default(),
            "accepted",
        );
        let v = judge(&bad, Some(&phase(20.0)));
        assert!(!v.pass);
        assert_eq!(v.problems.len(), 7, "{:#?}", v.problems);
        assert_eq!(v.rss_ratio, Some(2.5));

        // Without a quiet run there is no ratio and no RSS problem.
        let v = judge(&phase(500.0), None);
        assert!(v.pass && v.rss_ratio.is_none());
    }
}
