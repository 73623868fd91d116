//! A round as a phase machine. Each phase is a type that owns its state; a transition
//! consumes the old phase and returns the next:
//!
//! ```text
//!            goal reached, or deadline passed with assignments out
//!   Open ─────────────────────────────────────────────────────────▶ Draining
//!    │ ▲                                                               │ nothing in flight
//!    └─┘ deadline passed, nobody assigned: the deadline moves on       ▼
//!                                                     ClosedRound::Commit | ClosedRound::Abandon
//! ```
//!
//! [`OpenRound`] hands out assignments and reserves uploads; [`DrainingRound`] does neither
//! and waits for the uploads already reserved to fold or be released; [`DrainingRound::close`]
//! turns it into a [`ClosedRound`]: a commit with the merged sum, or an abandonment with its
//! [`AbandonReason`] (the one failure outcome, from which the engine recovers by opening the
//! next round). Secure aggregation's rounds, with their four steps (advertise keys, share
//! keys, masked input, unmask), are [`super::secagg`]'s `SecureRound`, which closes into the
//! same `finish` path.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::{EvaluationReport, RoundKind};
use starling_core::WeightedSum;

use super::partial::PartialSums;
use super::{EngineError, RoundInfo};
use crate::settings::RoundPolicy;

/// Where one assignment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentState {
    /// Handed out, no update yet.
    Assigned,
    /// Its update is being folded in.
    InFlight,
    /// Its update is in the sum.
    Folded,
}

/// Why a round ended without a new version. Recorded with the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbandonReason {
    /// Fewer updates than the round's minimum (and the task's minimum cohort) arrived.
    BelowMinimum,
    /// The step would have made a parameter NaN or infinite.
    NonFiniteModel,
    /// The step is longer than the task's `max_update_norm`.
    StepTooLarge,
    /// The strategy could not compute the next parameters.
    StrategyFailed,
    /// The new version could not be stored.
    StorageFailed,
    /// An operator rolled the task back while the round was open.
    RolledBack,
    /// An operator installed a model of their own while the round was open.
    ModelReplaced,
    /// Releasing the round would have taken the task past its privacy budget.
    PrivacyBudget,
    /// Secure aggregation: fewer devices than the round's minimum completed a step.
    TooFewSurvivors,
    /// Secure aggregation: a secret could not be rebuilt from the shares that came back,
    /// so the masks could not be removed.
    UnmaskFailed,
}

