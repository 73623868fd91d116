//! The device loop: check in, wait when told to, download the model, train on local data,
//! upload the update. Only the update (a parameter difference, an example count, and the local
//! loss and accuracy) ever leaves the device; the data stays in this process.
//!
//! Every request runs under [`DeviceOptions::request_timeout`]. A request that fails in a way
//! worth repeating ([`ClientError::is_retryable`]: the server unreachable or silent, any 5xx,
//! or a retryable [`ErrorCode`]) is sent again after a jittered exponential back-off, or after
//! the answer's `Retry-After` when it is longer, each wait capped at
//! [`DeviceOptions::max_wait`]. The device gives up once the server has been failing for
//! [`DeviceOptions::give_up_after`], counted from the start of the first failed request; no
//! wait is longer than the time left, so it gives up at most one request timeout late.
//!
//! A trained update is kept and uploaded again (the same bytes) while its round is open: until
//! the round's deadline, as the check-in told it. It is dropped, and the device checks in
//! again, only when the server says the round no longer takes it (`round_closed`,
//! `stale_version`, `too_stale`, `invalid_token`, `duplicate_update`) or when the deadline
//! passes while the server is failing. Any other refusal is an error. A `duplicate_update`
//! answer to a second or later try means an earlier try got through (only this device holds
//! the token), so it counts as a contribution.
//!
//! With a plan that allows partial work ([`Plan::partial_work`], FedProx), the device stops
//! local training once the time since check-in passes the training budget
//! ([`Plan::training_budget_secs`]: the round's deadline minus a margin for the upload of a
//! tenth of it, at least 1 s and at most half), after the step under way, and uploads the
//! update of the steps it ran with the examples they trained on. Without it the device runs
//! every step, however late that makes it. Time is tokio's clock, read from the training
//! thread between steps.
//!
//! [`Plan::partial_work`]: starling_core::Plan::partial_work
//! [`Plan::training_budget_secs`]: starling_core::Plan::training_budget_secs

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use starling_core::privacy::LocalDp;
use starling_core::trainer::train::{self, check_data, Progress};
use starling_core::wire::checkpoint;
use starling_core::wire::protocol::{
    CheckInAnswer, ErrorCode, EvaluationReport, RoundKind, UploadReceipt,
};
use starling_core::{Dataset, Model, Parameters};
use tokio::time::Instant;

use crate::transport::{
    ModelDownload, Transport, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT,
};
use crate::ClientError;

/// How a device behaves.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The task to contribute to.
    pub task: String,
    /// Stop after this many accepted updates (`None`: run until stopped).
    pub rounds: Option<u64>,
    /// Longest single wait: a "come back later" answer, a `Retry-After`, or a back-off delay.
    pub max_wait: Duration,
    /// First back-off delay when the server is unreachable or failing.
    pub backoff_initial: Duration,
    /// Longest back-off delay.
    pub backoff_max: Duration,
    /// Give up when the server has been unreachable or failing this long, counted from the
    /// start of the first failed request (`None`: never). A hard deadline: no wait goes past
    /// it, so the device gives up at most one request timeout after it.
    pub give_up_after: Option<Duration>,
    /// Longest time to open a connection.
    pub connect_timeout: Duration,
    /// Longest time for one whole request, from connecting until the answer is read; a server
    /// that does not answer in this time counts as unreachable.
    pub request_timeout: Duration,
    /// An opaque, random id the device shows the server so that it gets at most one
    /// assignment per round. It identifies nothing outside this run.
    pub device_id: String,
    /// Time added to the device's clock for every local training step, as if each step took
    /// that much longer; nothing sleeps. Only the partial-work cut-off reads this clock, so
    /// tests and demonstrations can play a slow device on a fast machine without waiting.
    /// Zero (the default) for a real device.
    pub extra_step_time: Duration,
    /// Local differential privacy, for a device that trusts no server: every update is
    /// clipped and noised here before it is sent, and carries no loss, accuracy or example
    /// count ([`train::local_update_private`]); the device counts its own ε
    /// ([`DeviceReport::local_epsilon`]). `None` (the default): updates as the plan makes them.
    pub local_dp: Option<LocalDp>,
    /// The δ at which the device reports its local ε.
    pub local_dp_delta: f64,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            task: "linear".into(),
            rounds: Some(1),
            max_wait: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            give_up_after: Some(Duration::from_secs(300)),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            device_id: format!("{:016x}", rand::rng().random::<u64>()),
            extra_step_time: Duration::ZERO,
            local_dp: None,
            local_dp_delta: 1e-5,
        }
    }
}

