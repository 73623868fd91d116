//! The round engine. One tokio task owns each task's round state (`actor`); handlers talk
//! to it through a [`TaskHandle`], and read-mostly state (the current model, the open round)
//! is published through a `watch` channel. No HTTP types here: the same engine serves the
//! HTTP API and an in-memory transport, on the [`clock::Clock`] it is given.
//!
//! - [`round`]: the round as a phase machine (open, draining, closed as committed or
//!   abandoned).
//! - [`buffer`]: buffered asynchronous mode (FedBuff): outstanding assignments and the
//!   buffer that steps the model every K updates, each discounted by its staleness.
//! - [`secagg`]: secure aggregation's round (SecAgg+): advertise keys, share keys, masked
//!   input, unmask, each step closing at its goal or deadline; the sum is decoded at commit.
//! - [`partial`]: per-core partial sums, so uploads fold in parallel without a global lock.
//! - [`clock`]: real and virtual time.
//! - [`privacy`]: differential privacy's noise on a round's sum, and its budget.
//! - `actor`: the task that owns the round state.

mod actor;
pub mod buffer;
pub mod clock;
pub mod partial;
pub mod privacy;
pub mod round;
pub mod secagg;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use starling_core::wire::protocol::{ErrorCode, EvaluationReport, ReportError, RoundKind};
use starling_core::wire::update::{self, CheckedUpdate, Rules, UpdateError};
use starling_core::{ModelSpec, Parameters, Plan};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;
use crate::settings::{
    Admission, BufferedPolicy, PrivacyPolicy, RoundPolicy, Secret, SecureAggregationPolicy,
    TaskDefinition,
};
use crate::store::{Store, StoreError};

pub use actor::spawn;
pub use clock::{Clock, SystemClock, VirtualClock};