impl AbandonReason {
    /// The reason as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            AbandonReason::BelowMinimum => "below_minimum",
            AbandonReason::NonFiniteModel => "non_finite_model",
            AbandonReason::StepTooLarge => "step_too_large",
            AbandonReason::StrategyFailed => "strategy_failed",
            AbandonReason::StorageFailed => "storage_failed",
            AbandonReason::RolledBack => "rolled_back",
            AbandonReason::ModelReplaced => "model_replaced",
            AbandonReason::PrivacyBudget => "privacy_budget",
            AbandonReason::TooFewSurvivors => "too_few_survivors",
            AbandonReason::UnmaskFailed => "unmask_failed",
        }
    }

    /// The reason named `s`, as stored.
    pub fn parse(s: &str) -> Option<Self> {
        [
            AbandonReason::BelowMinimum,
            AbandonReason::NonFiniteModel,
            AbandonReason::StepTooLarge,
            AbandonReason::StrategyFailed,
            AbandonReason::StorageFailed,
            AbandonReason::RolledBack,
            AbandonReason::ModelReplaced,
            AbandonReason::PrivacyBudget,
            AbandonReason::TooFewSurvivors,
            AbandonReason::UnmaskFailed,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// A federated evaluation round's running sums: example-weighted loss and accuracy.
#[derive(Debug, Clone, Copy, Default)]
struct EvaluationSums {
    examples: u64,
    weight: f64,
    loss_sum: f64,
    accuracy_sum: f64,
    accuracy_weight: f64,
}

/// What every phase of a round knows.
#[derive(Debug)]
struct RoundState {
    number: u64,
    kind: RoundKind,
    evaluation: EvaluationSums,
    base_version: u64,
    started_at_ms: i64,
    deadline: Duration,
    deadline_ms: i64,
    assignments: HashMap<String, AssignmentState>,
    devices: HashSet<String>,
    /// The device each token was handed to, for assignments to a named device.
    owners: HashMap<String, String>,
    per_address: HashMap<IpAddr, u32>,
    in_flight: u64,
    folded: u64,
    sums: Arc<PartialSums>,
    policy: RoundPolicy,
    min_cohort: u32,
    max_per_address: u32,
    at_most_goal: bool,
}

/// The limits a round enforces beyond its [`RoundPolicy`].
#[derive(Debug, Clone, Copy)]
pub struct RoundLimits {
    /// The fewest updates a committed round may have.
    pub min_cohort: u32,
    /// Assignments one client address may hold.
    pub max_per_address: u32,
    /// Take at most `goal` updates (differential privacy: the cohort the noise and the
    /// accountant assume), refusing later ones as `round_closed`.
    pub at_most_goal: bool,
}

/// Why a check-in got no assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// This device id already holds this round's assignment.
    DeviceHasOne,
    /// This client address holds as many assignments as it may.
    AddressFull,
    /// All assignments are out, or enough updates are in.
    Full,
    /// The round is draining.
    Closing,
}

impl NoRoom {
    /// Why, for the device.
    pub fn reason(self) -> &'static str {
        match self {
            NoRoom::DeviceHasOne => "this device already has this round's assignment",
            NoRoom::AddressFull => "this address holds as many assignments as a round allows",
            NoRoom::Full => "the round is full",
            NoRoom::Closing => "the round is closing",
        }
    }
}

impl RoundState {
    fn info(&self) -> RoundInfo {
        RoundInfo {
            round: self.number,
            kind: self.kind,
            base_version: self.base_version,
            updates: self.folded,
            assigned: self.assignments.len() as u64,
            goal: self.policy.goal,
            min: self.policy.min,
            deadline_ms: self.deadline_ms,
        }
    }

    /// The round-level facts of an upload that are the same in every phase.
    fn check_token(&self, token: &str) -> Result<AssignmentState, EngineError> {
        match self.assignments.get(token) {
            None => Err(EngineError::UnknownToken(self.number)),
            Some(AssignmentState::InFlight | AssignmentState::Folded) => {
                Err(EngineError::Duplicate)
            }
            Some(s) => Ok(*s),
        }
    }

    /// With `device` (a credential's device), whether the assignment `token` names was
    /// handed to that device. An unknown token passes here and is refused by the token check.
    fn check_owner(&self, token: &str, device: Option<&str>) -> Result<(), EngineError> {
        let Some(device) = device else {
            return Ok(());
        };
        match self.owners.get(token) {
            Some(owner) if owner == device => Ok(()),
            None if !self.assignments.contains_key(token) => Ok(()),
            _ => Err(EngineError::NotYourAssignment),
        }
    }

    fn check_kind(&self, kind: RoundKind) -> Result<(), EngineError> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(EngineError::WrongRoundKind {
                round: self.number,
                kind: self.kind,
            })
        }
    }

    /// The round-level facts of an upload (an update or an evaluation report), in the order
    /// every phase checks them: the round's kind, the base version, the token.
    fn check_upload(
        &self,
        kind: RoundKind,
        base_version: u64,
        token: &str,
    ) -> Result<(), EngineError> {
        self.check_kind(kind)?;
        self.check_version(base_version)?;
        self.check_token(token).map(|_| ())
    }

    fn check_version(&self, base_version: u64) -> Result<(), EngineError> {
        if base_version == self.base_version {
            Ok(())
        } else {
            Err(EngineError::StaleVersion {
                round: self.number,
                got: base_version,
                expected: self.base_version,
            })
        }
    }

    fn folded(&mut self, token: &str) {
        if let Some(s) = self.assignments.get_mut(token) {
            if *s == AssignmentState::InFlight {
                *s = AssignmentState::Folded;
                self.in_flight -= 1;
                self.folded += 1;
            }
        }
    }

    fn released(&mut self, token: &str) {
        if let Some(s) = self.assignments.get_mut(token) {
            if *s == AssignmentState::InFlight {
                *s = AssignmentState::Assigned;
                self.in_flight -= 1;
            }
        }
    }
}

