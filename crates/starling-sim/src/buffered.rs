//! Buffered asynchronous training (FedBuff, Nguyen et al. 2022) in the simulator: an
//! event-driven loop on the virtual clock against the engine's buffered mode.
//!
//! `concurrency` (C) devices train at all times. At t = 0, C distinct devices (a seeded choice)
//! check in; each assignment gets a fate (drop-out, straggler), a training time (a seeded draw
//! from `--latency`, or the device's examples' time) and so a time when its update arrives.
//! Events are processed one at a time in time order, ties broken by device index: the clock
//! moves to the event, the device uploads its update (one `upload_many` of one), and a
//! seeded-random idle device checks in for the freed place and gets the then-current version.
//! A device that drops out, or whose training outlasts its assignment, never uploads: its
//! place frees when the assignment lapses (`assignment_secs`, the simulation's deadline).
//!
//! Training is lazy and parallel: when an update is first needed, the pending updates of every
//! device that checked in on the same version (whose parameters were kept at check-in) are
//! trained together on the pool. After every K folded updates the engine steps the model;
//! the loop waits for the step's record, evaluates the new version (every `eval_every` steps)
//! and reports the step as a round. Nothing depends on thread timing: uploads go to the
//! engine one at a time, in event order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use starling_core::trainer::train::local_update;
use starling_core::Parameters;
use starling_server::engine::{Caller, CheckIn, Clock, EngineError, TaskStatus, Upload};
use starling_server::store::RoundStatus;

use crate::report::RoundMetrics;
use crate::sim::{latency_seed, mix, reached, Buffered, Fate, Setup, SimConfig};
use crate::{Federation, SimError};

/// Salt of the seeds of an assignment's fate.
const FATE_SALT: u64 = 0x4641_5445_5F46_4242;

/// How long (wall clock) to wait for the engine to publish a step it owes: only a fault in
/// the engine makes this run out.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the engine refused an update for being staler than `max_staleness`.
fn is_too_stale(e: &EngineError) -> bool {
    matches!(e, EngineError::TooStale { .. })
}

/// One device's outstanding assignment.
#[derive(Debug)]
struct Job {
    /// The round (buffer) the assignment was handed out in; its upload names it.
    round: u64,
    /// The upload token.
    token: String,
    /// The version it trains, and that version's parameters, kept from the check-in.
    base_version: u64,
    params: Arc<Parameters>,
    /// The check-in's number, which seeds the device's shuffle.
    serial: u64,
    /// Whether the update arrives (else the device dropped out or was too slow, and the
    /// assignment lapses).
    uploads: bool,
    /// When the update arrives, or when the assignment lapses.
    at: Duration,
    /// The trained update, once trained.
    body: Option<Vec<u8>>,
}

/// What happened since the previous step.
#[derive(Debug, Default)]
struct Tally {
    checked_in: usize,
    dropped: usize,
    stragglers: usize,
    folded: usize,
    refused_stale: usize,
    staleness: u64,
    bytes_up: u64,
    bytes_down: u64,
    max_in_flight: usize,
}

/// The loop's state.
struct Loop<'a> {
    config: &'a SimConfig,
    federation: &'a Federation,
    setup: &'a Setup,
    /// Devices not training, in a seeded order of removal.
    idle: Vec<usize>,
    /// Picks idle devices.
    pick: rand::rngs::StdRng,
    /// Outstanding assignments by device (at most one each).
    jobs: BTreeMap<usize, Job>,
    /// (time, device) of every outstanding assignment's next event, earliest first.
    events: BinaryHeap<Reverse<(Duration, usize)>>,
    serial: u64,
    tally: Tally,
    status: tokio::sync::watch::Receiver<TaskStatus>,
    /// An assignment's lifetime on the engine's clock.
    lifetime: Duration,
}