/// What a device reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceEvent {
    /// Told to come back later.
    Waiting {
        /// Seconds to wait.
        secs: f64,
        /// The server's reason.
        reason: String,
    },
    /// Training for a round.
    Training {
        /// The round.
        round: u64,
        /// The version trained from.
        version: u64,
    },
    /// The update was accepted.
    Contributed {
        /// The round.
        round: u64,
        /// Examples trained on: the count the update reported (fewer than the local data's
        /// when partial work stopped training within the first epoch).
        examples: usize,
        /// Optimiser steps run.
        steps: usize,
        /// Optimiser steps the plan asked for: more than `steps` for partial work, when
        /// training stopped early to meet the round's deadline.
        planned_steps: usize,
        /// Local loss as training started: the training pass's over the first epoch
        /// (`TrainReport::before`).
        loss_before: f32,
        /// Local loss the update reported: the training pass's over the last epoch, or the
        /// whole local data's after training when the plan asks for it
        /// (`TrainReport::after`).
        loss_after: f32,
    },
    /// An evaluation round's report was accepted: the model's score on the local data.
    Evaluated {
        /// The round.
        round: u64,
        /// Examples scored.
        examples: usize,
        /// Mean loss of the round's model on them.
        loss: f32,
        /// Mean accuracy (classifiers).
        accuracy: Option<f32>,
    },
    /// The update arrived too late or for a finished round; the device tries the next round.
    Skipped {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// A request failed in a way worth repeating (the server unreachable, silent, or failing);
    /// the device sends it again after `retry_in`.
    Retrying {
        /// The error.
        error: String,
        /// Delay before the next try.
        retry_in: Duration,
    },
}

/// What a device did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceReport {
    /// Updates accepted.
    pub contributions: u64,
    /// Updates (or evaluation reports) skipped (late or stale).
    pub skipped: u64,
    /// Evaluation reports accepted (evaluation rounds; not counted in `contributions`).
    pub evaluations: u64,
    /// Accepted updates that were partial work: training stopped early to meet the round's
    /// deadline (counted in `contributions` too).
    pub partial: u64,
    /// With local differential privacy, the ε (at `local_dp_delta`) this device spent on the
    /// updates it sent in this run (each counted, whether or not the server took it).
    pub local_epsilon: Option<f64>,
    /// The last model version the device saw.
    pub last_version: Option<u64>,
    /// The last local loss after training.
    pub last_loss: Option<f32>,
}

struct Cached {
    version: u64,
    model: Model,
    params: Parameters,
}

/// A device: a transport, local data, and options.
pub struct Device<T> {
    transport: T,
    data: Arc<Dataset>,
    options: DeviceOptions,
    cached: Option<Cached>,
    /// When the current run of failed requests began (`None`: the last request got an answer).
    failing_since: Option<Instant>,
}

/// Runs `op` under the request timeout and repeats it while it fails in a way worth
/// repeating (see the module's docs). Returns the first answer that is not such a failure;
/// [`ClientError::GaveUp`] once the server has been failing for `give_up_after`; or the last
/// (retryable) error when the next try would not start before `until`.
async fn retry<R, F, Fut>(
    options: &DeviceOptions,
    failing_since: &mut Option<Instant>,
    until: Option<Instant>,
    on_event: &mut impl FnMut(&DeviceEvent),
    mut op: F,
) -> Result<R, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<R, ClientError>>,
{
    let mut delay = options.backoff_initial;
    loop {
        let attempt = Instant::now();
        let error = match tokio::time::timeout(options.request_timeout, op()).await {
            Ok(Err(e)) if e.is_retryable() => e,
            Ok(other) => {
                *failing_since = None;
                return other;
            }
            Err(_) => ClientError::Unreachable(format!(
                "no answer within the request timeout ({:?})",
                options.request_timeout
            )),
        };
        let since = *failing_since.get_or_insert(attempt);
        let now = Instant::now();
        let deadline = options
            .give_up_after
            .and_then(|limit| since.checked_add(limit));
        if deadline.is_some_and(|d| now >= d) {
            return Err(ClientError::GaveUp {
                after: now - since,
                last_error: error.to_string(),
            });
        }
        let (backoff, spread) = {
            let mut rng = rand::rng();
            (
                delay.mul_f64(rng.random_range(0.5..=1.0)),
                rng.random_range(1.0..=1.2),
            )
        };
        // The server's `Retry-After` is the least wait; a little more spreads the devices it
        // sent away together.
        let mut wait = error
            .retry_after()
            .map_or(backoff, |after| after.mul_f64(spread).max(backoff))
            .min(options.max_wait);
        if let Some(d) = deadline {
            wait = wait.min(d - now);
        }
        if until.is_some_and(|u| now.checked_add(wait).is_none_or(|next| next >= u)) {
            return Err(error);
        }
        on_event(&DeviceEvent::Retrying {
            error: error.to_string(),
            retry_in: wait,
        });
        tokio::time::sleep(wait).await;
        delay = delay.saturating_mul(2).min(options.backoff_max);
    }
}

