//! The round engine. One tokio task owns each task's round state ([`actor`]); handlers talk
//! to it through a [`TaskHandle`], and read-mostly state (the current model, the open round)
//! is published through a `watch` channel. No HTTP types here: the same engine serves the
//! HTTP API and an in-memory transport.
//!
//! - [`round`]: the phases of a round as types (open, then closed as committed or abandoned).
//! - [`shards`]: per-core partial aggregates, so uploads fold in parallel without a global lock.
//! - [`actor`]: the task that owns the round state.

mod actor;
pub mod round;
pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use starling_core::params::Layout;
use starling_core::update::{self, UpdateError};
use starling_core::{ModelSpec, Parameters, Plan};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;
use crate::settings::{RoundPolicy, TaskDefinition};
use crate::store::{Store, StoreError};

pub use actor::spawn;

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
    /// The upload token is not an assignment of this round.
    #[error("upload token is not an assignment of round {0}")]
    UnknownToken(u64),
    /// The assignment already delivered its update.
    #[error("this assignment already delivered its update")]
    Duplicate,
    /// The engine is shutting down.
    #[error("the task is shutting down")]
    Unavailable,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// A stable, machine-readable code for the refusal.
    pub fn code(&self) -> &'static str {
        use starling_core::params::ParamsError;
        match self {
            EngineError::Update(UpdateError::Params(ParamsError::Malformed(_))) => {
                "malformed_update"
            }
            EngineError::Update(UpdateError::Params(_)) => "wrong_tensors",
            EngineError::Update(
                UpdateError::MissingField(_)
                | UpdateError::InvalidField { .. }
                | UpdateError::UnknownField(_),
            ) => "invalid_metadata",
            EngineError::Update(UpdateError::NoExamples(_)) => "invalid_examples",
            EngineError::Update(UpdateError::NotFinite(_)) => "not_finite",
            EngineError::Update(UpdateError::NormTooLarge { .. }) => "norm_too_large",
            EngineError::UnknownRound(_) => "unknown_round",
            EngineError::RoundClosed(_) => "round_closed",
            EngineError::StaleVersion { .. } => "stale_version",
            EngineError::UnknownToken(_) => "invalid_token",
            EngineError::Duplicate => "duplicate_update",
            EngineError::Unavailable => "unavailable",
            EngineError::Store(_) => "internal",
        }
    }
}

/// The answer to a check-in.
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
    /// The version to train from.
    pub base_version: u64,
    /// The upload token.
    pub token: String,
    /// Time left before the round's deadline.
    pub deadline_in: Duration,
    /// What to do.
    pub plan: Plan,
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
    /// Deadline, Unix milliseconds.
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
}

/// Requests to a task's actor. Each carries a batch, so that a simulation's thousand devices
/// cost one message, not a thousand; the HTTP handlers send batches of one.
pub(crate) enum Command {
    CheckIn {
        devices: Vec<Option<String>>,
        reply: oneshot::Sender<Vec<CheckIn>>,
    },
    Reserve {
        round: u64,
        /// `(base_version, token)` of each update, in order.
        updates: Vec<(u64, String)>,
        reply: oneshot::Sender<Vec<Result<Arc<shards::Shards>, EngineError>>>,
    },
    Folded {
        round: u64,
        tokens: Vec<String>,
    },
    Released {
        round: u64,
        tokens: Vec<String>,
    },
    Expire {
        round: u64,
    },
}