/// Runs buffered mode until `config.rounds` steps (or the target accuracy).
pub(crate) async fn run(
    config: &SimConfig,
    buffered: Buffered,
    federation: &Federation,
    setup: &Setup,
    on_round: &mut impl FnMut(&RoundMetrics),
) -> Result<Vec<RoundMetrics>, SimError> {
    let n = federation.devices.len();
    let c = buffered.concurrency as usize;
    let k = u64::from(buffered.buffer);
    let mut l = Loop {
        config,
        federation,
        setup,
        idle: (0..n).collect(),
        pick: rand::rngs::StdRng::seed_from_u64(mix(config.seed, u64::MAX, usize::MAX)),
        jobs: BTreeMap::new(),
        events: BinaryHeap::new(),
        serial: 0,
        tally: Tally::default(),
        status: setup.task.subscribe(),
        lifetime: Duration::from_secs_f64(setup.deadline),
    };
    // Updates that go nowhere (drop-outs, lapses, refusals) in a row before giving up: a
    // configuration where no update ever arrives would otherwise run forever.
    let give_up_after = 1000 + 100 * c;
    let mut fruitless = 0usize;
    let mut next_step = setup.task.status().round.round;
    let mut folded = 0u64;
    let mut rounds = Vec::new();
    let mut steps = 0u32;

    let first: Vec<usize> = (0..c).map(|_| l.take_idle()).collect();
    l.check_in(first).await?;
    while let Some(Reverse((at, d))) = l.events.pop() {
        setup.clock.advance_to(at);
        let mut stepped = false;
        if l.jobs.get(&d).is_some_and(|j| j.uploads) {
            match l.upload(d).await? {
                Some(staleness) => {
                    folded += 1;
                    l.tally.folded += 1;
                    l.tally.staleness += staleness;
                    fruitless = 0;
                    stepped = folded.is_multiple_of(k);
                }
                None => {
                    l.tally.refused_stale += 1;
                    fruitless += 1;
                }
            }
        } else {
            // The assignment lapsed on the engine's clock: the device's place is free.
            l.jobs.remove(&d);
            fruitless += 1;
        }
        l.idle.push(d);
        if fruitless > give_up_after {
            return Err(SimError::Config(format!(
                "no update arrived in {fruitless} assignments in a row: every device drops out, \
                 outlasts its assignment ({} virtual s) or is too stale",
                setup.deadline
            )));
        }
        if stepped {
            steps += 1;
            let m = l.step(next_step, steps).await?;
            next_step = m.round + 1;
            on_round(&m);
            let done = steps >= config.rounds || reached(config, &m);
            rounds.push(m);
            if done {
                break;
            }
        }
        let refill = l.take_idle();
        l.check_in(vec![refill]).await?;
    }
    Ok(rounds)
}

