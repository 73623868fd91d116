//! A resumable device: one contribution as explicit steps (check in, download, train or
//! score, upload), with everything between two steps saved in a folder, so that a host can
//! stop after any step (the phone is unplugged, the OS ends the background job) and go on
//! later, in another process, from where it stopped. This is what the SDKs (C, JNI, Python)
//! drive; [`crate::Device`] is the loop for a process that just runs.
//!
//! The folder holds `session.json` (the task, the device's id and the step with its
//! assignment), `model.safetensors` (the checkpoint the assignment trains: the local copy of
//! the model) and `update.safetensors` (the encoded update, waiting to be uploaded). Each is
//! written to a temporary file, synced and renamed into place, so a crash leaves the old
//! state or the new one, never half of one. Only the update and the device's own state are
//! kept; the local data is the host's, and written here only when the host keeps it in an
//! [`ExampleStore`](crate::examples::ExampleStore) under a storage budget.
//!
//! Every step is one attempt. A step that fails in a way worth repeating
//! ([`ClientError::is_retryable`]) leaves the state as it was: the host runs it again later.
//! When the server says the round no longer takes the contribution (it closed, the model
//! moved on, the token lapsed), the step answers [`Outcome::Dropped`] and the session is
//! idle again. An upload answered `duplicate_update` delivered on an earlier try whose answer
//! was lost (only this device holds the token), so it counts as delivered.
//!
//! Device policy: before it checks in, the session reads the task's plan and compares its
//! [`Requirements`](starling_core::Requirements) with the [`Conditions`] the host reports (charging, idle, unmetered
//! network, battery level); when one does not hold it answers [`Outcome::NotEligible`] and
//! sends no check-in at all.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use starling_core::trainer::train::{self, check_data, Progress};
use starling_core::wire::checkpoint::{self, Checkpoint};
use starling_core::wire::protocol::{CheckInAnswer, ErrorCode, EvaluationReport, RoundKind};
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Conditions, Dataset, Model, Parameters, Plan};

use crate::transport::Transport;
use crate::ClientError;

const STATE_FILE: &str = "session.json";
const MODEL_FILE: &str = "model.safetensors";
const UPDATE_FILE: &str = "update.safetensors";

/// An assignment as a session keeps it: what the check-in answered, with the deadline as a
/// wall-clock time (it must mean the same in the next process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The round.
    pub round: u64,
    /// Train, or evaluate.
    pub kind: RoundKind,
    /// The version to train from.
    pub base_version: u64,
    /// The upload token.
    pub token: String,
    /// The round's deadline, Unix milliseconds, as this device computed it at check-in.
    pub deadline_unix_ms: i64,
    /// What to do.
    pub plan: Plan,
}

/// What waits to be uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Ready {
    /// A training round's update, in `update.safetensors`.
    Update {
        /// Examples it was trained on.
        examples: u64,
        /// Local loss after training, when known.
        loss: Option<f32>,
    },
    /// An evaluation round's report.
    Report {
        /// The report.
        report: EvaluationReport,
    },
}

/// Where a session is: the next step follows from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Nothing in hand; next: check in.
    Idle,
    /// Checked in; next: download the model.
    Assigned {
        /// The assignment.
        assignment: Assignment,
    },
    /// The model is here; next: train (or score), with the built-in trainer or the host's.
    Downloaded {
        /// The assignment.
        assignment: Assignment,
    },
    /// The update (or report) is ready; next: upload it.
    Ready {
        /// The assignment.
        assignment: Assignment,
        /// What is ready.
        ready: Ready,
    },
}

impl Step {
    /// The step's name, as written in `session.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Idle => "idle",
            Step::Assigned { .. } => "assigned",
            Step::Downloaded { .. } => "downloaded",
            Step::Ready { .. } => "ready",
        }
    }

    /// The assignment in hand, if any.
    pub fn assignment(&self) -> Option<&Assignment> {
        match self {
            Step::Idle => None,
            Step::Assigned { assignment }
            | Step::Downloaded { assignment }
            | Step::Ready { assignment, .. } => Some(assignment),
        }
    }
}

/// What a step did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The device's conditions do not meet the task's requirements: no check-in was sent.
    NotEligible {
        /// Which requirement, in words.
        reason: String,
    },
    /// The server asked the device to come back later (pace steering).
    Wait {
        /// Seconds to wait.
        secs: f64,
        /// The server's reason.
        reason: String,
    },
    /// Checked in: an assignment.
    Assigned {
        /// The round.
        round: u64,
        /// Train or evaluate.
        kind: RoundKind,
    },
    /// The model of the assignment is saved locally.
    Downloaded {
        /// Its version.
        version: u64,
    },
    /// Trained: the update is encoded and saved.
    Trained {
        /// Examples trained on.
        examples: u64,
        /// Local loss after training, when known.
        loss: Option<f32>,
    },
    /// Scored the model for an evaluation round.
    Scored {
        /// The report.
        report: EvaluationReport,
    },
    /// The server took the update or report.
    Delivered {
        /// The round it went into.
        round: u64,
        /// Updates in that round so far (`None` when an earlier try delivered it).
        updates_in_round: Option<u64>,
    },
    /// The round no longer takes this contribution; the session is idle again.
    Dropped {
        /// Why.
        reason: String,
    },
}