/// Why the engine refused a request. Every refusal leaves the aggregate untouched.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The update itself is unusable.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// The round number was never opened.
    #[error("round {0} does not exist")]
    UnknownRound(u64),
    /// The round is over (committed, abandoned, or full).
    #[error("round {0} is closed")]
    RoundClosed(u64),
    /// The update was trained from another version than the round's.
    #[error("update is built on version {got}, round {round} trains version {expected}")]
    StaleVersion {
        /// The round.
        round: u64,
        /// The update's base version.
        got: u64,
        /// The round's base version.
        expected: u64,
    },
    /// An update to an evaluation round, or an evaluation report to a training round.
    #[error("round {round} is a{} {} round", if matches!(kind, RoundKind::Evaluation) { "n" } else { "" }, kind.as_str())]
    WrongRoundKind {
        /// The round.
        round: u64,
        /// What it is.
        kind: RoundKind,
    },
    /// The task stopped training (its privacy budget is spent).
    #[error("task stopped: {0}")]
    TaskStopped(String),
    /// An evaluation report's numbers are unusable.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The upload token is not an assignment of this round.
    #[error("upload token is not an assignment of round {0}")]
    UnknownToken(u64),
    /// Buffered mode: the assignment was not delivered within its time and lapsed.
    #[error("the assignment lapsed before its update arrived; check in again")]
    AssignmentExpired,
    /// Buffered mode: the update's base version is too many versions behind the model.
    #[error(
        "update is built on version {got}, {} versions behind the current version {current} \
         (at most {max} allowed); check in again", current - got
    )]
    TooStale {
        /// The update's base version.
        got: u64,
        /// The current version.
        current: u64,
        /// The task's `max_staleness`.
        max: u64,
    },
    /// The assignment already delivered its update.
    #[error("this assignment already delivered its update")]
    Duplicate,
    /// The upload token belongs to an assignment of another device (credential).
    #[error("the upload token belongs to another device's assignment")]
    NotYourAssignment,
    /// An uploaded model does not fit the task.
    #[error("{0}")]
    InvalidModel(String),
    /// The token in the upload's header differs from the one in its metadata.
    #[error("the upload's header token differs from the token in its metadata")]
    TokenMismatch,
    /// No stored version with this number (never committed, or not retained).
    #[error("task has no stored version {0}")]
    UnknownVersion(u64),
    /// Secure aggregation: a message for another step than the round's, a secure message to
    /// a task or round that is not secure, or a plain upload to a secure round.
    #[error("round {round} is in its {phase} step: {hint}")]
    WrongPhase {
        /// The round.
        round: u64,
        /// The step it is in.
        phase: &'static str,
        /// What the sender got wrong.
        hint: &'static str,
    },
    /// Secure aggregation: the assignment already sent this step's message.
    #[error("this assignment already sent its {0}")]
    DuplicateMessage(&'static str),
    /// Secure aggregation: a masked input of the wrong length, or with values outside the
    /// round's ring.
    #[error(
        "a masked input must be {expected} ring elements below the ring's size; got {got} values"
    )]
    WrongLength {
        /// Values sent.
        got: usize,
        /// Values the round takes.
        expected: usize,
    },
    /// Secure aggregation: the device missed a step this one builds on.
    #[error("the device is not in this step's cohort: {0}")]
    NotInCohort(&'static str),
    /// Secure aggregation: shares that are not one per neighbour, or name non-neighbours.
    #[error("shares refused: {0}")]
    InvalidShares(String),
    /// Secure aggregation: an advertised public key of low order.
    #[error("keys refused: {0}")]
    InvalidKey(String),
    /// The engine is shutting down.
    #[error("the task is shutting down")]
    Unavailable,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// The stable, machine-readable code of the refusal; its HTTP status comes with it.
    pub fn code(&self) -> ErrorCode {
        use starling_core::wire::params::ParamsError;
        match self {
            EngineError::Update(UpdateError::Params(ParamsError::Malformed(_))) => {
                ErrorCode::MalformedUpdate
            }
            EngineError::Update(UpdateError::Params(_)) => ErrorCode::WrongTensors,
            EngineError::Update(
                UpdateError::MissingField(_)
                | UpdateError::InvalidField { .. }
                | UpdateError::UnknownField(_),
            ) => ErrorCode::InvalidMetadata,
            EngineError::Update(UpdateError::NoExamples(_)) => ErrorCode::InvalidExamples,
            EngineError::Update(UpdateError::NotFinite(_)) => ErrorCode::NotFinite,
            EngineError::Update(UpdateError::NormTooLarge { .. }) => ErrorCode::NormTooLarge,
            EngineError::UnknownRound(_) => ErrorCode::UnknownRound,
            EngineError::UnknownVersion(_) => ErrorCode::UnknownVersion,
            EngineError::RoundClosed(_) => ErrorCode::RoundClosed,
            EngineError::StaleVersion { .. } => ErrorCode::StaleVersion,
            EngineError::UnknownToken(_)
            | EngineError::AssignmentExpired
            | EngineError::TokenMismatch
            | EngineError::NotYourAssignment => ErrorCode::InvalidToken,
            EngineError::InvalidModel(_) => ErrorCode::InvalidModel,
            EngineError::TooStale { .. } => ErrorCode::TooStale,
            EngineError::WrongRoundKind { .. } => ErrorCode::WrongRoundKind,
            EngineError::TaskStopped(_) => ErrorCode::TaskStopped,
            EngineError::Report(ReportError::Examples(_)) => ErrorCode::InvalidExamples,
            EngineError::Report(_) => ErrorCode::InvalidMetadata,
            EngineError::Duplicate => ErrorCode::DuplicateUpdate,
            EngineError::WrongPhase { .. } => ErrorCode::WrongPhase,
            EngineError::DuplicateMessage(_) => ErrorCode::DuplicateMessage,
            EngineError::WrongLength { .. } => ErrorCode::WrongLength,
            EngineError::NotInCohort(_) => ErrorCode::NotInCohort,
            EngineError::InvalidShares(_) => ErrorCode::InvalidShares,
            EngineError::InvalidKey(_) => ErrorCode::InvalidKey,
            EngineError::Unavailable => ErrorCode::Unavailable,
            EngineError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// Who checks in: the id a device chose for itself, and the address it connects from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// An opaque id the device chose (at most one assignment per round).
    pub device: Option<String>,
    /// The client's network address (at most `max_assignments_per_address` per round).
    pub address: Option<IpAddr>,
}

impl Caller {
    /// A device known only by its id (the simulator's devices).
    pub fn device(id: impl Into<String>) -> Self {
        Self {
            device: Some(id.into()),
            address: None,
        }
    }
}

/// One upload: its body and, over HTTP, the token its header named (which must equal the
/// token in its metadata).
#[derive(Debug, Default)]
pub struct Upload {
    /// The token of the upload's header, if it came with one.
    pub token: Option<String>,
    /// The safetensors body; dropped by the engine once it is folded or refused.
    pub body: Vec<u8>,
}

impl From<Vec<u8>> for Upload {
    fn from(body: Vec<u8>) -> Self {
        Self { token: None, body }
    }
}

/// The answer to a check-in.
// An assignment (with a secure round's parameters) is larger than a retry; answers are made
// once per check-in and consumed at once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CheckIn {
    /// Work for this round.
    Assigned(Assignment),
    /// Come back later (pace steering).
    Retry {
        /// When to come back.
        after: Duration,
        /// Why.
        reason: &'static str,
    },
}

/// An assignment: train `base_version` with `plan`, upload to `round` with `token`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The round.
    pub round: u64,
    /// Train, or evaluate.
    pub kind: RoundKind,
    /// The version to train from.
    pub base_version: u64,
    /// The upload token.
    pub token: String,
    /// Time left before the round's deadline.
    pub deadline_in: Duration,
    /// What to do.
    pub plan: Plan,
    /// In a secure round: the device's place and the round's public parameters (it takes
    /// part in the secure steps instead of uploading its update).
    pub secure: Option<secagg::SecureSeat>,
}

