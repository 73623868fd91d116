//! The task that owns one task's round state. It answers check-ins, admits and reserves
//! uploads, moves the round through its phases ([`super::round`]) on the engine's clock — or,
//! in buffered mode, keeps the outstanding assignments and the buffer ([`super::buffer`]) —
//! and closes rounds: commit (checked, durably stored, then announced) or abandon with a
//! reason.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use starling_core::aggregate::Strategy;
use starling_core::wire::checkpoint;
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::RoundKind;
use starling_core::Parameters;
use tokio::sync::{mpsc, watch};

use super::buffer::{Buffered, Slot};
use super::clock::Clock;
use super::privacy::{Distributed, Privacy};
use super::round::{
    AbandonReason, ClosedRound, NoRoom, OpenRound, Phase, RoundLimits, RoundSummary,
};
use super::secagg::{Advance, SecureRound, SecureSetup};
use super::{
    Assignment, Caller, CheckIn, Command, EngineError, HandleInner, ModelState, Receipt, RoundInfo,
    TaskHandle, TaskStatus,
};
use crate::metrics::Metrics;
use crate::settings::{SecureAggregationPolicy, TaskDefinition, Weighting};
use crate::store::{RoundRecord, RoundStatus, Store, StoredVersion};

/// The task's mode: synchronous rounds, or buffered asynchronous training.
// One per task, moved between phases: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Mode {
    Rounds(Phase),
    Buffered(Buffered),
    Secure(SecureRound),
}

impl Mode {
    fn info(&self) -> RoundInfo {
        match self {
            Mode::Rounds(p) => p.info(),
            Mode::Buffered(b) => b.info(),
            Mode::Secure(r) => r.info(),
        }
    }

    fn summary(&self) -> RoundSummary {
        match self {
            Mode::Rounds(p) => p.summary(),
            Mode::Buffered(b) => b.summary(),
            Mode::Secure(r) => r.summary(),
        }
    }
}

