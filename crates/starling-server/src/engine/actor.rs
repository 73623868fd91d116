//! The task that owns one task's round state. It answers check-ins, reserves uploads, and
//! closes rounds: commit (durably, then announce) or abandon.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use starling_core::aggregate::{FedAvgStrategy, Strategy};
use starling_core::checkpoint;
use starling_core::params::Layout;
use starling_core::Parameters;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::round::{ClosedRound, OpenRound};
use super::{
    Assignment, CheckIn, Command, EngineError, HandleInner, ModelState, TaskHandle, TaskStatus,
};
use crate::metrics::Metrics;
use crate::settings::TaskDefinition;
use crate::store::{now_ms, Checkpoint, RoundRecord, RoundStatus, Store};

struct Actor {
    def: TaskDefinition,
    layout: Layout,
    store: Store,
    metrics: Arc<Metrics>,
    strategy: Box<dyn Strategy>,
    model: ModelState,
    status: watch::Sender<TaskStatus>,
    shards: usize,
}

/// The served form of a checkpoint: safetensors with the task, version and spec as metadata.
fn model_state(def: &TaskDefinition, version: u64, params: Parameters) -> ModelState {
    let body = Bytes::from(checkpoint::encode(&def.name, version, &def.spec, &params));
    ModelState {
        version,
        params: Arc::new(params),
        body,
    }
}

fn new_token() -> String {
    let v: u128 = rand::rng().random();
    format!("{v:032x}")
}