impl Loop<'_> {
    /// A seeded-random idle device, no longer idle.
    fn take_idle(&mut self) -> usize {
        let i = self.pick.random_range(0..self.idle.len());
        self.idle.swap_remove(i)
    }

    /// The parameters of `version`, which the engine just assigned: the published model.
    async fn params_of(&mut self, version: u64) -> Result<Arc<Parameters>, SimError> {
        let status = self
            .status
            .wait_for(|s| s.model.version >= version)
            .await
            .map_err(|_| SimError::Config("the round engine stopped".into()))?;
        if status.model.version != version {
            return Err(SimError::Config(format!(
                "the engine assigned version {version} but publishes version {}",
                status.model.version
            )));
        }
        Ok(status.model.params.clone())
    }

    /// `devices` check in (in one batch) and start training: each gets its fate, its
    /// training time and so its event.
    async fn check_in(&mut self, devices: Vec<usize>) -> Result<(), SimError> {
        let (config, setup) = (self.config, self.setup);
        let now = setup.clock.now();
        let answers = setup
            .task
            .check_in_many(
                devices
                    .iter()
                    .map(|d| Caller::device(format!("device-{d}")))
                    .collect(),
            )
            .await?;
        let model_bytes = setup.task.status().model.body.len() as u64;
        for (&d, answer) in devices.iter().zip(answers) {
            let a = match answer {
                CheckIn::Assigned(a) => a,
                CheckIn::Retry { reason, .. } => {
                    return Err(SimError::Config(format!(
                        "device {d} was not assigned ({} assignments outstanding): {reason}",
                        self.jobs.len()
                    )))
                }
            };
            let params = self.params_of(a.base_version).await?;
            self.serial += 1;
            let serial = self.serial;
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(mix(config.seed ^ FATE_SALT, serial, d));
            let fate = Fate::draw(&mut rng, config);
            let secs = config.train_secs(
                self.federation.devices[d].len(),
                fate == Fate::Straggler,
                latency_seed(config.seed, serial, d),
            );
            // An update must arrive strictly before its assignment lapses (the engine's
            // clock, to the nanosecond).
            let train = (secs < setup.deadline).then(|| Duration::from_secs_f64(secs));
            let uploads = fate != Fate::Dropped && train.is_some_and(|t| t < self.lifetime);
            let at = now
                + match train {
                    Some(t) if uploads => t,
                    _ => self.lifetime,
                };
            self.tally.checked_in += 1;
            self.tally.dropped += usize::from(fate == Fate::Dropped);
            self.tally.stragglers += usize::from(fate == Fate::Straggler);
            self.tally.bytes_down += model_bytes;
            self.jobs.insert(
                d,
                Job {
                    round: a.round,
                    token: a.token,
                    base_version: a.base_version,
                    params,
                    serial,
                    uploads,
                    at,
                    body: None,
                },
            );
            self.events.push(Reverse((at, d)));
        }
        self.tally.max_in_flight = self.tally.max_in_flight.max(self.jobs.len());
        Ok(())
    }

    /// Trains device `d`'s update together with the other pending updates on its version
    /// (at most a wave of them, the earliest first), in parallel on the pool.
    async fn train(&mut self, d: usize) -> Result<(), SimError> {
        let version = self.jobs[&d].base_version;
        let mut todo: Vec<(Duration, usize)> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.uploads && j.body.is_none() && j.base_version == version)
            .map(|(&e, j)| (j.at, e))
            .collect();
        todo.sort_unstable();
        let wave = (self.setup.pool.current_num_threads() * 16).max(64);
        todo.truncate(wave);
        if !todo.iter().any(|&(_, e)| e == d) {
            todo.push((self.jobs[&d].at, d));
        }
        let work: Vec<(usize, String, u64)> = todo
            .iter()
            .map(|&(_, e)| {
                let j = &self.jobs[&e];
                (e, j.token.clone(), mix(self.config.seed, j.serial, e))
            })
            .collect();
        let params = self.jobs[&d].params.clone();
        let (pool, model) = (self.setup.pool.clone(), self.setup.model.clone());
        let devices = self.federation.devices.clone();
        let plan = self.config.plan.clone();
        let trained: Vec<(usize, Result<Vec<u8>, SimError>)> =
            tokio::task::spawn_blocking(move || {
                pool.install(|| {
                    work.into_par_iter()
                        .map(|(e, token, seed)| {
                            let mut plan = plan.clone();
                            plan.seed = seed;
                            let body = local_update(
                                &model,
                                &params,
                                &devices[e],
                                &plan,
                                version,
                                token,
                                |_| {},
                            )
                            .map(|(body, _)| body)
                            .map_err(SimError::from);
                            (e, body)
                        })
                        .collect()
                })
            })
            .await
            .map_err(|e| SimError::Config(format!("training thread: {e}")))?;
        for (e, body) in trained {
            if let Some(j) = self.jobs.get_mut(&e) {
                j.body = Some(body?);
            }
        }
        Ok(())
    }

    /// Device `d` uploads its update (training it first if need be); its assignment ends.
    /// Returns the update's staleness if it was folded, `None` if it was too stale.
    async fn upload(&mut self, d: usize) -> Result<Option<u64>, SimError> {
        if self.jobs.get(&d).is_some_and(|j| j.body.is_none()) {
            self.train(d).await?;
        }
        let Some(job) = self.jobs.remove(&d) else {
            return Err(SimError::Config(format!("device {d} has no assignment")));
        };
        let body = job
            .body
            .ok_or_else(|| SimError::Config(format!("device {d}'s update was not trained")))?;
        self.tally.bytes_up += body.len() as u64;
        let current = self.setup.task.status().model.version;
        let result = self
            .setup
            .task
            .upload_many(job.round, vec![Upload::from(body)])
            .await
            .pop()
            .unwrap_or(Err(EngineError::Unavailable));
        match result {
            Ok(_) => Ok(Some(current.saturating_sub(job.base_version))),
            Err(e) if is_too_stale(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The engine owes step `round` (K updates were folded into its buffer): waits for its
    /// record, evaluates the new model if due, and reports the step.
    async fn step(&mut self, round: u64, step: u32) -> Result<RoundMetrics, SimError> {
        let wait = self
            .status
            .wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round >= round));
        let st = tokio::time::timeout(STEP_TIMEOUT, wait)
            .await
            .map_err(|_| {
                SimError::Config(format!(
                    "the engine did not step after {} folded updates (round {round})",
                    self.tally.folded
                ))
            })?
            .map_err(|_| SimError::Config("the round engine stopped".into()))?
            .clone();
        let Some(record) = st.last_round else {
            return Err(SimError::Config("the step has no record".into()));
        };
        let (config, setup) = (self.config, self.setup);
        let eval = if Setup::evaluates(config, step, config.rounds) {
            Some(
                setup
                    .evaluate(st.model.params.clone(), &self.federation.test)
                    .await?,
            )
        } else {
            None
        };
        let t = std::mem::take(&mut self.tally);
        // The places that stay taken carry over into the next step's count.
        self.tally.max_in_flight = self.jobs.len();
        Ok(RoundMetrics {
            round: record.round,
            version: st.model.version,
            committed: record.status == RoundStatus::Committed,
            sampled: t.checked_in,
            reported: t.folded,
            dropped: t.dropped,
            stragglers: t.stragglers,
            refused_stale: t.refused_stale,
            mean_staleness: (t.folded > 0).then(|| t.staleness as f64 / t.folded as f64),
            max_in_flight: t.max_in_flight,
            epsilon: None,
            examples: record.examples,
            train_loss: record.mean_loss,
            train_accuracy: record.mean_accuracy,
            test_loss: eval.as_ref().map(|e| e.loss),
            test_accuracy: eval.and_then(|e| e.accuracy),
            bytes_up: t.bytes_up,
            bytes_down: t.bytes_down,
            virtual_secs: setup.clock.now().as_secs_f64(),
            wall_secs: setup.started.elapsed().as_secs_f64(),
        })
    }
}