/// What became of an upload (an update or an evaluation report, `what`) after `tries` tries:
/// taken (`None`), dropped with the reason (the round no longer takes it, or its deadline
/// passed while the server failed), or an error that ends the run.
fn dropped(
    result: Result<UploadReceipt, ClientError>,
    tries: u32,
    what: &str,
) -> Result<Option<String>, ClientError> {
    match result {
        Ok(_) => Ok(None),
        // Only this assignment holds the token: an earlier try got through even though its
        // answer was lost or was an error.
        Err(e) if e.code() == Some(ErrorCode::DuplicateUpdate) && tries > 1 => Ok(None),
        Err(e)
            if matches!(
                e.code(),
                Some(
                    ErrorCode::RoundClosed
                        | ErrorCode::StaleVersion
                        | ErrorCode::TooStale
                        | ErrorCode::WrongRoundKind
                        | ErrorCode::InvalidToken
                        | ErrorCode::DuplicateUpdate
                )
            ) =>
        {
            Ok(Some(match e {
                ClientError::Refused { message, .. } => message,
                other => other.to_string(),
            }))
        }
        // `retry` stopped because the round's deadline came while the server failed.
        Err(e) if e.is_retryable() => Ok(Some(format!(
            "the round's deadline passed before the server took the {what} ({e})"
        ))),
        Err(e) => Err(e),
    }
}