struct Actor {
    def: TaskDefinition,
    layout: Layout,
    store: Store,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    strategy: Box<dyn Strategy>,
    model: ModelState,
    status: watch::Sender<TaskStatus>,
    partial_sums: usize,
    /// Training rounds committed since the last evaluation round opened.
    trained_since_evaluation: u32,
    /// Differential privacy's state, for a task with `[tasks.privacy]`.
    privacy: Option<Privacy>,
    /// Why the task no longer trains, once it stopped.
    stopped: Option<String>,
    /// The clip bound the handle's checks read (moved by adaptive clipping).
    clip: Arc<std::sync::atomic::AtomicU64>,
    /// An operator paused the task: check-ins are told to come back later.
    paused: bool,
    /// What a secure round needs, for a task with `[tasks.secure_aggregation]`.
    secure: Option<SecureSetup>,
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

/// Loads (or creates) a task in the store, resumes its strategy, opens its next round and
/// starts its engine on `clock`.
pub async fn spawn(
    def: TaskDefinition,
    store: Store,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
) -> Result<TaskHandle, EngineError> {
    let (stored, next_round) = store
        .ensure_task(&def.name, &def.spec, || {
            def.initial_params
                .clone()
                .unwrap_or_else(|| def.spec.init_params(def.init_seed))
        })
        .await?;
    let layout = def.spec.layout();
    let mut strategy: Box<dyn Strategy> = def.strategy.build(&layout);
    strategy.restore(&stored.strategy_state).map_err(|e| {
        EngineError::Store(crate::store::StoreError::StrategyState {
            task: def.name.clone(),
            message: e.to_string(),
        })
    })?;
    // Distributed DP: with secure aggregation the devices add the noise (Skellam, in the
    // ring), and the server only accounts for it.
    let distributed = match (&def.privacy, &def.secure_aggregation) {
        (Some(p), Some(sa)) => Some(Distributed {
            noise: sa.distributed_noise(p, &def.rounds, def.min_cohort, layout.numel()),
            min_devices: u64::from(def.rounds.min.max(def.min_cohort)),
            places: SecureAggregationPolicy::places(&def.rounds) as u64,
        }),
        _ => None,
    };
    let privacy = match &def.privacy {
        Some(policy) => Some(
            Privacy::resume(
                policy.clone(),
                def.rounds.goal,
                &stored.privacy_state,
                def.privacy_noise_seed,
                distributed,
            )
            .map_err(|e| {
                EngineError::Store(crate::store::StoreError::StrategyState {
                    task: def.name.clone(),
                    message: e.to_string(),
                })
            })?,
        ),
        None => None,
    };
    let stopped = privacy.as_ref().and_then(Privacy::exhausted);
    let paused = store.paused(&def.name).await?;
    let clip = Arc::new(std::sync::atomic::AtomicU64::new(
        privacy.as_ref().map_or(0.0, Privacy::clip).to_bits(),
    ));
    let partial_sums = std::thread::available_parallelism().map_or(2, |n| n.get());
    let model = model_state(&def, stored.version, stored.params);
    let secure = def.secure_aggregation.as_ref().map(|policy| SecureSetup {
        policy: policy.clone(),
        rounds: def.rounds.clone(),
        min_cohort: def.min_cohort,
        max_per_address: def.max_assignments_per_address,
        spec: starling_core::secagg::input::InputSpec {
            clip: policy.clip,
            loss_bound: policy.loss_bound,
            // Differential privacy fixes every device's weight.
            weight_cap: match def.weighting {
                Weighting::Examples if def.privacy.is_none() => Some(def.max_examples_per_update),
                _ => None,
            },
            noise_mu: distributed.map(|d| d.noise.mu),
        },
        layout: layout.clone(),
    });
    let mode = match &def.buffered {
        None if secure.is_some() => Mode::Secure(SecureRound::open(
            secure.as_ref().expect("matched"),
            next_round,
            model.version,
            clock.now(),
            clock.unix_ms(),
        )),
        None => Mode::Rounds(Phase::Open(open_round(
            &def,
            &layout,
            &*clock,
            partial_sums,
            next_round,
            RoundKind::Training,
            model.version,
        ))),
        Some(policy) => Mode::Buffered(Buffered::new(
            policy.clone(),
            def.max_assignments_per_address,
            &layout,
            partial_sums,
            next_round,
            model.version,
            clock.unix_ms(),
        )),
    };
    tracing::info!(
        task = %def.name, version = model.version, round = next_round,
        strategy = strategy.name(),
        mode = if def.buffered.is_some() { "buffered" } else if secure.is_some() { "secure" } else { "rounds" },
        "task ready"
    );
    let (status_tx, status_rx) = watch::channel(TaskStatus {
        model: model.clone(),
        round: mode.info(),
        last_round: None,
        stopped: stopped.clone(),
        epsilon_spent: privacy.as_ref().map(Privacy::spent),
        paused,
    });
    let (tx, rx) = mpsc::channel(1024);
    // Differential privacy fixes every update's weight: the sensitivity must not depend on a
    // claimed example count.
    let weighting = match if def.privacy.is_some() {
        Weighting::Uniform
    } else {
        def.weighting
    } {
        Weighting::Examples => starling_core::wire::update::Weighting::Examples {
            cap: def.max_examples_per_update,
        },
        Weighting::Uniform => starling_core::wire::update::Weighting::Uniform,
    };
    let handle = TaskHandle {
        inner: Arc::new(HandleInner {
            name: def.name.clone(),
            spec: def.spec.clone(),
            plan: def.plan.clone(),
            policy: def.rounds.clone(),
            buffered: def.buffered.clone(),
            privacy: def.privacy.clone(),
            admission: def.admission,
            enrollment_secret: def.enrollment_secret.clone(),
            clip: clip.clone(),
            rules: starling_core::wire::update::Rules {
                layout: layout.clone(),
                max_norm: Some(def.max_update_norm),
                weighting,
                clip: def.privacy.as_ref().map(|p| p.clip),
            },
            max_upload_bytes: starling_core::wire::update::max_encoded_len(&layout),
            secure_input_len: secure
                .as_ref()
                .map(|_| starling_core::secagg::input::input_len(layout.numel())),
            secure_aggregation: def.secure_aggregation.clone(),
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
        clock,
        strategy,
        model,
        status: status_tx,
        partial_sums,
        trained_since_evaluation: 0,
        privacy,
        stopped,
        clip,
        paused,
        secure,
    };
    tokio::spawn(actor.run(mode, rx));
    Ok(handle)
}

#[allow(clippy::too_many_arguments)]
fn open_round(
    def: &TaskDefinition,
    layout: &Layout,
    clock: &dyn Clock,
    partial_sums: usize,
    number: u64,
    kind: RoundKind,
    base_version: u64,
) -> OpenRound {
    OpenRound::open(
        number,
        kind,
        base_version,
        layout,
        &def.rounds,
        RoundLimits {
            min_cohort: def.min_cohort,
            max_per_address: def.max_assignments_per_address,
            at_most_goal: def.privacy.is_some(),
        },
        partial_sums,
        clock.now(),
        clock.unix_ms(),
    )
}

impl Actor {
    async fn run(mut self, mut mode: Mode, mut rx: mpsc::Receiver<Command>) {
        let mut stop = None;
        loop {
            let deadline = match &mode {
                Mode::Rounds(Phase::Open(r)) => Some(self.clock.sleep_until(r.deadline())),
                Mode::Secure(r) => Some(self.clock.sleep_until(r.deadline())),
                _ => None,
            };
            let (deadline_passed, ack) = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Stop { reply }) => {
                        stop = Some(reply);
                        break;
                    }
                    Some(mut cmd) => {
                        let ack = match &mut cmd {
                            Command::Folded { ack, .. } => ack.take(),
                            _ => None,
                        };
                        mode = self.handle(mode, cmd).await;
                        (false, ack)
                    }
                    None => break,
                },
                () = async { deadline.expect("armed only for open and secure rounds").await }, if deadline.is_some() => (true, None),
            };
            mode = match mode {
                Mode::Rounds(phase) => Mode::Rounds(self.advance(phase, deadline_passed).await),
                Mode::Buffered(mut b) => {
                    if b.is_full() {
                        let number = b.number();
                        let (summary, closed) = b.close();
                        let record = self.finish(summary, closed).await;
                        b.reopen(number + 1, self.model.version, self.clock.unix_ms());
                        self.publish(record, b.info()).await;
                    }
                    Mode::Buffered(b)
                }
                Mode::Secure(r) => Mode::Secure(self.advance_secure(r, deadline_passed).await),
            };
            let info = mode.info();
            self.status.send_if_modified(|s| {
                let changed = s.round != info;
                s.round = info;
                changed
            });
            if let Some(ack) = ack {
                // The uploads' receipts go out once the status counts them.
                let _ = ack.send(());
            }
        }
        // Requests still queued are answered `unavailable` as their replies drop with `rx`.
        drop(rx);
        tracing::debug!(task = %self.def.name, "engine stopped");
        if let Some(reply) = stop {
            let _ = reply.send(());
        }
    }