/// The phase that hands out assignments and reserves uploads.
#[derive(Debug)]
pub struct OpenRound(RoundState);

/// The phase after the goal or the deadline: no new assignments or reservations; waits for
/// the reserved uploads.
#[derive(Debug)]
pub struct DrainingRound(RoundState);

/// A round in whichever phase it is.
#[derive(Debug)]
pub enum Phase {
    /// Taking check-ins and uploads.
    Open(OpenRound),
    /// Waiting for reserved uploads before it closes.
    Draining(DrainingRound),
}

/// What a closed round's record needs to know of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundSummary {
    /// The round's number.
    pub number: u64,
    /// Training or evaluation.
    pub kind: RoundKind,
    /// The version it trained.
    pub base_version: u64,
    /// When it started, Unix milliseconds.
    pub started_at_ms: i64,
    /// Updates folded in.
    pub updates: u64,
}

/// How a round ended.
#[derive(Debug)]
pub enum ClosedRound {
    /// Enough updates: the merged sum becomes the next version.
    Commit {
        /// The merged sum.
        sum: WeightedSum,
    },
    /// A federated evaluation round with enough reports: its example-weighted means.
    Evaluated {
        /// Examples the reports cover.
        examples: u64,
        /// Example-weighted mean loss.
        mean_loss: f64,
        /// Example-weighted mean accuracy, if the reports carried one.
        mean_accuracy: Option<f64>,
    },
    /// The model stays.
    Abandon {
        /// Updates that had been folded.
        updates: u64,
        /// Why.
        reason: AbandonReason,
    },
}