/// An accepted update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Receipt {
    /// The round it went into.
    pub round: u64,
    /// Updates folded into that round so far, this one included.
    pub updates_in_round: u64,
}

/// The open round, as published to readers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundInfo {
    /// Round number.
    pub round: u64,
    /// Training or federated evaluation.
    pub kind: RoundKind,
    /// Version being trained.
    pub base_version: u64,
    /// Updates folded in so far.
    pub updates: u64,
    /// Assignments handed out.
    pub assigned: u64,
    /// Updates that commit the round.
    pub goal: u32,
    /// Updates needed at the deadline.
    pub min: u32,
    /// Deadline, Unix milliseconds (0 in buffered mode: a buffer has no deadline).
    pub deadline_ms: i64,
}

/// The current model, as published to readers.
#[derive(Debug, Clone)]
pub struct ModelState {
    /// The version.
    pub version: u64,
    /// The parameters.
    pub params: Arc<Parameters>,
    /// The checkpoint as served: safetensors with `task`, `version` and `spec` metadata.
    pub body: Bytes,
}

/// Read-mostly state of a task.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    /// The current model.
    pub model: ModelState,
    /// The open round.
    pub round: RoundInfo,
    /// The last round closed by this process, if any.
    pub last_round: Option<crate::store::RoundRecord>,
    /// Why the task no longer trains (its privacy budget is spent), if it stopped.
    pub stopped: Option<String>,
    /// ε spent so far, for a task with `[tasks.privacy]`.
    pub epsilon_spent: Option<f64>,
    /// An operator paused the task: check-ins are told to come back later.
    pub paused: bool,
}