impl<T> std::fmt::Debug for Device<T> {
    /// The options and the data's size, never the data itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("options", &self.options)
            .field("examples", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Device<T> {
    /// A device with its data; sets the transport's timeouts from `options`.
    pub fn new(mut transport: T, data: Dataset, options: DeviceOptions) -> Self {
        transport.set_timeouts(options.connect_timeout, options.request_timeout);
        Self {
            transport,
            data: Arc::new(data),
            options,
            cached: None,
            failing_since: None,
        }
    }

    /// Makes sure the cached model is `version`; false when the server has moved past it.
    async fn ensure_model(
        &mut self,
        version: u64,
        on_event: &mut impl FnMut(&DeviceEvent),
    ) -> Result<bool, ClientError> {
        if self.cached.as_ref().is_some_and(|c| c.version == version) {
            return Ok(true);
        }
        let cached_version = self.cached.as_ref().map(|c| c.version);
        let task = self.options.task.clone();
        let download: Option<ModelDownload> = retry(
            &self.options,
            &mut self.failing_since,
            None,
            on_event,
            || self.transport.download(&task, cached_version),
        )
        .await?;
        if let Some(d) = download {
            let c = checkpoint::decode(&d.body)
                .map_err(|e| ClientError::Protocol(format!("model download: {e}")))?;
            let model = Model::new(c.spec).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let (params, v) = (c.params, c.version);
            if v != d.version {
                return Err(ClientError::Protocol(format!(
                    "model metadata says version {v}, ETag says {}",
                    d.version
                )));
            }
            check_data(&model, &self.data).map_err(|e| {
                ClientError::Data(format!("the local data does not fit the task's model: {e}"))
            })?;
            self.cached = Some(Cached {
                version: v,
                model,
                params,
            });
        }
        Ok(self.cached.as_ref().is_some_and(|c| c.version == version))
    }

    /// An evaluation round's part: reports the model's score on the local data (only the
    /// example count, mean loss and mean accuracy leave the device), retried like an upload
    /// until the round's deadline.
    #[allow(clippy::too_many_arguments)]
    async fn evaluate(
        &mut self,
        report: &mut DeviceReport,
        on_event: &mut impl FnMut(&DeviceEvent),
        round: u64,
        token: &str,
        base_version: u64,
        (scored, examples): (starling_core::trainer::model::Evaluation, usize),
        round_ends: Option<Instant>,
    ) -> Result<(), ClientError> {
        let loss = f64::from(scored.loss);
        if !loss.is_finite() {
            report.skipped += 1;
            on_event(&DeviceEvent::Skipped {
                round,
                reason: "the model's loss on the local data is not a finite number".into(),
            });
            return Ok(());
        }
        let body = EvaluationReport {
            base_version,
            examples: examples as u64,
            loss,
            accuracy: scored.accuracy.map(f64::from),
        };
        let task = self.options.task.clone();
        let mut tries = 0u32;
        let result = retry(
            &self.options,
            &mut self.failing_since,
            round_ends,
            on_event,
            || {
                tries += 1;
                self.transport.evaluate(&task, round, token, &body)
            },
        )
        .await;
        let skipped = dropped(result, tries, "report")?;
        match skipped {
            None => {
                report.evaluations += 1;
                on_event(&DeviceEvent::Evaluated {
                    round,
                    examples,
                    loss: scored.loss,
                    accuracy: scored.accuracy,
                });
            }
            Some(reason) => {
                report.skipped += 1;
                on_event(&DeviceEvent::Skipped { round, reason });
            }
        }
        Ok(())
    }

    /// Runs until `options.rounds` updates were accepted (or forever).
    pub async fn run(
        &mut self,
        mut on_event: impl FnMut(&DeviceEvent),
    ) -> Result<DeviceReport, ClientError> {
        let mut report = DeviceReport::default();
        let mut released = 0u64;
        let task = self.options.task.clone();
        let device_id = self.options.device_id.clone();
        while self.options.rounds.is_none_or(|r| report.contributions < r) {
            let answer = retry(
                &self.options,
                &mut self.failing_since,
                None,
                &mut on_event,
                || self.transport.check_in(&task, &device_id),
            )
            .await?;
            let checked_in = Instant::now();
            let (round, kind, base_version, token, deadline_secs, plan, secure) = match answer {
                CheckInAnswer::Retry {
                    retry_after_secs,
                    reason,
                } => {
                    let secs = if retry_after_secs.is_finite() {
                        retry_after_secs.clamp(0.0, self.options.max_wait.as_secs_f64())
                    } else {
                        self.options.max_wait.as_secs_f64()
                    };
                    on_event(&DeviceEvent::Waiting { secs, reason });
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    continue;
                }
                CheckInAnswer::Assigned {
                    round,
                    kind,
                    base_version,
                    token,
                    deadline_secs,
                    plan,
                    secure,
                    ..
                } => (
                    round,
                    kind,
                    base_version,
                    token,
                    deadline_secs,
                    plan,
                    secure,
                ),
            };
            // The round's deadline as this device sees it, no earlier than the server's
            // (`None`: too far away to matter).
            let round_ends = Duration::try_from_secs_f64(deadline_secs)
                .ok()
                .and_then(|d| checked_in.checked_add(d));
            if !self.ensure_model(base_version, &mut on_event).await? {
                // The round committed between check-in and download: ask again.
                continue;
            }
            let cached = self.cached.as_ref().expect("ensure_model filled the cache");
            report.last_version = Some(cached.version);
            if kind == RoundKind::Evaluation && self.options.local_dp.is_some() {
                // A score of the local data is not noised: a device under local DP sends none.
                report.skipped += 1;
                on_event(&DeviceEvent::Skipped {
                    round,
                    reason: "local differential privacy: this device sends no evaluation \
                             reports (they are not noised)"
                        .into(),
                });
                continue;
            }
            if kind == RoundKind::Evaluation {
                let (model, params, data) = (
                    cached.model.clone(),
                    cached.params.clone(),
                    self.data.clone(),
                );
                let scored = tokio::task::spawn_blocking(move || {
                    let e = model.evaluate(&params, data.features(), data.targets(), data.len());
                    (e, data.len())
                })
                .await
                .map_err(|e| ClientError::Protocol(format!("evaluation task failed: {e}")))?;
                self.evaluate(
                    &mut report,
                    &mut on_event,
                    round,
                    &token,
                    base_version,
                    scored,
                    round_ends,
                )
                .await?;
                continue;
            }
            on_event(&DeviceEvent::Training {
                round,
                version: base_version,
            });
            let (model, base, data, update_token) = (
                cached.model.clone(),
                cached.params.clone(),
                self.data.clone(),
                token.clone(),
            );
            // Partial work: when training stops, after the step under way (`None`: it runs
            // every step).
            let stop_at = plan
                .training_budget_secs(deadline_secs)
                .and_then(|b| Duration::try_from_secs_f64(b).ok())
                .and_then(|b| checked_in.checked_add(b));
            let extra_step_time = self.options.extra_step_time;
            let local_dp = self.options.local_dp;
            let (body, tr) = tokio::task::spawn_blocking(move || {
                let progress = |p: Progress| match stop_at {
                    Some(at) => {
                        let steps = u32::try_from(p.step).unwrap_or(u32::MAX);
                        let now = Instant::now().checked_add(extra_step_time.saturating_mul(steps));
                        if now.is_none_or(|now| now >= at) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    }
                    None => ControlFlow::Continue(()),
                };
                match &local_dp {
                    None => train::local_update(
                        &model,
                        &base,
                        &data,
                        &plan,
                        base_version,
                        update_token,
                        progress,
                    ),
                    // Local DP: clipped and noised here, from the OS-seeded thread generator,
                    // before the update leaves the device.
                    Some(ldp) => train::local_update_private(
                        &model,
                        &base,
                        &data,
                        &plan,
                        base_version,
                        update_token,
                        ldp,
                        &mut rand::rng(),
                        progress,
                    ),
                }
            })
            .await
            .map_err(|e| ClientError::Protocol(format!("training task failed: {e}")))??;
            if tr.is_partial() {
                tracing::info!(
                    round,
                    steps = tr.steps,
                    planned_steps = tr.planned_steps,
                    examples = tr.examples,
                    "partial work: stopped training to meet the round's deadline"
                );
            }
            if let Some(secure) = &secure {
                // Secure aggregation: the update goes out only masked, through the round's
                // steps; a round that moves on without this device (or closes) skips it.
                let layout = self
                    .cached
                    .as_ref()
                    .expect("ensure_model filled the cache")
                    .params
                    .layout();
                let result = crate::secure::contribute(
                    &self.transport,
                    round,
                    &token,
                    secure,
                    &layout,
                    &body,
                )
                .await;
                match result {
                    Ok(()) => {
                        report.contributions += 1;
                        report.last_loss = Some(tr.after.loss);
                        on_event(&DeviceEvent::Contributed {
                            round,
                            examples: tr.examples,
                            steps: tr.steps,
                            planned_steps: tr.planned_steps,
                            loss_before: tr.before.loss,
                            loss_after: tr.after.loss,
                        });
                    }
                    Err(ClientError::Refused {
                        code:
                            Some(
                                ErrorCode::RoundClosed
                                | ErrorCode::NotInCohort
                                | ErrorCode::WrongPhase
                                | ErrorCode::InvalidToken
                                | ErrorCode::UnknownRound,
                            ),
                        message,
                        ..
                    }) => {
                        report.skipped += 1;
                        on_event(&DeviceEvent::Skipped {
                            round,
                            reason: format!("secure round went on without this device: {message}"),
                        });
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            // Kept until the round takes it or no longer can: every try sends these bytes.
            let body = Bytes::from(body);
            let mut tries = 0u32;
            let result = retry(
                &self.options,
                &mut self.failing_since,
                round_ends,
                &mut on_event,
                || {
                    tries += 1;
                    self.transport.upload(&task, round, &token, body.clone())
                },
            )
            .await;
            // Every noised update that went out is a release, taken or not (its retries send
            // the same bytes: no new release).
            if let Some(ldp) = &self.options.local_dp {
                released += 1;
                report.local_epsilon = ldp.epsilon(released, self.options.local_dp_delta).ok();
            }
            let skipped = dropped(result, tries, "update")?;
            match skipped {
                None => {
                    report.contributions += 1;
                    report.partial += u64::from(tr.is_partial());
                    report.last_loss = Some(tr.after.loss);
                    on_event(&DeviceEvent::Contributed {
                        round,
                        examples: tr.examples,
                        steps: tr.steps,
                        planned_steps: tr.planned_steps,
                        loss_before: tr.before.loss,
                        loss_after: tr.after.loss,
                    });
                }
                Some(reason) => {
                    report.skipped += 1;
                    on_event(&DeviceEvent::Skipped { round, reason });
                }
            }
        }
        Ok(report)
    }
}
