//! The device loop: check in, wait when told to, download the model, train on local data,
//! upload the update. Only the update (a parameter difference, an example count, and the local
//! loss and accuracy) ever leaves the device; the data stays in this process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use starling_core::checkpoint;
use starling_core::train::{self, check_data};
use starling_core::{Dataset, Model, Parameters};

use crate::transport::{CheckInReply, ModelDownload, Transport};
use crate::ClientError;

/// How a device behaves.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The task to contribute to.
    pub task: String,
    /// Stop after this many accepted updates (`None`: run until stopped).
    pub rounds: Option<u64>,
    /// Longest wait a "come back later" answer can impose.
    pub max_wait: Duration,
    /// First back-off delay when the server is unreachable.
    pub backoff_initial: Duration,
    /// Longest back-off delay.
    pub backoff_max: Duration,
    /// Give up when the server has been unreachable this long (`None`: never).
    pub give_up_after: Option<Duration>,
    /// An opaque, random id the device shows the server so that it gets at most one
    /// assignment per round. It identifies nothing outside this run.
    pub device_id: String,
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
            device_id: format!("{:016x}", rand::rng().random::<u64>()),
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
        /// Examples trained on.
        examples: usize,
        /// Local loss before training.
        loss_before: f32,
        /// Local loss after training.
        loss_after: f32,
    },
    /// The update arrived too late or for a finished round; the device tries the next round.
    Skipped {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The server could not be reached; retrying.
    Unreachable {
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
    /// Updates skipped (late or stale).
    pub skipped: u64,
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
}

impl<T: Transport> Device<T> {
    /// A device with its data.
    pub fn new(transport: T, data: Dataset, options: DeviceOptions) -> Self {
        Self {
            transport,
            data: Arc::new(data),
            options,
            cached: None,
        }
    }

    /// Retries `op` while the server is unreachable, with jittered exponential back-off.
    async fn retry<R, F, Fut>(
        &self,
        on_event: &mut impl FnMut(&DeviceEvent),
        mut op: F,
    ) -> Result<R, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<R, ClientError>>,
    {
        let started = tokio::time::Instant::now();
        let mut delay = self.options.backoff_initial;
        loop {
            match op().await {
                Err(ClientError::Unreachable(error)) => {
                    if let Some(limit) = self.options.give_up_after {
                        if started.elapsed() >= limit {
                            return Err(ClientError::GaveUp(limit));
                        }
                    }
                    let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
                    on_event(&DeviceEvent::Unreachable {
                        error,
                        retry_in: jittered,
                    });
                    tokio::time::sleep(jittered).await;
                    delay = (delay * 2).min(self.options.backoff_max);
                }
                other => return other,
            }
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
        let download: Option<ModelDownload> = self
            .retry(on_event, || self.transport.download(&task, cached_version))
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

    /// Runs until `options.rounds` updates were accepted (or forever).
    pub async fn run(
        &mut self,
        mut on_event: impl FnMut(&DeviceEvent),
    ) -> Result<DeviceReport, ClientError> {
        let mut report = DeviceReport::default();
        let task = self.options.task.clone();
        let device_id = self.options.device_id.clone();
        while self.options.rounds.is_none_or(|r| report.contributions < r) {
            let reply = self
                .retry(&mut on_event, || self.transport.check_in(&task, &device_id))
                .await?;
            let (round, base_version, token, plan) = match reply {
                CheckInReply::Retry {
                    retry_after_secs,
                    reason,
                } => {
                    let secs = retry_after_secs.clamp(0.0, self.options.max_wait.as_secs_f64());
                    on_event(&DeviceEvent::Waiting { secs, reason });
                    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                    continue;
                }
                CheckInReply::Assigned {
                    round,
                    base_version,
                    token,
                    plan,
                    ..
                } => (round, base_version, token, plan),
            };
            if !self.ensure_model(base_version, &mut on_event).await? {
                // The round committed between check-in and download: ask again.
                continue;
            }
            let cached = self.cached.as_ref().expect("ensure_model filled the cache");
            report.last_version = Some(cached.version);
            on_event(&DeviceEvent::Training {
                round,
                version: base_version,
            });
            let (model, base, data) = (
                cached.model.clone(),
                cached.params.clone(),
                self.data.clone(),
            );
            let (body, tr) = tokio::task::spawn_blocking(move || {
                train::local_update(&model, &base, &data, &plan, base_version, token, |_| {})
            })
            .await
            .map_err(|e| ClientError::Protocol(format!("training task failed: {e}")))??;
            let result = self
                .retry(&mut on_event, || {
                    self.transport.upload(&task, round, body.clone())
                })
                .await;
            match result {
                Ok(()) => {
                    report.contributions += 1;
                    report.last_loss = Some(tr.after.loss);
                    on_event(&DeviceEvent::Contributed {
                        round,
                        examples: tr.examples,
                        loss_before: tr.before.loss,
                        loss_after: tr.after.loss,
                    });
                }
                Err(ClientError::Refused { code, message, .. })
                    if matches!(
                        code.as_str(),
                        "round_closed" | "stale_version" | "duplicate_update"
                    ) =>
                {
                    report.skipped += 1;
                    on_event(&DeviceEvent::Skipped {
                        round,
                        reason: message,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}