/// What `session.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Saved {
    task: String,
    device_id: String,
    step: Step,
}

/// A resumable device session over a transport, saved in a folder.
pub struct Session<T> {
    transport: T,
    dir: PathBuf,
    saved: Saved,
}

impl<T> std::fmt::Debug for Session<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("dir", &self.dir)
            .field("task", &self.saved.task)
            .field("step", &self.saved.step.name())
            .finish_non_exhaustive()
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ClientError {
    ClientError::State(format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| io_error("cannot write", path, e))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Whether a refusal means the round no longer takes this contribution.
fn round_gone(code: Option<ErrorCode>) -> bool {
    matches!(
        code,
        Some(
            ErrorCode::RoundClosed
                | ErrorCode::StaleVersion
                | ErrorCode::TooStale
                | ErrorCode::InvalidToken
                | ErrorCode::UnknownRound
                | ErrorCode::WrongRoundKind
        )
    )
}

impl<T: Transport> Session<T> {
    /// Opens the session saved in `dir` for `task` (creating the folder and a fresh, idle
    /// session with a random device id when there is none). A folder that holds another
    /// task's session is refused.
    pub fn open(transport: T, task: &str, dir: &Path) -> Result<Self, ClientError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("cannot create", dir, e))?;
        let state = dir.join(STATE_FILE);
        let saved = match std::fs::read(&state) {
            Ok(bytes) => {
                let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
                    ClientError::State(format!("{} is not a session: {e}", state.display()))
                })?;
                if saved.task != task {
                    return Err(ClientError::State(format!(
                        "{} holds a session of task `{}`, not `{task}`",
                        dir.display(),
                        saved.task
                    )));
                }
                saved
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved {
                task: task.to_string(),
                device_id: format!("{:016x}", rand::rng().random::<u64>()),
                step: Step::Idle,
            },
            Err(e) => return Err(io_error("cannot read", &state, e)),
        };
        let session = Self {
            transport,
            dir: dir.to_path_buf(),
            saved,
        };
        session.save()?;
        Ok(session)
    }

    /// The step the session is at.
    pub fn step(&self) -> &Step {
        &self.saved.step
    }

    /// The device's id (saved with the session; the server gives one id at most one
    /// assignment per round).
    pub fn device_id(&self) -> &str {
        &self.saved.device_id
    }

    /// The task.
    pub fn task(&self) -> &str {
        &self.saved.task
    }

    /// The folder the session is saved in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save(&self) -> Result<(), ClientError> {
        let json = serde_json::to_vec_pretty(&self.saved)
            .map_err(|e| ClientError::State(format!("cannot encode the session: {e}")))?;
        write_atomic(&self.dir.join(STATE_FILE), &json)
    }

    fn set(&mut self, step: Step) -> Result<(), ClientError> {
        self.saved.step = step;
        self.save()
    }

    fn wrong_step(&self, wanted: &str) -> ClientError {
        ClientError::State(format!(
            "the session is at step `{}`; this needs step `{wanted}`",
            self.saved.step.name()
        ))
    }

    /// Drops whatever is in hand and goes back to idle (the host gives up on the round).
    pub fn reset(&mut self) -> Result<(), ClientError> {
        let _ = std::fs::remove_file(self.dir.join(UPDATE_FILE));
        self.set(Step::Idle)
    }

    /// Checks in, when the device's `conditions` meet the task's requirements (read from the
    /// task's plan first; when they do not, nothing is sent). Needs step `idle`.
    pub async fn check_in(&mut self, conditions: &Conditions) -> Result<Outcome, ClientError> {
        if self.saved.step != Step::Idle {
            return Err(self.wrong_step("idle"));
        }
        let task = self.saved.task.clone();
        let plan = self.transport.plan(&task).await?;
        if let Some(reason) = plan.requires.unmet(conditions) {
            return Ok(Outcome::NotEligible { reason });
        }
        let answer = self
            .transport
            .check_in(&task, &self.saved.device_id)
            .await?;
        match answer {
            CheckInAnswer::Retry {
                retry_after_secs,
                reason,
            } => Ok(Outcome::Wait {
                secs: retry_after_secs,
                reason,
            }),
            CheckInAnswer::Assigned {
                round,
                kind,
                base_version,
                token,
                deadline_secs,
                plan,
                ..
            } => {
                let deadline =
                    Duration::try_from_secs_f64(deadline_secs.clamp(0.0, 1e9)).unwrap_or_default();
                let assignment = Assignment {
                    round,
                    kind,
                    base_version,
                    token,
                    deadline_unix_ms: now_ms().saturating_add(deadline.as_millis() as i64),
                    plan,
                };
                self.set(Step::Assigned { assignment })?;
                Ok(Outcome::Assigned { round, kind })
            }
        }
    }

    /// Downloads the assignment's model and saves it locally. Needs step `assigned`. When the
    /// server's model has moved past the assignment's version, the round is over for this
    /// device: [`Outcome::Dropped`].
    pub async fn download(&mut self) -> Result<Outcome, ClientError> {
        let Step::Assigned { assignment } = self.saved.step.clone() else {
            return Err(self.wrong_step("assigned"));
        };
        let d = self
            .transport
            .download(&self.saved.task, None)
            .await?
            .ok_or_else(|| ClientError::Protocol("no model in the answer".into()))?;
        if d.version != assignment.base_version {
            self.set(Step::Idle)?;
            return Ok(Outcome::Dropped {
                reason: format!(
                    "the model moved on to version {} before the download (the round trains \
                     version {})",
                    d.version, assignment.base_version
                ),
            });
        }
        let c = checkpoint::decode(&d.body)
            .map_err(|e| ClientError::Protocol(format!("model download: {e}")))?;
        if c.version != d.version {
            return Err(ClientError::Protocol(format!(
                "model metadata says version {}, ETag says {}",
                c.version, d.version
            )));
        }
        write_atomic(&self.dir.join(MODEL_FILE), &d.body)?;
        self.set(Step::Downloaded { assignment })?;
        Ok(Outcome::Downloaded { version: d.version })
    }

    /// The local copy of the assignment's model (spec, version, parameters by tensor name),
    /// for a host that trains with its own framework. Needs step `downloaded` or `ready`.
    pub fn model(&self) -> Result<Checkpoint, ClientError> {
        if !matches!(
            self.saved.step,
            Step::Downloaded { .. } | Step::Ready { .. }
        ) {
            return Err(self.wrong_step("downloaded"));
        }
        let path = self.dir.join(MODEL_FILE);
        let bytes = std::fs::read(&path).map_err(|e| io_error("cannot read", &path, e))?;
        checkpoint::decode(&bytes)
            .map_err(|e| ClientError::State(format!("{} is corrupt: {e}", path.display())))
    }

    /// Trains the local model on `data` with the built-in trainer and the assignment's plan
    /// (or, in an evaluation round, scores it), and saves the encoded update. Needs step
    /// `downloaded`. CPU-bound: call it off an async runtime's reactor.
    pub fn train(&mut self, data: &Dataset) -> Result<Outcome, ClientError> {
        let Step::Downloaded { assignment } = self.saved.step.clone() else {
            return Err(self.wrong_step("downloaded"));
        };
        let c = self.model()?;
        let model = Model::new(c.spec).map_err(|e| ClientError::Protocol(e.to_string()))?;
        check_data(&model, data).map_err(|e| {
            ClientError::Data(format!("the local data does not fit the task's model: {e}"))
        })?;
        if assignment.kind == RoundKind::Evaluation {
            let e = model.evaluate(&c.params, data.features(), data.targets(), data.len());
            return self.submit_evaluation(
                data.len() as u64,
                f64::from(e.loss),
                e.accuracy.map(f64::from),
            );
        }
        let (body, report) = train::local_update(
            &model,
            &c.params,
            data,
            &assignment.plan,
            assignment.base_version,
            assignment.token.clone(),
            |_: Progress| std::ops::ControlFlow::<()>::Continue(()),
        )?;
        let ready = Ready::Update {
            examples: report.examples as u64,
            loss: Some(report.after.loss),
        };
        self.ready(assignment, &body, ready)
    }

    /// A host's own training: `params` are the new weights (by tensor name, the model's
    /// shapes) after training on `examples` examples, with the local `loss` if known; the
    /// update sent is their difference from the downloaded model. Needs step `downloaded`.
    pub fn submit_params(
        &mut self,
        params: &Parameters,
        examples: u64,
        loss: Option<f32>,
    ) -> Result<Outcome, ClientError> {
        let c = self.model()?;
        let delta = params.sub(&c.params).map_err(|e| {
            ClientError::Data(format!("the weights do not fit the task's model: {e}"))
        })?;
        self.submit_delta(&delta, examples, loss)
    }

    /// A host's own training, as the difference from the downloaded model. Needs step
    /// `downloaded`. The update is checked here as the server will check it (tensors,
    /// finiteness), so a bad one fails before it is sent.
    pub fn submit_delta(
        &mut self,
        delta: &Parameters,
        examples: u64,
        loss: Option<f32>,
    ) -> Result<Outcome, ClientError> {
        let Step::Downloaded { assignment } = self.saved.step.clone() else {
            return Err(self.wrong_step("downloaded"));
        };
        if assignment.kind == RoundKind::Evaluation {
            return Err(ClientError::State(
                "this is an evaluation round: submit a score (submit_evaluation), not weights"
                    .into(),
            ));
        }
        let c = self.model()?;
        let layout = c.spec.layout();
        let meta = UpdateMeta {
            base_version: assignment.base_version,
            examples,
            loss: loss.filter(|l| l.is_finite()),
            accuracy: None,
            token: assignment.token.clone(),
        };
        let body = update::encode(delta, &meta);
        update::check(body.clone(), &update::Rules::lenient(&layout))
            .map_err(|e| ClientError::Data(format!("the update would be refused: {e}")))?;
        self.ready(assignment, &body, Ready::Update { examples, loss })
    }

    /// An evaluation round's score from the host: `examples` scored, their mean `loss` and
    /// (classifiers) mean `accuracy`. Needs step `downloaded` in an evaluation round.
    pub fn submit_evaluation(
        &mut self,
        examples: u64,
        loss: f64,
        accuracy: Option<f64>,
    ) -> Result<Outcome, ClientError> {
        let Step::Downloaded { assignment } = self.saved.step.clone() else {
            return Err(self.wrong_step("downloaded"));
        };
        if assignment.kind != RoundKind::Evaluation {
            return Err(ClientError::State(
                "this is a training round: submit weights, not a score".into(),
            ));
        }
        let report = EvaluationReport {
            base_version: assignment.base_version,
            examples,
            loss,
            accuracy,
        };
        report
            .check()
            .map_err(|e| ClientError::Data(format!("the score would be refused: {e}")))?;
        self.set(Step::Ready {
            assignment,
            ready: Ready::Report {
                report: report.clone(),
            },
        })?;
        Ok(Outcome::Scored { report })
    }

    fn ready(
        &mut self,
        assignment: Assignment,
        body: &[u8],
        ready: Ready,
    ) -> Result<Outcome, ClientError> {
        write_atomic(&self.dir.join(UPDATE_FILE), body)?;
        let outcome = match &ready {
            Ready::Update { examples, loss } => Outcome::Trained {
                examples: *examples,
                loss: *loss,
            },
            Ready::Report { report } => Outcome::Scored {
                report: report.clone(),
            },
        };
        self.set(Step::Ready { assignment, ready })?;
        Ok(outcome)
    }

    /// The encoded update waiting to be uploaded (step `ready` of a training round).
    pub fn update_bytes(&self) -> Result<Vec<u8>, ClientError> {
        let path = self.dir.join(UPDATE_FILE);
        std::fs::read(&path).map_err(|e| io_error("cannot read", &path, e))
    }

    /// Uploads the update (or posts the report). Needs step `ready`. The same bytes go on
    /// every try.
    pub async fn upload(&mut self) -> Result<Outcome, ClientError> {
        let Step::Ready { assignment, ready } = self.saved.step.clone() else {
            return Err(self.wrong_step("ready"));
        };
        let task = self.saved.task.clone();
        let result = match &ready {
            Ready::Update { .. } => {
                let body = Bytes::from(self.update_bytes()?);
                self.transport
                    .upload(&task, assignment.round, &assignment.token, body)
                    .await
            }
            Ready::Report { report } => {
                self.transport
                    .evaluate(&task, assignment.round, &assignment.token, report)
                    .await
            }
        };
        match result {
            Ok(receipt) => {
                self.reset()?;
                Ok(Outcome::Delivered {
                    round: receipt.round,
                    updates_in_round: Some(receipt.updates_in_round),
                })
            }
            Err(e) if e.code() == Some(ErrorCode::DuplicateUpdate) => {
                self.reset()?;
                Ok(Outcome::Delivered {
                    round: assignment.round,
                    updates_in_round: None,
                })
            }
            Err(e) if round_gone(e.code()) => {
                self.reset()?;
                Ok(Outcome::Dropped {
                    reason: e.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the next step with the built-in trainer on `data`: check in (when `conditions`
    /// allow), download, train or score, or upload.
    pub async fn advance(
        &mut self,
        data: &Dataset,
        conditions: &Conditions,
    ) -> Result<Outcome, ClientError> {
        match self.saved.step {
            Step::Idle => self.check_in(conditions).await,
            Step::Assigned { .. } => self.download().await,
            Step::Downloaded { .. } => self.train(data),
            Step::Ready { .. } => self.upload().await,
        }
    }
}