    /// Moves a synchronous round on: past its deadline, to draining at its goal, and closed
    /// (with the next one opened) once nothing is in flight.
    async fn advance(&mut self, mut phase: Phase, deadline_passed: bool) -> Phase {
        if deadline_passed {
            if let Phase::Open(r) = phase {
                phase = r.deadline_passed(self.clock.now(), self.clock.unix_ms());
            }
        }
        phase = phase.advance();
        if let Phase::Draining(r) = phase {
            phase = if r.is_idle() {
                let (summary, closed) = r.close();
                let record = self.finish(summary, closed).await;
                Phase::Open(self.open_next(record).await)
            } else {
                Phase::Draining(r)
            };
        }
        phase
    }

    /// Moves a secure round through its steps; when it closes (abandoned, or unmasked and
    /// decoded off the reactor), finishes it like any round and opens the next.
    async fn advance_secure(&mut self, round: SecureRound, deadline_passed: bool) -> SecureRound {
        let (summary, closed) =
            match round.advance(deadline_passed, self.clock.now(), self.clock.unix_ms()) {
                Advance::Continue(r) => return r,
                Advance::Abandon(summary, reason) => (
                    summary,
                    ClosedRound::Abandon {
                        updates: summary.updates,
                        reason,
                    },
                ),
                Advance::Unmasked(summary, unmasked) => {
                    let closed = match tokio::task::spawn_blocking(move || unmasked.finish()).await
                    {
                        Ok(Ok(sum)) => ClosedRound::Commit { sum },
                        Ok(Err(reason)) => ClosedRound::Abandon {
                            updates: summary.updates,
                            reason,
                        },
                        Err(_) => ClosedRound::Abandon {
                            updates: summary.updates,
                            reason: AbandonReason::UnmaskFailed,
                        },
                    };
                    (summary, closed)
                }
            };
        let record = self.finish(summary, closed).await;
        self.open_next_secure(record).await
    }

    /// Opens the secure round after `record`'s and publishes it with the model and record.
    async fn open_next_secure(&mut self, record: RoundRecord) -> SecureRound {
        let setup = self.secure.as_ref().expect("a secure task");
        let next = SecureRound::open(
            setup,
            record.round + 1,
            self.model.version,
            self.clock.now(),
            self.clock.unix_ms(),
        );
        self.publish(record, next.info()).await;
        next
    }

    /// One device's check-in to a secure round: a place while it advertises keys.
    fn check_in_secure(&self, round: &mut SecureRound, caller: Caller) -> CheckIn {
        let token = new_token();
        match round.assign(&token, caller.device.as_deref(), caller.address) {
            Ok(seat) => CheckIn::Assigned(Assignment {
                round: round.number(),
                kind: RoundKind::Training,
                base_version: round.base_version(),
                token,
                deadline_in: round.time_to_masked_input(self.clock.now()),
                plan: self.def.plan.clone(),
                secure: Some(seat),
            }),
            Err(no) => CheckIn::Retry {
                after: self.retry_after(),
                reason: no.reason(),
            },
        }
    }

    /// The policy's retry time plus up to 50% jitter, so that devices do not come back
    /// together.
    fn retry_after(&self) -> Duration {
        let jitter = 1.0 + rand::rng().random_range(0.0..0.5);
        Duration::from_secs_f64(self.def.rounds.retry_secs * jitter)
    }

