//! Buffered asynchronous training (FedBuff, Nguyen et al. 2022): the engine's other mode,
//! for a task with `[tasks.buffered]`. There are no synchronous rounds:
//!
//! - A device checks in whenever it is ready and gets an assignment on the current version,
//!   while fewer than `concurrency` assignments are outstanding; an assignment not delivered
//!   within `assignment_secs` lapses and frees its place.
//! - Its update may arrive after the model moved on. Its *staleness* is how many versions
//!   the model moved since the update's base version; an update staler than `max_staleness`
//!   is refused (`too_stale`), any other is folded into the buffer with its values scaled by
//!   `(1 + staleness)^-staleness_exponent` ([`starling_core::WeightedSum::accept_discounted`]).
//! - After every `buffer` (K) folded updates the buffer closes like a synchronous round: the
//!   task's strategy steps the model from it, the step is checked, stored and announced, and
//!   an empty buffer opens on the new version. Each buffer is recorded as a round.
//!
//! A buffer takes at most K reservations; an upload that finds it full waits (inside the
//! engine, not at the device) for the next buffer, so no good update is refused because
//! others were faster.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use starling_core::wire::params::Layout;
use starling_core::wire::protocol::RoundKind;

use super::partial::PartialSums;
use super::round::{AbandonReason, ClosedRound, NoRoom, RoundSummary};
use super::{EngineError, RoundInfo};
use crate::settings::BufferedPolicy;

/// One outstanding assignment.
#[derive(Debug)]
struct Outstanding {
    /// The buffer (round number) it was handed out in; uploads name it in their URL.
    round: u64,
    /// The version it was handed out on: its update may be built on this or a later one.
    base_version: u64,
    /// When it lapses (engine clock), unless its update is in flight.
    expires: Duration,
    /// Its update is being folded in.
    in_flight: bool,
    device: Option<String>,
    address: Option<IpAddr>,
}

/// The buffer being filled.
#[derive(Debug)]
struct Buffer {
    number: u64,
    base_version: u64,
    started_at_ms: i64,
    folded: u64,
    in_flight: u64,
    sums: Arc<PartialSums>,
}

/// Where an upload goes: into a buffer now, or into the next one.
#[derive(Debug)]
pub(crate) enum Slot {
    /// Fold it into `sums` with its values scaled by `discount`, then report it to `round`.
    Reserved {
        /// The partial sums of the round (buffer) it goes into.
        sums: Arc<PartialSums>,
        /// The staleness factor (1 in synchronous rounds).
        discount: f64,
        /// The round (buffer) it goes into.
        round: u64,
    },
    /// Buffer `round` has all its updates reserved: ask again when it has closed.
    Wait {
        /// The full buffer.
        round: u64,
    },
}

/// A buffered-mode task's state: its outstanding assignments and the buffer being filled.
#[derive(Debug)]
pub struct Buffered {
    policy: BufferedPolicy,
    max_per_address: u32,
    assignments: HashMap<String, Outstanding>,
    /// The outstanding assignments by lapse time, so that lapsing them costs O(log n) each
    /// rather than a scan of all at every check-in (at capacity, every check-in lapses some).
    lapses: BTreeSet<(Duration, String)>,
    devices: HashMap<String, String>,
    per_address: HashMap<IpAddr, u32>,
    /// Tokens whose update was folded recently, so that a device retrying a delivered upload
    /// hears `duplicate_update` rather than `invalid_token`.
    delivered: HashSet<String>,
    delivered_order: VecDeque<String>,
    buffer: Buffer,
    layout: Layout,
    partial_sums: usize,
}