/// Requests to a task's actor. Each carries a batch, so that a simulation's thousand devices
/// cost one message, not a thousand; the HTTP handlers send batches of one.
pub(crate) enum Command {
    CheckIn {
        callers: Vec<Caller>,
        reply: oneshot::Sender<Result<Vec<CheckIn>, EngineError>>,
    },
    Admit {
        round: u64,
        token: String,
        device: Option<String>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Reserve {
        round: u64,
        /// `(base_version, token)` of each update, in order.
        updates: Vec<(u64, String)>,
        reply: oneshot::Sender<Vec<Result<buffer::Slot, EngineError>>>,
    },
    Folded {
        round: u64,
        tokens: Vec<String>,
        /// Answered once the task's status counts these updates (taken out in the actor's
        /// loop, which answers it after publishing the status).
        ack: Option<oneshot::Sender<()>>,
    },
    Released {
        round: u64,
        tokens: Vec<String>,
    },
    Rollback {
        version: u64,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    Evaluate {
        round: u64,
        token: String,
        device: Option<String>,
        report: EvaluationReport,
        reply: oneshot::Sender<Result<Receipt, EngineError>>,
    },
    Pause {
        paused: bool,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Install {
        params: Parameters,
        reply: oneshot::Sender<Result<u64, EngineError>>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    Secure {
        round: u64,
        token: String,
        device: Option<String>,
        request: secagg::SecureRequest,
        reply: oneshot::Sender<Result<secagg::SecureAnswer, EngineError>>,
    },
}

/// A cheap, cloneable handle to one task's engine.
#[derive(Clone, Debug)]
pub struct TaskHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    name: String,
    spec: ModelSpec,
    plan: Plan,
    policy: RoundPolicy,
    buffered: Option<BufferedPolicy>,
    privacy: Option<PrivacyPolicy>,
    admission: Admission,
    enrollment_secret: Option<Secret>,
    rules: Rules,
    /// The current clip bound's bits (f64), for a task with `[tasks.privacy]`: adaptive
    /// clipping moves it between rounds, and every check reads the round's.
    clip: Arc<std::sync::atomic::AtomicU64>,
    max_upload_bytes: usize,
    /// Values in a secure round's masked input, for a task with secure aggregation.
    secure_input_len: Option<usize>,
    /// The task's secure-aggregation settings, if it has them.
    secure_aggregation: Option<SecureAggregationPolicy>,
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<TaskStatus>,
    metrics: Arc<Metrics>,
}

impl TaskHandle {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The model spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.inner.spec
    }

    /// The plan devices follow.
    pub fn plan(&self) -> &Plan {
        &self.inner.plan
    }

    /// The round policy.
    pub fn policy(&self) -> &RoundPolicy {
        &self.inner.policy
    }

    /// The buffered-mode settings, if the task trains asynchronously.
    pub fn buffered(&self) -> Option<&BufferedPolicy> {
        self.inner.buffered.as_ref()
    }

    /// Who may check in.
    pub fn admission(&self) -> Admission {
        self.inner.admission
    }

    /// Whether `given` is the enrollment secret of this (enrolled) task.
    pub fn enrollment_secret_matches(&self, given: &str) -> bool {
        self.inner
            .enrollment_secret
            .as_ref()
            .is_some_and(|s| crate::credentials::secret_matches(given, s.expose()))
    }

    /// The differential-privacy settings, if the task has them.
    pub fn privacy(&self) -> Option<&PrivacyPolicy> {
        self.inner.privacy.as_ref()
    }

    /// The largest upload body this task can need: its model's values plus a header
    /// allowance. Larger uploads are refused before they are read.
    pub fn max_upload_bytes(&self) -> usize {
        self.inner.max_upload_bytes
    }

    /// The secure-aggregation settings, if the task's rounds are secure.
    pub fn secure_aggregation(&self) -> Option<&SecureAggregationPolicy> {
        self.inner.secure_aggregation.as_ref()
    }

    /// Values in a masked input, for a task with `[tasks.secure_aggregation]` (`None`: the
    /// task takes plain uploads). A masked input's body is 4 bytes per value.
    pub fn secure_input_len(&self) -> Option<usize> {
        self.inner.secure_input_len
    }

    /// One step of a secure round for the assignment `token` (with `device`, an enrolled
    /// task's credential, which must be the one the assignment was handed to): a message
    /// (keys, shares, masked input, unmasking) or a question (neighbours' keys, envelopes,
    /// survivors). Everything is checked before it touches the round; a masked input is
    /// added into the running sum at once and not kept.
    pub async fn secure(
        &self,
        round: u64,
        token: &str,
        device: Option<&str>,
        request: secagg::SecureRequest,
    ) -> Result<secagg::SecureAnswer, EngineError> {
        let step = match &request {
            secagg::SecureRequest::AdvertiseKeys(_) => "keys",
            secagg::SecureRequest::ShareKeys(_) => "shares",
            secagg::SecureRequest::MaskedInput(_) => "input",
            secagg::SecureRequest::Unmask(_) => "unmask",
            secagg::SecureRequest::GetKeys
            | secagg::SecureRequest::GetEnvelopes
            | secagg::SecureRequest::GetSurvivors => "poll",
        };
        let (reply, rx) = oneshot::channel();
        self.send(Command::Secure {
            round,
            token: token.to_string(),
            device: device.map(str::to_string),
            request,
            reply,
        })
        .await?;
        let result = rx.await.map_err(|_| EngineError::Unavailable)?;
        self.inner.metrics.count_secure(step, &result);
        result
    }

    /// The current status (model and open round).
    pub fn status(&self) -> TaskStatus {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn subscribe(&self) -> watch::Receiver<TaskStatus> {
        self.inner.status.clone()
    }

    /// A device asks for work. A stopped task answers [`EngineError::TaskStopped`].
    pub async fn check_in(&self, caller: Caller) -> Result<CheckIn, EngineError> {
        let mut answers = self.check_in_many(vec![caller]).await?;
        Ok(answers.pop().expect("one answer per caller"))
    }

    /// Several devices ask for work, answered in order (one message to the task).
    pub async fn check_in_many(&self, callers: Vec<Caller>) -> Result<Vec<CheckIn>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CheckIn { callers, reply }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Whether an upload to `round` with `token` may send its body: the round is the open
    /// one and the token is an assignment of it that has not delivered — and, with `device`
    /// (an enrolled task's authenticated device), an assignment handed to that device. A
    /// cheap check, so that nobody without an assignment makes the server read (and buffer)
    /// a body.
    pub async fn admit_upload(
        &self,
        round: u64,
        token: &str,
        device: Option<&str>,
    ) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Admit {
            round,
            token: token.to_string(),
            device: device.map(str::to_string),
            reply,
        })
        .await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// A device's evaluation report for an evaluation round: checked, then added to the
    /// round's example-weighted means (weighted as updates are: the capped example count, or
    /// 1 with uniform weighting). Only the means are kept. With `device`, the token must be
    /// an assignment handed to that device.
    pub async fn evaluate(
        &self,
        round: u64,
        token: &str,
        device: Option<&str>,
        report: EvaluationReport,
    ) -> Result<Receipt, EngineError> {
        report.check()?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Evaluate {
            round,
            token: token.to_string(),
            device: device.map(str::to_string),
            report,
            reply,
        })
        .await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Rolls the task back to the stored version `version`: the open round is abandoned and
    /// a new version (the next number, so caches never confuse the two) with `version`'s
    /// parameters and strategy state is committed. Returns the new version's number.
    pub async fn rollback(&self, version: u64) -> Result<u64, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Rollback { version, reply }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Pauses the task (check-ins are told to come back later; the open round still takes
    /// the updates of devices already assigned) or resumes it. Kept across restarts.
    pub async fn set_paused(&self, paused: bool) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Pause { paused, reply }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Installs `params` (an operator's model) as the task's next version: the open round is
    /// abandoned, the strategy starts afresh, and devices train the new version from the next
    /// round on. Returns the new version's number.
    pub async fn install(&self, params: Parameters) -> Result<u64, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Install { params, reply }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)?
    }

    /// Stops the task's engine and waits until it has: the open round ends unrecorded (its
    /// number is never reused), and every later request answers `unavailable`. For replacing
    /// or deleting a task at run time.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.inner
            .tx
            .send(cmd)
            .await
            .map_err(|_| EngineError::Unavailable)
    }

    /// Checks an update (off the async reactor), reserves its assignment, folds it into a
    /// partial sum and reports it to the round. Nothing of the body is kept but its
    /// contribution to the sums.
    pub async fn upload(&self, round: u64, upload: Upload) -> Result<Receipt, EngineError> {
        let mut results = self.upload_many(round, vec![upload]).await;
        results.pop().expect("one result per update")
    }

    /// [`TaskHandle::upload`] for several updates of one round, answered in order: one check
    /// pass, one message to reserve, one fold pass, one report — the same steps as a single
    /// upload, batched for an in-memory transport. Updates fold in order, so the result does
    /// not depend on timing.
    ///
    /// The steps run in a task of their own: a caller that goes away (a client hanging up
    /// mid-request) cannot cancel them halfway, so every reservation is either folded or
    /// released, never stranded.
    pub async fn upload_many(
        &self,
        round: u64,
        uploads: Vec<Upload>,
    ) -> Vec<Result<Receipt, EngineError>> {
        let n = uploads.len();
        let handle = self.clone();
        let job = tokio::spawn(async move {
            let results = handle.upload_batch(round, uploads).await;
            for r in &results {
                handle.inner.metrics.count_update(r);
            }
            results
        });
        match job.await {
            Ok(results) => results,
            Err(_) => (0..n).map(|_| Err(EngineError::Unavailable)).collect(),
        }
    }

    async fn upload_batch(
        &self,
        round: u64,
        uploads: Vec<Upload>,
    ) -> Vec<Result<Receipt, EngineError>> {
        let n = uploads.len();
        let mut rules = self.inner.rules.clone();
        if rules.clip.is_some() {
            let bits = self.inner.clip.load(std::sync::atomic::Ordering::Acquire);
            rules.clip = Some(f64::from_bits(bits));
        }
        let checked = tokio::task::spawn_blocking(move || {
            uploads
                .into_iter()
                .map(|u| {
                    let checked = update::check(u.body, &rules)?;
                    if u.token.as_ref().is_some_and(|t| *t != checked.meta().token) {
                        return Err(EngineError::TokenMismatch);
                    }
                    Ok(checked)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(checked) = checked else {
            return (0..n).map(|_| Err(EngineError::Unavailable)).collect();
        };
        let mut results: Vec<Result<Receipt, EngineError>> = Vec::with_capacity(n);
        let mut valid: Vec<(usize, CheckedUpdate)> = Vec::new();
        for (i, c) in checked.into_iter().enumerate() {
            match c {
                Ok(u) => {
                    valid.push((i, u));
                    results.push(Err(EngineError::Unavailable));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if valid.is_empty() {
            return results;
        }

        // Reserve, fold, report; updates that found the buffer full (buffered mode) go
        // round again once it has closed.
        let mut pending = valid;
        while !pending.is_empty() {
            let (reply, rx) = oneshot::channel();
            let updates = pending
                .iter()
                .map(|(_, u)| (u.meta().base_version, u.meta().token.clone()))
                .collect();
            if self
                .send(Command::Reserve {
                    round,
                    updates,
                    reply,
                })
                .await
                .is_err()
            {
                return results;
            }
            let Ok(reserved) = rx.await else {
                return results;
            };
            let mut to_fold = Vec::new();
            let mut waiting = Vec::new();
            let mut full = None;
            for ((i, u), r) in pending.drain(..).zip(reserved) {
                match r {
                    Ok(buffer::Slot::Reserved {
                        sums,
                        discount,
                        round,
                    }) => to_fold.push((i, u, sums, discount, round)),
                    Ok(buffer::Slot::Wait { round }) => {
                        full = Some(round);
                        waiting.push((i, u));
                    }
                    Err(e) => results[i] = Err(e),
                }
            }
            if !to_fold.is_empty() {
                // One reply reserves into one round.
                let into = to_fold[0].4;
                let tokens: Vec<String> = to_fold
                    .iter()
                    .map(|(_, u, ..)| u.meta().token.clone())
                    .collect();
                let folded = tokio::task::spawn_blocking(move || {
                    to_fold
                        .into_iter()
                        .map(|(i, u, sums, discount, _)| (i, sums.fold_discounted(u, discount)))
                        .collect::<Vec<_>>()
                })
                .await;
                let Ok(folded) = folded else {
                    // The fold panicked: free the assignments so the round does not wait.
                    let _ = self
                        .send(Command::Released {
                            round: into,
                            tokens,
                        })
                        .await;
                    return results;
                };
                for (i, count) in folded {
                    results[i] = Ok(Receipt {
                        round: into,
                        updates_in_round: count,
                    });
                }
                let (ack, acked) = oneshot::channel();
                if self
                    .send(Command::Folded {
                        round: into,
                        tokens,
                        ack: Some(ack),
                    })
                    .await
                    .is_err()
                {
                    return (0..n).map(|_| Err(EngineError::Unavailable)).collect();
                }
                // A device that reads the task's status after its receipt sees its update
                // counted (read-your-writes); the fold itself is already done.
                let _ = acked.await;
            }
            if let Some(full) = full {
                // The full buffer closes as soon as its reserved updates are in; a released
                // one reopens a place without a new round, hence the bounded wait.
                let mut status = self.subscribe();
                let _ = tokio::time::timeout(
                    Duration::from_millis(50),
                    status.wait_for(|s| s.round.round != full),
                )
                .await;
            }
            pending = waiting;
        }
        results
    }
}

/// Starts the engines of all tasks on one store and one clock.
pub async fn start_tasks(
    defs: Vec<TaskDefinition>,
    store: Store,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) -> Result<Vec<TaskHandle>, EngineError> {
    let mut handles = Vec::with_capacity(defs.len());
    for def in defs {
        handles.push(spawn(def, store.clone(), metrics.clone(), clock.clone()).await?);
    }
    Ok(handles)
}