    /// One device's check-in: an assignment while the round has room for it, else a time to
    /// come back (pace steering).
    fn check_in(&self, phase: &mut Phase, caller: Caller) -> CheckIn {
        let Phase::Open(round) = phase else {
            return CheckIn::Retry {
                after: self.retry_after(),
                reason: NoRoom::Closing.reason(),
            };
        };
        let token = new_token();
        match round.assign(&token, caller.device.as_deref(), caller.address) {
            Ok(()) => CheckIn::Assigned(Assignment {
                round: phase.number(),
                kind: phase.info().kind,
                base_version: phase.base_version(),
                token,
                deadline_in: match phase {
                    Phase::Open(r) => r.deadline().saturating_sub(self.clock.now()),
                    Phase::Draining(_) => Duration::ZERO,
                },
                plan: self.def.plan.clone(),
                secure: None,
            }),
            Err(no) => CheckIn::Retry {
                after: self.retry_after(),
                reason: no.reason(),
            },
        }
    }

    /// One device's check-in in buffered mode: an assignment on the current version while
    /// fewer than `concurrency` are outstanding.
    fn check_in_buffered(&self, b: &mut Buffered, caller: Caller) -> CheckIn {
        let token = new_token();
        match b.assign(
            &token,
            caller.device.as_deref(),
            caller.address,
            self.model.version,
            self.clock.now(),
        ) {
            Ok(()) => CheckIn::Assigned(Assignment {
                round: b.number(),
                kind: RoundKind::Training,
                base_version: self.model.version,
                token,
                deadline_in: b.lifetime(),
                plan: self.def.plan.clone(),
                secure: None,
            }),
            Err(no) => CheckIn::Retry {
                after: self.retry_after(),
                reason: no.reason(),
            },
        }
    }

    /// An evaluation report's weight: as an update's (the capped example count, or 1).
    fn report_weight(&self, examples: u64) -> f64 {
        match self.def.weighting {
            Weighting::Examples => examples.min(self.def.max_examples_per_update) as f64,
            Weighting::Uniform => 1.0,
        }
    }

    /// A batch of check-ins answered in order by `one`, each counted in the metrics.
    fn answer(
        &self,
        callers: Vec<Caller>,
        mut one: impl FnMut(&Self, Caller) -> CheckIn,
    ) -> Vec<CheckIn> {
        callers
            .into_iter()
            .map(|caller| {
                let answer = one(self, caller);
                self.metrics.count_checkin(&answer);
                answer
            })
            .collect()
    }

    /// The round a buffered-mode upload names: one of the buffers so far (the token says
    /// which), never a later one.
    fn known_buffer(b: &Buffered, number: u64) -> Result<(), EngineError> {
        if number >= 1 && number <= b.number() {
            Ok(())
        } else {
            Err(EngineError::UnknownRound(number))
        }
    }

    /// The round a request names, against the open one: earlier rounds are closed, later
    /// ones do not exist.
    fn same_round(phase: &Phase, number: u64) -> Result<(), EngineError> {
        if number == phase.number() {
            Ok(())
        } else if number >= 1 && number < phase.number() {
            Err(EngineError::RoundClosed(number))
        } else {
            Err(EngineError::UnknownRound(number))
        }
    }

    async fn handle(&mut self, mode: Mode, cmd: Command) -> Mode {
        match cmd {
            Command::Pause { paused, reply } => {
                let result = self.store.set_paused(&self.def.name, paused).await;
                if result.is_ok() && self.paused != paused {
                    self.paused = paused;
                    tracing::warn!(task = %self.def.name, paused, "operator paused or resumed the task");
                    self.status.send_modify(|s| s.paused = paused);
                }
                let _ = reply.send(result.map_err(EngineError::from));
                mode
            }
            Command::CheckIn { callers, reply } if self.paused => {
                let answers = self.answer(callers, |a, _| CheckIn::Retry {
                    after: a.retry_after(),
                    reason: "the task is paused by its operator",
                });
                let _ = reply.send(Ok(answers));
                mode
            }
            Command::Install { params, reply } => {
                let (result, next) = self.install(mode, params).await;
                let _ = reply.send(result);
                next
            }
            Command::Secure { reply, .. } if !matches!(mode, Mode::Secure(_)) => {
                let info = mode.info();
                let _ = reply.send(Err(EngineError::WrongPhase {
                    round: info.round,
                    phase: "plain",
                    hint: "this task does not use secure aggregation",
                }));
                mode
            }
            cmd => match mode {
                Mode::Rounds(phase) => self.handle_rounds(phase, cmd).await,
                Mode::Buffered(b) => self.handle_buffered(b, cmd).await,
                Mode::Secure(r) => self.handle_secure(r, cmd).await,
            },
        }
    }