/// Loads (or creates) a task in the store, opens its next round and starts its engine.
pub async fn spawn(
    def: TaskDefinition,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<TaskHandle, EngineError> {
    let (checkpoint, next_round) = store
        .ensure_task(&def.name, &def.spec, || def.spec.init_params(def.init_seed))
        .await?;
    let layout = def.spec.layout();
    let shards = std::thread::available_parallelism().map_or(2, |n| n.get());
    let model = model_state(&def, checkpoint.version, checkpoint.params);
    let round = OpenRound::open(
        next_round,
        model.version,
        &layout,
        &def.rounds,
        shards,
        now_ms(),
        Instant::now(),
    );
    tracing::info!(
        task = %def.name, version = model.version, round = round.number,
        "task ready"
    );
    let (status_tx, status_rx) = watch::channel(TaskStatus {
        model: model.clone(),
        round: round.info(),
        last_round: None,
    });
    let (tx, rx) = mpsc::channel(1024);
    let handle = TaskHandle {
        inner: Arc::new(HandleInner {
            name: def.name.clone(),
            spec: def.spec.clone(),
            plan: def.plan.clone(),
            policy: def.rounds.clone(),
            layout: layout.clone(),
            max_update_norm: def.max_update_norm,
            tx,
            status: status_rx,
            metrics: metrics.clone(),
        }),
    };
    let actor = Actor {
        def,
        layout,
        store,
        metrics,
        strategy: Box::new(FedAvgStrategy),
        model,
        status: status_tx,
        shards,
    };
    tokio::spawn(actor.run(round, rx));
    Ok(handle)
}

impl Actor {
    async fn run(mut self, mut round: OpenRound, mut rx: mpsc::Receiver<Command>) {
        loop {
            let closing = round.is_closing();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(&mut round, cmd),
                    None => break,
                },
                () = sleep_until(round.deadline), if !closing => {
                    round.deadline_passed(now_ms(), Instant::now());
                }
            }
            if round.ready_to_close() {
                round = self.close(round).await;
            }
            let info = round.info();
            self.status.send_if_modified(|s| {
                let changed = s.round != info;
                s.round = info;
                changed
            });
        }
        tracing::debug!(task = %self.def.name, "engine stopped");
    }

    /// The policy's retry time plus up to 50% jitter, so that devices do not come back
    /// together.
    fn retry_after(&self) -> Duration {
        let jitter = 1.0 + rand::rng().random_range(0.0..0.5);
        Duration::from_secs_f64(self.def.rounds.retry_secs * jitter)
    }

    /// One device's check-in: an assignment while the round has room, else a time to come
    /// back (pace steering).
    fn check_in(&self, round: &mut OpenRound, device: Option<String>) -> CheckIn {
        if device.as_ref().is_some_and(|d| round.has_device(d)) {
            return CheckIn::Retry {
                after: self.retry_after(),
                reason: "this device already has this round's assignment",
            };
        }
        if !round.has_room() {
            return CheckIn::Retry {
                after: self.retry_after(),
                reason: if round.is_closing() {
                    "the round is closing"
                } else {
                    "the round is full"
                },
            };
        }
        let token = new_token();
        round.assign(token.clone(), device);
        CheckIn::Assigned(Assignment {
            round: round.number,
            base_version: round.base_version,
            token,
            deadline_in: round.deadline.saturating_duration_since(Instant::now()),
            plan: self.def.plan.clone(),
        })
    }

    fn handle(&mut self, round: &mut OpenRound, cmd: Command) {
        match cmd {
            Command::CheckIn { devices, reply } => {
                let answers = devices
                    .into_iter()
                    .map(|device| {
                        let answer = self.check_in(round, device);
                        self.metrics.count_checkin(&answer);
                        answer
                    })
                    .collect();
                let _ = reply.send(answers);
            }
            Command::Reserve {
                round: number,
                updates,
                reply,
            } => {
                let results = updates
                    .into_iter()
                    .map(|(base_version, token)| {
                        if number == round.number {
                            round.reserve(base_version, &token)
                        } else if number >= 1 && number < round.number {
                            Err(EngineError::RoundClosed(number))
                        } else {
                            Err(EngineError::UnknownRound(number))
                        }
                    })
                    .collect();
                let _ = reply.send(results);
            }
            Command::Folded {
                round: number,
                tokens,
            } if number == round.number => {
                for t in &tokens {
                    round.folded(t);
                }
            }
            Command::Released {
                round: number,
                tokens,
            } if number == round.number => {
                for t in &tokens {
                    round.released(t);
                }
            }
            Command::Expire { round: number } if number == round.number => round.expire(),
            Command::Folded { .. } | Command::Released { .. } | Command::Expire { .. } => {}
        }
    }

    /// Closes `round` and opens the next one. A commit is durable before it is announced; a
    /// storage failure abandons the round and keeps the model.
    async fn close(&mut self, round: OpenRound) -> OpenRound {
        let (number, base, started) = (round.number, round.base_version, round.started_at_ms);
        let mut record = RoundRecord {
            round: number,
            status: RoundStatus::Abandoned,
            base_version: base,
            version: None,
            participants: round.updates(),
            examples: 0,
            mean_loss: None,
            mean_accuracy: None,
            started_at_ms: started,
            ended_at_ms: now_ms(),
            commit_ms: None,
        };
        let closing_started = std::time::Instant::now();
        let next_params = match round.close() {
            ClosedRound::Commit { aggregate } => {
                record.examples = aggregate.examples();
                record.mean_loss = aggregate.mean_loss();
                record.mean_accuracy = aggregate.mean_accuracy();
                match self.strategy.next_params(&self.model.params, &aggregate) {
                    Ok(params) => Some(params),
                    Err(e) => {
                        tracing::error!(task = %self.def.name, round = number, error = %e,
                            "strategy failed; round abandoned");
                        None
                    }
                }
            }
            ClosedRound::Abandon { updates } => {
                tracing::info!(
                    task = %self.def.name, round = number, updates,
                    min = self.def.rounds.min, "round abandoned at its deadline"
                );
                None
            }
        };
        let committed = match next_params {
            Some(params) => {
                let checkpoint = Checkpoint {
                    version: self.model.version + 1,
                    params,
                };
                let mut done = record.clone();
                done.status = RoundStatus::Committed;
                done.version = Some(checkpoint.version);
                done.commit_ms = Some(closing_started.elapsed().as_secs_f64() * 1e3);
                // Durable first, announced after (invariant 4).
                match self
                    .store
                    .record_round(&self.def.name, &done, Some(&checkpoint))
                    .await
                {
                    Ok(()) => {
                        record = done;
                        self.model = model_state(&self.def, checkpoint.version, checkpoint.params);
                        tracing::info!(
                            task = %self.def.name, round = number, version = self.model.version,
                            participants = record.participants, examples = record.examples,
                            mean_loss = record.mean_loss.unwrap_or(f64::NAN),
                            "round committed"
                        );
                        true
                    }
                    Err(e) => {
                        tracing::error!(task = %self.def.name, round = number, error = %e,
                            "could not store the round's checkpoint; round abandoned");
                        false
                    }
                }
            }
            None => false,
        };
        if !committed {
            if let Err(e) = self.store.record_round(&self.def.name, &record, None).await {
                tracing::error!(task = %self.def.name, round = number, error = %e,
                    "could not record the abandoned round");
            }
        }
        self.metrics.count_round(committed);
        if let Err(e) = self.store.open_round(&self.def.name, number + 1).await {
            tracing::error!(task = %self.def.name, error = %e, "could not record the round number");
        }
        let next = OpenRound::open(
            number + 1,
            self.model.version,
            &self.layout,
            &self.def.rounds,
            self.shards,
            now_ms(),
            Instant::now(),
        );
        let model = self.model.clone();
        self.status.send_modify(|s| {
            s.model = model;
            s.round = next.info();
            s.last_round = Some(record);
        });
        next
    }
}