impl OpenRound {
    /// Opens round `number` of `kind` on `base_version`, with its deadline
    /// `policy.deadline_secs` after `now` (the engine clock's time) and `now_ms` (Unix
    /// milliseconds).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        number: u64,
        kind: RoundKind,
        base_version: u64,
        layout: &Layout,
        policy: &RoundPolicy,
        limits: RoundLimits,
        partial_sums: usize,
        now: Duration,
        now_ms: i64,
    ) -> Self {
        let period = Duration::from_secs_f64(policy.deadline_secs);
        OpenRound(RoundState {
            number,
            kind,
            evaluation: EvaluationSums::default(),
            base_version,
            started_at_ms: now_ms,
            deadline: now + period,
            deadline_ms: now_ms + period.as_millis() as i64,
            assignments: HashMap::new(),
            devices: HashSet::new(),
            owners: HashMap::new(),
            per_address: HashMap::new(),
            in_flight: 0,
            folded: 0,
            sums: Arc::new(PartialSums::new(layout, partial_sums)),
            policy: policy.clone(),
            min_cohort: limits.min_cohort,
            max_per_address: limits.max_per_address,
            at_most_goal: limits.at_most_goal,
        })
    }

    /// Records an assignment for `token`, or says why there is none: at most one per device
    /// id and `max_per_address` per client address, at most `ceil(goal * overcommit)` in all,
    /// and none once folded plus in-flight updates reach the goal.
    pub fn assign(
        &mut self,
        token: &str,
        device: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<(), NoRoom> {
        let s = &mut self.0;
        if device.is_some_and(|d| s.devices.contains(d)) {
            return Err(NoRoom::DeviceHasOne);
        }
        let cap = (f64::from(s.policy.goal) * s.policy.overcommit).ceil() as usize;
        if s.assignments.len() >= cap || s.folded + s.in_flight >= u64::from(s.policy.goal) {
            return Err(NoRoom::Full);
        }
        if let Some(a) = address {
            let held = s.per_address.entry(a).or_insert(0);
            if *held >= s.max_per_address {
                return Err(NoRoom::AddressFull);
            }
            *held += 1;
        }
        s.assignments
            .insert(token.to_string(), AssignmentState::Assigned);
        if let Some(d) = device {
            s.devices.insert(d.to_string());
            s.owners.insert(token.to_string(), d.to_string());
        }
        Ok(())
    }

    /// Checks an upload's round-level facts and marks its assignment in flight.
    pub fn reserve(
        &mut self,
        base_version: u64,
        token: &str,
    ) -> Result<Arc<PartialSums>, EngineError> {
        let s = &mut self.0;
        s.check_upload(RoundKind::Training, base_version, token)?;
        if s.at_most_goal && s.folded + s.in_flight >= u64::from(s.policy.goal) {
            return Err(EngineError::RoundClosed(s.number));
        }
        s.assignments
            .insert(token.to_string(), AssignmentState::InFlight);
        s.in_flight += 1;
        Ok(s.sums.clone())
    }

    /// Takes a checked evaluation report with `weight` (its capped example count, or 1 for
    /// uniform weighting) into an evaluation round; returns the reports in the round now.
    pub fn evaluate(
        &mut self,
        token: &str,
        report: &EvaluationReport,
        weight: f64,
    ) -> Result<u64, EngineError> {
        let s = &mut self.0;
        s.check_upload(RoundKind::Evaluation, report.base_version, token)?;
        s.assignments
            .insert(token.to_string(), AssignmentState::Folded);
        s.folded += 1;
        let e = &mut s.evaluation;
        e.examples += report.examples;
        e.weight += weight;
        e.loss_sum += weight * report.loss;
        if let Some(a) = report.accuracy {
            e.accuracy_sum += weight * a;
            e.accuracy_weight += weight;
        }
        Ok(s.folded)
    }

    /// Whether an upload with this token may send its body: it is an assignment of this
    /// round that has not delivered.
    pub fn admit(&self, token: &str) -> Result<(), EngineError> {
        self.0.check_kind(RoundKind::Training)?;
        self.0.check_token(token).map(|_| ())
    }

    /// The round as published.
    pub fn info(&self) -> RoundInfo {
        self.0.info()
    }

    /// The deadline, in the engine clock's time.
    pub fn deadline(&self) -> Duration {
        self.0.deadline
    }

    /// Whether the goal is reached.
    fn goal_reached(&self) -> bool {
        self.0.folded >= u64::from(self.0.policy.goal)
    }

    /// The deadline passed. A round nobody joined stays open for another period (an idle
    /// server records no empty rounds); any other round drains.
    pub fn deadline_passed(mut self, now: Duration, now_ms: i64) -> Phase {
        if self.0.assignments.is_empty() {
            let period = Duration::from_secs_f64(self.0.policy.deadline_secs);
            self.0.deadline = now + period;
            self.0.deadline_ms = now_ms + period.as_millis() as i64;
            Phase::Open(self)
        } else {
            Phase::Draining(DrainingRound(self.0))
        }
    }

    /// Ends the round now, whatever its state (an operator's rollback).
    pub fn drain(self) -> DrainingRound {
        DrainingRound(self.0)
    }
}

impl DrainingRound {
    /// Whether every reserved upload has folded or been released.
    pub fn is_idle(&self) -> bool {
        self.0.in_flight == 0
    }