    async fn handle_rounds(&mut self, mut phase: Phase, cmd: Command) -> Mode {
        match cmd {
            Command::CheckIn { reply, .. } if self.stopped.is_some() => {
                let reason = self.stopped.clone().unwrap_or_default();
                let _ = reply.send(Err(EngineError::TaskStopped(reason)));
            }
            Command::CheckIn { callers, reply } => {
                let answers = self.answer(callers, |a, caller| a.check_in(&mut phase, caller));
                let _ = reply.send(Ok(answers));
            }
            Command::Admit {
                round,
                token,
                device,
                reply,
            } => {
                let _ = reply.send(
                    Self::same_round(&phase, round)
                        .and_then(|()| phase.check_owner(&token, device.as_deref()))
                        .and_then(|()| phase.admit(&token)),
                );
            }
            Command::Reserve {
                round,
                updates,
                reply,
            } => {
                let results = updates
                    .into_iter()
                    .map(|(base_version, token)| {
                        Self::same_round(&phase, round)?;
                        phase
                            .reserve(base_version, &token)
                            .map(|sums| Slot::Reserved {
                                sums,
                                discount: 1.0,
                                round,
                            })
                    })
                    .collect();
                let _ = reply.send(results);
            }
            Command::Folded { round, tokens, .. } if round == phase.number() => {
                for t in &tokens {
                    phase.folded(t);
                }
            }
            Command::Released { round, tokens } if round == phase.number() => {
                for t in &tokens {
                    phase.released(t);
                }
            }
            Command::Folded { .. } | Command::Released { .. } => {}
            // Handled for every mode in `handle` and `run`.
            Command::Pause { .. }
            | Command::Install { .. }
            | Command::Stop { .. }
            | Command::Secure { .. } => {}
            Command::Evaluate {
                round,
                token,
                device,
                report,
                reply,
            } => {
                let weight = self.report_weight(report.examples);
                let result = Self::same_round(&phase, round)
                    .and_then(|()| phase.check_owner(&token, device.as_deref()))
                    .and_then(|()| phase.evaluate(&token, &report, weight))
                    .map(|n| Receipt {
                        round,
                        updates_in_round: n,
                    });
                let _ = reply.send(result);
            }
            Command::Rollback { version, reply } => {
                let (result, next) = self.rollback(Mode::Rounds(phase), version).await;
                let _ = reply.send(result);
                return next;
            }
        }
        Mode::Rounds(phase)
    }

    async fn handle_secure(&mut self, mut round: SecureRound, cmd: Command) -> Mode {
        let number = round.number();
        let same = |n: u64| {
            if n == number {
                Ok(())
            } else if n >= 1 && n < number {
                Err(EngineError::RoundClosed(n))
            } else {
                Err(EngineError::UnknownRound(n))
            }
        };
        let plain_upload = || EngineError::WrongPhase {
            round: number,
            phase: round.step().as_str(),
            hint: "this round is secure: send a masked input, not an update",
        };
        match cmd {
            // A spent privacy budget stops secure rounds too (distributed DP).
            Command::CheckIn { reply, .. } if self.stopped.is_some() => {
                let reason = self.stopped.clone().unwrap_or_default();
                let _ = reply.send(Err(EngineError::TaskStopped(reason)));
            }
            Command::CheckIn { callers, reply } => {
                let answers =
                    self.answer(callers, |a, caller| a.check_in_secure(&mut round, caller));
                let _ = reply.send(Ok(answers));
            }
            Command::Admit {
                round: n, reply, ..
            } => {
                let _ = reply.send(same(n).and_then(|()| Err(plain_upload())));
            }
            Command::Reserve {
                round: n,
                updates,
                reply,
            } => {
                let results = updates
                    .iter()
                    .map(|_| same(n).and_then(|()| Err(plain_upload())))
                    .collect();
                let _ = reply.send(results);
            }
            Command::Evaluate {
                round: n, reply, ..
            } => {
                let _ = reply.send(same(n).and_then(|()| {
                    Err(EngineError::WrongRoundKind {
                        round: n,
                        kind: RoundKind::Training,
                    })
                }));
            }
            Command::Secure {
                round: n,
                token,
                device,
                request,
                reply,
            } => {
                let now = self.clock.now();
                let result =
                    same(n).and_then(|()| round.handle(&token, device.as_deref(), request, now));
                let _ = reply.send(result);
            }
            Command::Rollback { version, reply } => {
                let (result, next) = self.rollback(Mode::Secure(round), version).await;
                let _ = reply.send(result);
                return next;
            }
            // Nothing is reserved in a secure round.
            Command::Folded { .. } | Command::Released { .. } => {}
            // Handled for every mode in `handle` and `run`.
            Command::Pause { .. } | Command::Install { .. } | Command::Stop { .. } => {}
        }
        Mode::Secure(round)
    }