impl Buffered {
    /// A task in buffered mode whose first buffer is round `number`, on `version`.
    pub fn new(
        policy: BufferedPolicy,
        max_per_address: u32,
        layout: &Layout,
        partial_sums: usize,
        number: u64,
        version: u64,
        now_ms: i64,
    ) -> Self {
        Self {
            buffer: Buffer {
                number,
                base_version: version,
                started_at_ms: now_ms,
                folded: 0,
                in_flight: 0,
                sums: Arc::new(PartialSums::new(layout, partial_sums)),
            },
            policy,
            max_per_address,
            assignments: HashMap::new(),
            lapses: BTreeSet::new(),
            devices: HashMap::new(),
            per_address: HashMap::new(),
            delivered: HashSet::new(),
            delivered_order: VecDeque::new(),
            layout: layout.clone(),
            partial_sums,
        }
    }

    /// The round number of the buffer being filled.
    pub fn number(&self) -> u64 {
        self.buffer.number
    }

    /// How long a new assignment stays valid.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs_f64(self.policy.assignment_secs)
    }

    /// Assignments outstanding (handed out, not delivered, not lapsed as of the last
    /// check-in).
    pub fn outstanding(&self) -> usize {
        self.assignments.len()
    }

    fn forget(&mut self, token: &str) -> Option<Outstanding> {
        let o = self.assignments.remove(token)?;
        self.lapses.remove(&(o.expires, token.to_string()));
        if let Some(d) = &o.device {
            if self.devices.get(d).is_some_and(|t| t == token) {
                self.devices.remove(d);
            }
        }
        if let Some(a) = o.address {
            if let Some(n) = self.per_address.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.per_address.remove(&a);
                }
            }
        }
        Some(o)
    }

    /// Drops the assignments that lapsed by `now`. One whose update is in flight stays (its
    /// fold ends it); should the fold fail, `released` queues it to lapse again.
    fn expire(&mut self, now: Duration) {
        while let Some((at, token)) = self.lapses.first().cloned() {
            if at > now {
                break;
            }
            self.lapses.pop_first();
            if self.assignments.get(&token).is_some_and(|o| !o.in_flight) {
                self.forget(&token);
            }
        }
    }

    /// Hands out an assignment on `version` for `token`, or says why not: at most
    /// `concurrency` outstanding, one per device id (checking in again replaces a device's
    /// undelivered assignment: it starts over on the newest version) and `max_per_address`
    /// per client address.
    pub fn assign(
        &mut self,
        token: &str,
        device: Option<&str>,
        address: Option<IpAddr>,
        version: u64,
        now: Duration,
    ) -> Result<(), NoRoom> {
        self.expire(now);
        if let Some(old) = device.and_then(|d| self.devices.get(d)).cloned() {
            if self.assignments.get(&old).is_some_and(|o| o.in_flight) {
                return Err(NoRoom::DeviceHasOne);
            }
            self.forget(&old);
        }
        if self.assignments.len() >= self.policy.concurrency as usize {
            return Err(NoRoom::Full);
        }
        if let Some(a) = address {
            if self.per_address.get(&a).copied().unwrap_or(0) >= self.max_per_address {
                return Err(NoRoom::AddressFull);
            }
            *self.per_address.entry(a).or_insert(0) += 1;
        }
        if let Some(d) = device {
            self.devices.insert(d.to_string(), token.to_string());
        }
        let expires = now + self.lifetime();
        self.lapses.insert((expires, token.to_string()));
        self.assignments.insert(
            token.to_string(),
            Outstanding {
                round: self.buffer.number,
                base_version: version,
                expires,
                in_flight: false,
                device: device.map(str::to_string),
                address,
            },
        );
        Ok(())
    }

    /// The assignment an upload to `round` with `token` delivers, if it may.
    fn check_token(&mut self, round: u64, token: &str, now: Duration) -> Result<(), EngineError> {
        match self.assignments.get(token) {
            None if self.delivered.contains(token) => Err(EngineError::Duplicate),
            None => Err(EngineError::UnknownToken(round)),
            Some(o) if o.round != round => Err(EngineError::UnknownToken(round)),
            Some(o) if o.in_flight => Err(EngineError::Duplicate),
            Some(o) if o.expires <= now => {
                self.forget(token);
                Err(EngineError::AssignmentExpired)
            }
            Some(_) => Ok(()),
        }
    }

    /// With `device` (a credential's device), whether the assignment `token` names was handed
    /// to that device. An unknown token passes here and is refused by the token check.
    pub fn check_owner(&self, token: &str, device: Option<&str>) -> Result<(), EngineError> {
        match (device, self.assignments.get(token)) {
            (Some(d), Some(o)) if o.device.as_deref() != Some(d) => {
                Err(EngineError::NotYourAssignment)
            }
            _ => Ok(()),
        }
    }

    /// Whether an upload to `round` with `token` may send its body.
    pub fn admit(&mut self, round: u64, token: &str, now: Duration) -> Result<(), EngineError> {
        self.check_token(round, token, now)
    }

    /// Checks an upload's facts against its assignment and the current `version`, and finds
    /// it a place: the buffer being filled, or (when that has all its updates reserved) the
    /// next one. An update staler than `max_staleness` is refused and its assignment ends.
    pub(crate) fn reserve(
        &mut self,
        round: u64,
        base_version: u64,
        token: &str,
        version: u64,
        now: Duration,
    ) -> Result<Slot, EngineError> {
        self.check_token(round, token, now)?;
        let o = &self.assignments[token];
        if base_version < o.base_version || base_version > version {
            return Err(EngineError::StaleVersion {
                round,
                got: base_version,
                expected: version,
            });
        }
        let staleness = version - base_version;
        if staleness > self.policy.max_staleness {
            self.forget(token);
            return Err(EngineError::TooStale {
                got: base_version,
                current: version,
                max: self.policy.max_staleness,
            });
        }
        let b = &mut self.buffer;
        if b.folded + b.in_flight >= u64::from(self.policy.buffer) {
            return Ok(Slot::Wait { round: b.number });
        }
        b.in_flight += 1;
        self.assignments
            .get_mut(token)
            .expect("checked above")
            .in_flight = true;
        Ok(Slot::Reserved {
            sums: b.sums.clone(),
            discount: self.policy.discount(staleness),
            round: b.number,
        })
    }

    /// An update reserved into buffer `round` is in its sum: its assignment is done.
    pub fn folded(&mut self, round: u64, token: &str) {
        if self.assignments.get(token).is_some_and(|o| o.in_flight) {
            self.forget(token);
            if self.delivered_order.len() >= 4 * self.policy.concurrency.max(16) as usize {
                if let Some(old) = self.delivered_order.pop_front() {
                    self.delivered.remove(&old);
                }
            }
            self.delivered.insert(token.to_string());
            self.delivered_order.push_back(token.to_string());
            if round == self.buffer.number {
                self.buffer.in_flight -= 1;
                self.buffer.folded += 1;
            }
        }
    }

    /// An update reserved into buffer `round` failed to fold: its assignment may try again.
    pub fn released(&mut self, round: u64, token: &str) {
        if let Some(o) = self.assignments.get_mut(token) {
            if o.in_flight {
                o.in_flight = false;
                // It may have lapsed in flight (and left the queue): it lapses again.
                self.lapses.insert((o.expires, token.to_string()));
                if round == self.buffer.number {
                    self.buffer.in_flight -= 1;
                }
            }
        }
    }

    /// Whether the buffer holds its K updates (and so nothing is in flight into it).
    pub fn is_full(&self) -> bool {
        self.buffer.folded >= u64::from(self.policy.buffer)
    }

    /// The buffer so far, for its record.
    pub fn summary(&self) -> RoundSummary {
        RoundSummary {
            number: self.buffer.number,
            kind: RoundKind::Training,
            base_version: self.buffer.base_version,
            started_at_ms: self.buffer.started_at_ms,
            updates: self.buffer.folded,
        }
    }

    /// Closes the buffer: a commit when it is full, an abandonment below the minimum
    /// otherwise. Open the next with [`Buffered::reopen`] once the model has moved on.
    pub fn close(&self) -> (RoundSummary, ClosedRound) {
        let summary = self.summary();
        let closed = if self.is_full() {
            ClosedRound::Commit {
                sum: self.buffer.sums.merged(),
            }
        } else {
            ClosedRound::Abandon {
                updates: self.buffer.folded,
                reason: AbandonReason::BelowMinimum,
            }
        };
        (summary, closed)
    }

    /// Opens round `number` on `version` with an empty buffer; outstanding assignments stay.
    pub fn reopen(&mut self, number: u64, version: u64, now_ms: i64) {
        self.buffer = Buffer {
            number,
            base_version: version,
            started_at_ms: now_ms,
            folded: 0,
            in_flight: 0,
            sums: Arc::new(PartialSums::new(&self.layout, self.partial_sums)),
        };
    }

    /// The buffer as published: `goal` and `min` are K, `assigned` the outstanding
    /// assignments, and `deadline_ms` 0 (a buffer has no deadline).
    pub fn info(&self) -> RoundInfo {
        RoundInfo {
            round: self.buffer.number,
            kind: RoundKind::Training,
            base_version: self.buffer.base_version,
            updates: self.buffer.folded,
            assigned: self.assignments.len() as u64,
            goal: self.policy.buffer,
            min: self.policy.buffer,
            deadline_ms: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_core::ModelSpec;

    fn layout() -> Layout {
        starling_core::trainer::builtin::by_name("linear", 1, 1)
            .map(|s: ModelSpec| s.layout())
            .expect("the linear model")
    }

    fn buffered(k: u32, c: u32, max_staleness: u64) -> Buffered {
        let policy = BufferedPolicy {
            buffer: k,
            concurrency: c,
            max_staleness,
            staleness_exponent: 0.5,
            assignment_secs: 10.0,
        };
        Buffered::new(policy, 2, &layout(), 2, 1, 0, 0)
    }

    const T0: Duration = Duration::ZERO;

    #[test]
    fn at_most_concurrency_assignments_are_outstanding_and_lapsed_ones_free_their_place() {
        let mut b = buffered(10, 3, 5);
        for t in ["a", "b", "c"] {
            b.assign(t, None, None, 0, T0).unwrap();
        }
        assert_eq!(b.assign("d", None, None, 0, T0), Err(NoRoom::Full));
        // Ten seconds later the three lapse: their places are free, their tokens void.
        let later = Duration::from_secs(10);
        b.assign("d", None, None, 0, later).unwrap();
        assert_eq!(b.outstanding(), 1);
        assert!(matches!(
            b.admit(1, "a", later),
            Err(EngineError::UnknownToken(1))
        ));
    }

    #[test]
    fn an_update_in_flight_outlives_its_lapse_and_a_released_one_lapses_after() {
        let mut b = buffered(10, 1, 5);
        b.assign("a", None, None, 0, T0).unwrap();
        assert!(matches!(
            b.reserve(1, 0, "a", 0, T0),
            Ok(Slot::Reserved { .. })
        ));
        // Ten seconds on, its fold still under way: it keeps its place.
        let later = Duration::from_secs(10);
        assert_eq!(b.assign("b", None, None, 0, later), Err(NoRoom::Full));
        assert_eq!(b.outstanding(), 1);
        // The fold fails: released, it has lapsed, and the next check-in gets the place.
        b.released(1, "a");
        b.assign("b", None, None, 0, later).unwrap();
        assert_eq!(b.outstanding(), 1);
        assert!(matches!(
            b.admit(1, "a", later),
            Err(EngineError::UnknownToken(1))
        ));
    }

    #[test]
    fn a_device_checking_in_again_replaces_its_undelivered_assignment() {
        let mut b = buffered(10, 3, 5);
        b.assign("a", Some("dev"), None, 0, T0).unwrap();
        b.assign("b", Some("dev"), None, 1, T0).unwrap();
        assert_eq!(b.outstanding(), 1);
        assert!(matches!(
            b.admit(1, "a", T0),
            Err(EngineError::UnknownToken(1))
        ));
        // While its update is in flight, the device gets no second one.
        assert!(matches!(
            b.reserve(1, 1, "b", 1, T0),
            Ok(Slot::Reserved { .. })
        ));
        assert_eq!(
            b.assign("c", Some("dev"), None, 1, T0),
            Err(NoRoom::DeviceHasOne)
        );
    }

    #[test]
    fn the_address_limit_counts_outstanding_assignments() {
        let mut b = buffered(10, 10, 5);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        b.assign("a", None, Some(ip), 0, T0).unwrap();
        b.assign("b", None, Some(ip), 0, T0).unwrap();
        assert_eq!(
            b.assign("c", None, Some(ip), 0, T0),
            Err(NoRoom::AddressFull)
        );
        b.reserve(1, 0, "a", 0, T0).unwrap();
        b.folded(1, "a");
        b.assign("c", None, Some(ip), 0, T0).unwrap();
    }

    #[test]
    fn staleness_decides_the_discount_and_beyond_the_bound_the_refusal() {
        let mut b = buffered(10, 10, 2);
        for t in ["a", "b", "c", "d"] {
            b.assign(t, None, None, 0, T0).unwrap();
        }
        let discount = |s: Slot| match s {
            Slot::Reserved { discount, .. } => discount,
            Slot::Wait { .. } => panic!("the buffer has room"),
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
        assert_eq!(discount(b.reserve(1, 0, "a", 0, T0).unwrap()), 1.0);
        assert!(close(
            discount(b.reserve(1, 0, "b", 1, T0).unwrap()),
            1.0 / 2f64.sqrt()
        ));
        assert!(close(
            discount(b.reserve(1, 0, "c", 2, T0).unwrap()),
            1.0 / 3f64.sqrt()
        ));
        assert!(matches!(
            b.reserve(1, 0, "d", 3, T0),
            Err(EngineError::TooStale {
                got: 0,
                current: 3,
                max: 2
            })
        ));
        // The refused assignment is over.
        assert_eq!(b.outstanding(), 3);
        // A base version older than the assignment's, or newer than the model, is a lie.
        b.assign("e", None, None, 2, T0).unwrap();
        assert!(matches!(
            b.reserve(1, 1, "e", 2, T0),
            Err(EngineError::StaleVersion { .. })
        ));
        assert!(matches!(
            b.reserve(1, 3, "e", 2, T0),
            Err(EngineError::StaleVersion { .. })
        ));
    }

    #[test]
    fn a_full_buffer_sends_further_uploads_to_the_next_and_commits_with_k() {
        let mut b = buffered(2, 10, 5);
        for t in ["a", "b", "c"] {
            b.assign(t, None, None, 0, T0).unwrap();
        }
        assert!(matches!(
            b.reserve(1, 0, "a", 0, T0),
            Ok(Slot::Reserved { round: 1, .. })
        ));
        assert!(matches!(
            b.reserve(1, 0, "b", 0, T0),
            Ok(Slot::Reserved { round: 1, .. })
        ));
        assert!(matches!(
            b.reserve(1, 0, "c", 0, T0),
            Ok(Slot::Wait { round: 1 })
        ));
        // A failed fold frees its place.
        b.released(1, "b");
        assert!(matches!(
            b.reserve(1, 0, "c", 0, T0),
            Ok(Slot::Reserved { round: 1, .. })
        ));
        b.folded(1, "a");
        assert!(!b.is_full());
        b.folded(1, "c");
        assert!(b.is_full());
        // A delivered token is a duplicate, not unknown.
        assert!(matches!(b.admit(1, "a", T0), Err(EngineError::Duplicate)));
        let (summary, closed) = b.close();
        assert_eq!(summary.updates, 2);
        assert!(matches!(closed, ClosedRound::Commit { .. }));
        b.reopen(2, 1, 5);
        assert_eq!(b.number(), 2);
        // "b" was handed out in round 1 and still uploads there, now one version stale.
        assert!(matches!(
            b.reserve(1, 0, "b", 1, T0),
            Ok(Slot::Reserved { round: 2, .. })
        ));
    }
}