/// A cheap, cloneable handle to one task's engine.
#[derive(Clone)]
pub struct TaskHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    name: String,
    spec: ModelSpec,
    plan: Plan,
    policy: RoundPolicy,
    layout: Layout,
    max_update_norm: Option<f64>,
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

    /// The current status (model and open round).
    pub fn status(&self) -> TaskStatus {
        self.inner.status.borrow().clone()
    }

    /// A receiver that sees every new status.
    pub fn subscribe(&self) -> watch::Receiver<TaskStatus> {
        self.inner.status.clone()
    }

    /// A device asks for work. `device` is an opaque id the device chose for itself; a device
    /// that names one gets at most one assignment per round.
    pub async fn check_in(&self, device: Option<String>) -> Result<CheckIn, EngineError> {
        let mut answers = self.check_in_many(vec![device]).await?;
        Ok(answers.pop().expect("one answer per device"))
    }

    /// Several devices ask for work, answered in order (one message to the task).
    pub async fn check_in_many(
        &self,
        devices: Vec<Option<String>>,
    ) -> Result<Vec<CheckIn>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CheckIn { devices, reply }).await?;
        rx.await.map_err(|_| EngineError::Unavailable)
    }

    /// Declares round `round`'s deadline passed now, whatever the clock says: a simulation's
    /// virtual clock drives deadlines this way. The round then commits if it reached its
    /// minimum and is abandoned otherwise.
    pub async fn expire_round(&self, round: u64) -> Result<(), EngineError> {
        self.send(Command::Expire { round }).await
    }

    async fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.inner
            .tx
            .send(cmd)
            .await
            .map_err(|_| EngineError::Unavailable)
    }

    /// Checks an update (off the async reactor), reserves its assignment, folds it into a
    /// partial aggregate and reports it to the round. The body is dropped afterwards: nothing
    /// of it is kept but its contribution to the sums.
    pub async fn upload(&self, round: u64, body: Bytes) -> Result<Receipt, EngineError> {
        let mut results = self.upload_many(round, vec![body]).await;
        results.pop().expect("one result per update")
    }

    /// [`TaskHandle::upload`] for several updates of one round, answered in order: one check
    /// pass, one message to reserve, one fold pass, one report — the same steps as a single
    /// upload, batched for an in-memory transport. Updates fold in order, so the result does
    /// not depend on timing.
    pub async fn upload_many(
        &self,
        round: u64,
        bodies: Vec<Bytes>,
    ) -> Vec<Result<Receipt, EngineError>> {
        let results = self.upload_batch(round, bodies).await;
        for r in &results {
            self.inner.metrics.count_update(r);
        }
        results
    }

    async fn upload_batch(
        &self,
        round: u64,
        bodies: Vec<Bytes>,
    ) -> Vec<Result<Receipt, EngineError>> {
        let n = bodies.len();
        let all = |e: fn() -> EngineError| (0..n).map(|_| Err(e())).collect::<Vec<_>>();
        // The vectorised kernels read tensors in place when the body is 8-byte aligned (the
        // safetensors header keeps that alignment); a body that landed at an odd offset of a
        // network buffer is copied once instead of being read byte by byte twice.
        let bodies: Vec<Bytes> = bodies
            .into_iter()
            .map(|b| {
                if b.as_ptr().align_offset(8) == 0 {
                    b
                } else {
                    Bytes::copy_from_slice(&b)
                }
            })
            .collect();
        let layout = self.inner.layout.clone();
        let bound = self.inner.max_update_norm;
        let checked = tokio::task::spawn_blocking(move || {
            bodies
                .into_iter()
                .map(|b| {
                    let meta = update::decode(&b, &layout, bound)?.meta;
                    Ok::<_, EngineError>((b, meta))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(checked) = checked else {
            return all(|| EngineError::Unavailable);
        };
        let mut results: Vec<Result<Receipt, EngineError>> = Vec::with_capacity(n);
        let mut valid = Vec::new();
        for (i, c) in checked.into_iter().enumerate() {
            match c {
                Ok((body, meta)) => {
                    valid.push((i, body, meta));
                    results.push(Err(EngineError::Unavailable));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if valid.is_empty() {
            return results;
        }

        let (reply, rx) = oneshot::channel();
        let updates = valid
            .iter()
            .map(|(_, _, m)| (m.base_version, m.token.clone()))
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
        for ((i, body, meta), r) in valid.into_iter().zip(reserved) {
            match r {
                Ok(shards) => to_fold.push((i, body, meta.token, shards)),
                Err(e) => results[i] = Err(e),
            }
        }
        if to_fold.is_empty() {
            return results;
        }

        // Folding and reporting run in their own task so that a client hanging up cannot
        // leave the round waiting for an update that was reserved but never reported.
        let handle = self.clone();
        let done = tokio::spawn(async move {
            let layout = handle.inner.layout.clone();
            let tokens: Vec<String> = to_fold.iter().map(|(_, _, t, _)| t.clone()).collect();
            let folded = tokio::task::spawn_blocking(move || {
                to_fold
                    .into_iter()
                    .map(|(i, body, token, shards)| {
                        let r = update::decode_unchecked(&body, &layout).map(|v| shards.fold(&v));
                        (i, token, r)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(folded) = folded else {
                // The fold panicked: free the assignments so the round does not wait for them.
                let _ = handle.send(Command::Released { round, tokens }).await;
                return Err(EngineError::Unavailable);
            };
            let (mut ok, mut failed) = (Vec::new(), Vec::new());
            let mut out = Vec::with_capacity(folded.len());
            for (i, token, r) in folded {
                match r {
                    Ok(count) => {
                        ok.push(token);
                        out.push((
                            i,
                            Ok(Receipt {
                                round,
                                updates_in_round: count,
                            }),
                        ));
                    }
                    Err(e) => {
                        failed.push(token);
                        out.push((i, Err(EngineError::Update(e))));
                    }
                }
            }
            if !failed.is_empty() {
                let _ = handle
                    .send(Command::Released {
                        round,
                        tokens: failed,
                    })
                    .await;
            }
            if !ok.is_empty() {
                handle.send(Command::Folded { round, tokens: ok }).await?;
            }
            Ok::<_, EngineError>(out)
        })
        .await;
        if let Ok(Ok(out)) = done {
            for (i, r) in out {
                results[i] = r;
            }
        }
        results
    }
}

/// Starts the engines of all tasks on one store.
pub async fn start_tasks(
    defs: Vec<TaskDefinition>,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<Vec<TaskHandle>, EngineError> {
    let mut handles = Vec::with_capacity(defs.len());
    for def in defs {
        handles.push(spawn(def, store.clone(), metrics.clone()).await?);
    }
    Ok(handles)
}