    async fn handle_buffered(&mut self, mut b: Buffered, cmd: Command) -> Mode {
        let now = self.clock.now();
        match cmd {
            Command::CheckIn { callers, reply } => {
                let answers = self.answer(callers, |a, caller| a.check_in_buffered(&mut b, caller));
                let _ = reply.send(Ok(answers));
            }
            Command::Admit {
                round,
                token,
                device,
                reply,
            } => {
                let _ = reply.send(
                    Self::known_buffer(&b, round)
                        .and_then(|()| b.check_owner(&token, device.as_deref()))
                        .and_then(|()| b.admit(round, &token, now)),
                );
            }
            Command::Reserve {
                round,
                updates,
                reply,
            } => {
                let version = self.model.version;
                let results = updates
                    .into_iter()
                    .map(|(base_version, token)| {
                        Self::known_buffer(&b, round)?;
                        b.reserve(round, base_version, &token, version, now)
                    })
                    .collect();
                let _ = reply.send(results);
            }
            Command::Folded { round, tokens, .. } => {
                for t in &tokens {
                    b.folded(round, t);
                }
            }
            Command::Released { round, tokens } => {
                for t in &tokens {
                    b.released(round, t);
                }
            }
            Command::Evaluate { round, reply, .. } => {
                let _ = reply.send(Self::known_buffer(&b, round).and_then(|()| {
                    Err(EngineError::WrongRoundKind {
                        round,
                        kind: RoundKind::Training,
                    })
                }));
            }
            Command::Rollback { version, reply } => {
                let (result, next) = self.rollback(Mode::Buffered(b), version).await;
                let _ = reply.send(result);
                return next;
            }
            // Handled for every mode in `handle` and `run`.
            Command::Pause { .. }
            | Command::Install { .. }
            | Command::Stop { .. }
            | Command::Secure { .. } => {}
        }
        Mode::Buffered(b)
    }

    /// An operator's rollback: the open round ends (its updates were built on the version
    /// being rolled back), and `version`'s parameters and strategy state become a new
    /// version. A rollback to a version that is not stored changes nothing.
    async fn rollback(&mut self, mode: Mode, version: u64) -> (Result<u64, EngineError>, Mode) {
        let target = match self
            .store
            .version(&self.def.name, &self.def.spec, version)
            .await
        {
            Ok(Some(v)) => v,
            Ok(None) => return (Err(EngineError::UnknownVersion(version)), mode),
            Err(e) => return (Err(e.into()), mode),
        };
        if let Err(e) = self.strategy.restore(&target.strategy_state) {
            tracing::error!(task = %self.def.name, error = %e, "cannot restore the strategy state");
            return (Err(EngineError::UnknownVersion(version)), mode);
        }
        let from = self.model.version;
        let (result, next) = self
            .replace_model(
                mode,
                target.params,
                target.strategy_state,
                AbandonReason::RolledBack,
            )
            .await;
        if let Ok(new_version) = result {
            tracing::warn!(task = %self.def.name, from, to = version, new_version, "rolled back");
        }
        (result, next)
    }

    /// An operator's own model: checked to be finite, installed as the next version with the
    /// strategy started afresh (momentum built on the old model means nothing for it).
    async fn install(
        &mut self,
        mode: Mode,
        params: Parameters,
    ) -> (Result<u64, EngineError>, Mode) {
        if let Some((name, _)) = params
            .iter()
            .find(|(_, t)| t.data().iter().any(|v| !v.is_finite()))
        {
            return (
                Err(EngineError::InvalidModel(format!(
                    "tensor `{name}` holds NaN or an infinity"
                ))),
                mode,
            );
        }
        let fresh = self.def.strategy.build(&self.layout);
        let state = fresh.state();
        let (result, next) = self
            .replace_model(mode, params, state, AbandonReason::ModelReplaced)
            .await;
        if result.is_ok() {
            self.strategy = fresh;
            tracing::warn!(task = %self.def.name, version = ?result.as_ref().ok(), "operator installed a model");
        }
        (result, next)
    }