    /// Closes the round: a commit with the merged sum if it reached its minimum and the
    /// task's minimum cohort, else an abandonment.
    pub fn close(self) -> (RoundSummary, ClosedRound) {
        let s = self.0;
        let summary = RoundSummary {
            number: s.number,
            kind: s.kind,
            base_version: s.base_version,
            started_at_ms: s.started_at_ms,
            updates: s.folded,
        };
        let needed = u64::from(s.policy.min.max(s.min_cohort)).max(1);
        let e = s.evaluation;
        let closed = if s.folded >= needed && s.kind == RoundKind::Evaluation {
            ClosedRound::Evaluated {
                examples: e.examples,
                mean_loss: e.loss_sum / e.weight,
                mean_accuracy: (e.accuracy_weight > 0.0)
                    .then(|| e.accuracy_sum / e.accuracy_weight),
            }
        } else if s.folded >= needed {
            ClosedRound::Commit {
                sum: s.sums.merged(),
            }
        } else {
            ClosedRound::Abandon {
                updates: s.folded,
                reason: AbandonReason::BelowMinimum,
            }
        };
        (summary, closed)
    }
}

impl Phase {
    fn state(&self) -> &RoundState {
        match self {
            Phase::Open(r) => &r.0,
            Phase::Draining(r) => &r.0,
        }
    }

    fn state_mut(&mut self) -> &mut RoundState {
        match self {
            Phase::Open(r) => &mut r.0,
            Phase::Draining(r) => &mut r.0,
        }
    }

    /// The round's number.
    pub fn number(&self) -> u64 {
        self.state().number
    }

    /// The version the round trains.
    pub fn base_version(&self) -> u64 {
        self.state().base_version
    }

    /// The round so far, for its record.
    pub fn summary(&self) -> RoundSummary {
        let s = self.state();
        RoundSummary {
            number: s.number,
            kind: s.kind,
            base_version: s.base_version,
            started_at_ms: s.started_at_ms,
            updates: s.folded,
        }
    }

    /// Uploads reserved and not yet folded or released.
    pub fn in_flight(&self) -> u64 {
        self.state().in_flight
    }

    /// The round as published.
    pub fn info(&self) -> RoundInfo {
        self.state().info()
    }

    /// With `device`, whether `token`'s assignment was handed to that device.
    pub fn check_owner(&self, token: &str, device: Option<&str>) -> Result<(), EngineError> {
        self.state().check_owner(token, device)
    }

    /// Whether an upload may send its body now.
    pub fn admit(&self, token: &str) -> Result<(), EngineError> {
        match self {
            Phase::Open(r) => r.admit(token),
            Phase::Draining(r) => {
                r.0.check_kind(RoundKind::Training)?;
                r.0.check_token(token)?;
                Err(EngineError::RoundClosed(r.0.number))
            }
        }
    }

    /// Reserves an upload (open rounds only).
    pub fn reserve(
        &mut self,
        base_version: u64,
        token: &str,
    ) -> Result<Arc<PartialSums>, EngineError> {
        match self {
            Phase::Open(r) => r.reserve(base_version, token),
            Phase::Draining(r) => {
                r.0.check_upload(RoundKind::Training, base_version, token)?;
                Err(EngineError::RoundClosed(r.0.number))
            }
        }
    }

    /// Takes an evaluation report (open evaluation rounds only).
    pub fn evaluate(
        &mut self,
        token: &str,
        report: &EvaluationReport,
        weight: f64,
    ) -> Result<u64, EngineError> {
        match self {
            Phase::Open(r) => r.evaluate(token, report, weight),
            Phase::Draining(r) => {
                r.0.check_upload(RoundKind::Evaluation, report.base_version, token)?;
                Err(EngineError::RoundClosed(r.0.number))
            }
        }
    }

    /// A reserved update is in the sum.
    pub fn folded(&mut self, token: &str) {
        self.state_mut().folded(token);
    }

    /// A reserved update failed to fold; its assignment may try again.
    pub fn released(&mut self, token: &str) {
        self.state_mut().released(token);
    }

    /// The transition that needs no outside event: an open round whose goal is reached
    /// drains.
    pub fn advance(self) -> Phase {
        match self {
            Phase::Open(r) if r.goal_reached() => Phase::Draining(DrainingRound(r.0)),
            other => other,
        }
    }
}