    /// Ends the open round (its updates were built on the version being replaced) and
    /// commits `params` with `strategy_state` as the next version.
    async fn replace_model(
        &mut self,
        mode: Mode,
        params: Parameters,
        strategy_state: Vec<u8>,
        reason: AbandonReason,
    ) -> (Result<u64, EngineError>, Mode) {
        let new_version = self.model.version + 1;
        let mut record = self.abandoned(mode.summary(), reason);
        record.version = Some(new_version);
        let stored = StoredVersion {
            version: new_version,
            params,
            strategy_state,
            // Privacy spent stays spent: the new version carries today's ledger.
            privacy_state: self
                .privacy
                .as_ref()
                .map(Privacy::state)
                .unwrap_or_default(),
        };
        if let Err(e) = self
            .store
            .record_round(&self.def.name, &record, Some(&stored), &self.def.retention)
            .await
        {
            tracing::error!(task = %self.def.name, error = %e, "could not store the new version");
            return (Err(e.into()), mode);
        }
        self.model = model_state(&self.def, new_version, stored.params);
        self.metrics.count_round(false);
        let next = match mode {
            Mode::Rounds(_) => Mode::Rounds(Phase::Open(self.open_next(record).await)),
            Mode::Secure(_) => Mode::Secure(self.open_next_secure(record).await),
            Mode::Buffered(mut b) => {
                // Outstanding assignments stay; their updates count as stale against the new
                // version, and updates in flight into the abandoned buffer are dropped.
                let number = b.number() + 1;
                b.reopen(number, self.model.version, self.clock.unix_ms());
                self.publish(record, b.info()).await;
                Mode::Buffered(b)
            }
        };
        (Ok(new_version), next)
    }

    /// Checks a commit's next parameters: finite, and a step no longer than the task's bound
    /// (the weighted mean of updates within the bound is within it too, so only a strategy
    /// fault or an overflow can break it).
    fn check_step(&self, next: &Parameters) -> Result<(), AbandonReason> {
        let mut sq = 0.0f64;
        for ((_, new), (_, old)) in next.iter().zip(self.model.params.iter()) {
            for (&a, &b) in new.data().iter().zip(old.data()) {
                if !a.is_finite() {
                    return Err(AbandonReason::NonFiniteModel);
                }
                let d = f64::from(a) - f64::from(b);
                sq += d * d;
            }
        }
        // Rounding the new parameters to f32 may lengthen the step by a hair.
        if sq.sqrt() > self.def.max_update_norm * (1.0 + 1e-5) + 1e-6 {
            return Err(AbandonReason::StepTooLarge);
        }
        Ok(())
    }

    /// Closes a round (or a buffer): a commit is checked, then durable, then becomes the
    /// current model (announced by the caller); any failure abandons the round with its
    /// reason and keeps the model. Returns the round's record.
    async fn finish(&mut self, summary: RoundSummary, closed: ClosedRound) -> RoundRecord {
        let number = summary.number;
        if let ClosedRound::Evaluated {
            examples,
            mean_loss,
            mean_accuracy,
        } = closed
        {
            let mut record = self.abandoned(summary, AbandonReason::BelowMinimum);
            record.status = RoundStatus::Evaluated;
            record.reason = None;
            record.examples = examples;
            record.mean_loss = Some(mean_loss);
            record.mean_accuracy = mean_accuracy;
            tracing::info!(
                task = %self.def.name, round = number, version = summary.base_version,
                participants = record.participants, examples, mean_loss,
                "evaluation round done"
            );
            if let Err(e) = self
                .store
                .record_round(&self.def.name, &record, None, &self.def.retention)
                .await
            {
                tracing::error!(task = %self.def.name, round = number, error = %e,
                    "could not record the evaluation round");
            }
            return record;
        }
        let mut record = self.abandoned(summary, AbandonReason::BelowMinimum);
        let closing_started = std::time::Instant::now();
        // The strategy's state before this round's step: a round that does not commit must
        // not move it (the stored state is the committed version's).
        let state_before = self.strategy.state();
        // A private round's release: noise on the sum, the ledger entry and the accountant
        // it leaves, adopted only once the version is stored.
        let mut released = None;
        let next_params = match closed {
            ClosedRound::Commit { mut sum } => {
                match self.privacy.as_ref().map(|p| p.release(&mut sum, number)) {
                    Some(Err(reason)) => {
                        tracing::error!(task = %self.def.name, round = number,
                        "round not released: {reason}");
                        Err(AbandonReason::PrivacyBudget)
                    }
                    release => {
                        released = release.map(|r| r.expect("errors handled above"));
                        match self.strategy.next_params(&self.model.params, &sum) {
                            Ok(params) => match self.check_step(&params) {
                                Ok(()) => {
                                    // Under differential privacy only the noised model is released:
                                    // no un-noised statistics of the devices (example counts, their
                                    // losses) are published with it.
                                    if released.is_none() {
                                        record.examples = sum.examples();
                                        record.mean_loss = sum.mean_loss();
                                        record.mean_accuracy = sum.mean_accuracy();
                                    }
                                    Ok(params)
                                }
                                Err(reason) => Err(reason),
                            },
                            Err(e) => {
                                tracing::error!(task = %self.def.name, round = number, error = %e,
                            "strategy failed; round abandoned");
                                Err(AbandonReason::StrategyFailed)
                            }
                        }
                    }
                }
            }
            ClosedRound::Abandon { reason, .. } => Err(reason),
            ClosedRound::Evaluated { .. } => unreachable!("handled above"),
        };
        let committed = match next_params {
            Ok(params) => {
                let stored = StoredVersion {
                    version: self.model.version + 1,
                    params,
                    strategy_state: self.strategy.state(),
                    privacy_state: released
                        .as_ref()
                        .map(|(_, acc)| Privacy::state_of(acc))
                        .unwrap_or_default(),
                };
                let mut done = record.clone();
                done.status = RoundStatus::Committed;
                done.reason = None;
                done.privacy = released.as_ref().map(|(entry, _)| entry.clone());
                done.version = Some(stored.version);
                done.commit_ms = Some(closing_started.elapsed().as_secs_f64() * 1e3);
                // Durable first, announced after (invariant 4).
                match self
                    .store
                    .record_round(&self.def.name, &done, Some(&stored), &self.def.retention)
                    .await
                {
                    Ok(()) => {
                        record = done;
                        self.trained_since_evaluation += 1;
                        if let (Some(p), Some((_, state))) = (&mut self.privacy, released) {
                            p.adopt(state);
                            // The next round's checks clip at its bound: stored before the
                            // round opens, so every check of its updates sees it.
                            self.clip
                                .store(p.clip().to_bits(), std::sync::atomic::Ordering::Release);
                        }
                        self.model = model_state(&self.def, stored.version, stored.params);
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
                        record.reason = Some(AbandonReason::StorageFailed);
                        false
                    }
                }
            }
            Err(reason) => {
                record.reason = Some(reason);
                let level_warn = reason != AbandonReason::BelowMinimum;
                if level_warn {
                    tracing::warn!(task = %self.def.name, round = number, reason = reason.as_str(),
                        "round abandoned; the model stays");
                } else {
                    tracing::info!(task = %self.def.name, round = number,
                        updates = summary.updates, min = self.def.rounds.min,
                        "round abandoned at its deadline");
                }
                false
            }
        };
        if !committed {
            if let Err(e) = self.strategy.restore(&state_before) {
                tracing::error!(task = %self.def.name, round = number, error = %e,
                    "could not put the strategy state back");
            }
            if let Err(e) = self
                .store
                .record_round(&self.def.name, &record, None, &self.def.retention)
                .await
            {
                tracing::error!(task = %self.def.name, round = number, error = %e,
                    "could not record the abandoned round");
            }
        }
        self.metrics.count_round(committed);
        record
    }

    /// The record of a round that ends without a new version: no statistics beyond its
    /// participant count (nothing is published about a round that did not commit).
    fn abandoned(&self, summary: RoundSummary, reason: AbandonReason) -> RoundRecord {
        RoundRecord {
            round: summary.number,
            kind: summary.kind,
            status: RoundStatus::Abandoned,
            reason: Some(reason),
            base_version: summary.base_version,
            version: None,
            participants: summary.updates,
            examples: 0,
            mean_loss: None,
            mean_accuracy: None,
            started_at_ms: summary.started_at_ms,
            ended_at_ms: self.clock.unix_ms(),
            commit_ms: None,
            privacy: None,
        }
    }

    /// Opens the round after `record`'s on the current model and publishes the model, the
    /// new round and the finished round's record together.
    async fn open_next(&mut self, record: RoundRecord) -> OpenRound {
        // Every `evaluate_every` committed training rounds, a federated evaluation round.
        let every = self.def.evaluate_every;
        let kind = if every > 0 && self.trained_since_evaluation >= every {
            self.trained_since_evaluation = 0;
            RoundKind::Evaluation
        } else {
            RoundKind::Training
        };
        let next = open_round(
            &self.def,
            &self.layout,
            &*self.clock,
            self.partial_sums,
            record.round + 1,
            kind,
            self.model.version,
        );
        self.publish(record, next.info()).await;
        next
    }

    /// Records that the round after `record`'s is open (so a restart never reuses a number),
    /// then publishes the model, that round and `record` together.
    async fn publish(&mut self, record: RoundRecord, round_info: RoundInfo) {
        if let Err(e) = self
            .store
            .open_round(&self.def.name, round_info.round)
            .await
        {
            tracing::error!(task = %self.def.name, error = %e, "could not record the round number");
        }
        if self.stopped.is_none() {
            self.stopped = self.privacy.as_ref().and_then(Privacy::exhausted);
            if let Some(reason) = &self.stopped {
                tracing::warn!(task = %self.def.name, "training stopped: {reason}");
            }
        }
        let model = self.model.clone();
        let (stopped, spent) = (
            self.stopped.clone(),
            self.privacy.as_ref().map(Privacy::spent),
        );
        self.status.send_modify(|s| {
            s.model = model;
            s.round = round_info;
            s.last_round = Some(record);
            s.stopped = stopped;
            s.epsilon_spent = spent;
        });
    }
}
