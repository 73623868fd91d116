//! The simulation loop. In synchronous rounds (the default), each round: sample devices
//! (seeded), let them check in with the real round engine, train the sampled devices on every
//! core, upload their updates through the engine in device order (so results do not depend
//! on thread timing) as they come out of training, let the virtual clock close the round if
//! drop-outs or stragglers kept it below its goal, and evaluate the new global model on the
//! held-out test set. That evaluation runs on the pool beside the next round's training
//! (both need only the new model), unless the run stops at a target accuracy and so must
//! know it first; a round is reported once its evaluation is in.
//!
//! With [`SimConfig::buffered`] the task runs the engine's buffered asynchronous mode
//! (FedBuff) instead, driven event by event on the virtual clock by [`crate::buffered`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use starling_core::aggregate::StrategyConfig;
use starling_core::trainer::model::Evaluation;
use starling_core::trainer::train::{local_update, Plan};
use starling_core::{wire::checkpoint, Dataset, Model, ModelSpec, Parameters};
use starling_server::engine::{self, Caller, CheckIn, Clock, TaskHandle, Upload, VirtualClock};
use starling_server::metrics::Metrics as ServerMetrics;
use starling_server::settings::{
    BufferedPolicy, PrivacyPolicy, Retention, RoundPolicy, TaskDefinition, Weighting,
};
use starling_server::store::{RoundStatus, Store};

use crate::latency::Latency;
use crate::report::{RoundMetrics, SimReport};
use crate::{Federation, SimError};

/// The round deadline (synchronous rounds) and assignment lifetime (buffered mode), in virtual
/// seconds, when training times come from [`SimConfig::latency`] and
/// [`SimConfig::deadline_secs`] is not given: long enough that practically every device of a
/// heavy-tailed distribution such as `lognormal:1.5` (median 1 s; about 1 draw in 10^5 takes
/// longer) reports, so synchronous rounds wait for their slowest device. It is also the
/// engine's default `assignment_secs`.
pub const LATENCY_DEADLINE_SECS: f64 = 600.0;

/// The longest deadline a simulation accepts (about 30 years of virtual time).
const MAX_DEADLINE_SECS: f64 = 1e9;

/// Buffered asynchronous training (FedBuff): the engine steps the model after every `buffer`
/// updates while `concurrency` devices train at all times.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Buffered {
    /// Updates per server step (K).
    pub buffer: u32,
    /// Devices training at once (C): assignments outstanding at all times.
    pub concurrency: u32,
    /// Updates built on a version more than this many versions old are refused (`too_stale`).
    pub max_staleness: u64,
    /// An update `s` versions old weighs `(1 + s)^-staleness_exponent`.
    pub staleness_exponent: f64,
}

impl Buffered {
    /// K and C with the engine's defaults for the rest (`max_staleness` 50, exponent 0.5).
    pub fn new(buffer: u32, concurrency: u32) -> Self {
        let d = BufferedPolicy::default();
        Self {
            buffer,
            concurrency,
            max_staleness: d.max_staleness,
            staleness_exponent: d.staleness_exponent,
        }
    }
}

/// How many devices a round samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sample {
    /// A fraction of all devices (at least one).
    Fraction(f64),
    /// A fixed number of devices.
    Count(usize),
}

/// What to simulate.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    /// The model.
    pub model: ModelSpec,
    /// The devices' plan (the shuffle seed is mixed with the round and device; its `mu` is
    /// FedProx's proximal weight).
    pub plan: Plan,
    /// How the server turns a round's updates into the next model (default: FedAvg with
    /// server learning rate 1).
    pub strategy: StrategyConfig,
    /// Devices per round.
    pub sample: Sample,
    /// Rounds to run.
    pub rounds: u32,
    /// Probability that a sampled device drops out after checking in.
    pub dropout: f64,
    /// Probability that a sampled device is a straggler: it runs `straggler_slowdown` times
    /// slower and, unless the deadline allows, misses the round.
    pub stragglers: f64,
    /// How much slower a straggler is.
    pub straggler_slowdown: f64,
    /// FedProx's partial work: a straggler that cannot finish by the deadline trains on the
    /// share of its data it has time for (fewer local steps) and reports that many examples,
    /// instead of missing the round.
    pub partial_work: bool,
    /// Virtual seconds a device needs per example and epoch.
    pub secs_per_example: f64,
    /// The round deadline in virtual seconds, as a multiple of the time an average device
    /// needs for its local training.
    pub deadline_factor: f64,
    /// Fraction of the sampled devices a round needs to commit at its deadline.
    pub min_fraction: f64,
    /// Seed of everything: initial model, partition choice, sampling, fates, shuffles.
    pub seed: u64,
    /// Stop once the test accuracy reaches this.
    pub stop_at_accuracy: Option<f32>,
    /// Worker threads for local training (0: one per core).
    pub threads: usize,
    /// Devices' training times drawn from this distribution (seeded, per assignment) instead
    /// of `examples x epochs x secs_per_example`; stragglers still multiply it.
    pub latency: Option<Latency>,
    /// The round deadline (synchronous) or assignment lifetime (buffered), in virtual seconds,
    /// instead of `deadline_factor` times an average device's time (or, with `latency`,
    /// [`LATENCY_DEADLINE_SECS`]).
    pub deadline_secs: Option<f64>,
    /// Buffered asynchronous mode (FedBuff) instead of synchronous rounds; `rounds` then
    /// counts server steps and `sample` is not used.
    pub buffered: Option<Buffered>,
    /// Evaluate the test set after every this many rounds (steps), and after the last.
    pub eval_every: u32,
    /// Central differential privacy (DP-FedAvg with the server's accountant and budget); the
    /// population is the federation's devices. Synchronous rounds only.
    pub privacy: Option<SimPrivacy>,
    /// Secure aggregation (SecAgg+) through the engine's four steps ([`crate::secagg`]).
    pub secagg: Option<crate::secagg::SimSecAgg>,
}

/// A simulation's `[tasks.privacy]`, without the population (the federation's size).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SimPrivacy {
    /// L2 clip bound of one update.
    pub clip: f64,
    /// Noise multiplier z (noise standard deviation z · clip on the sum).
    pub noise_multiplier: f64,
    /// Budget ε: the task stops before a round would pass it.
    pub epsilon: f64,
    /// Budget δ.
    pub delta: f64,
    /// Adaptive clipping toward this quantile of the update norms (Andrew et al. 2021), with
    /// the server's defaults for its learning rate and count noise; `None`: a fixed bound.
    pub target_quantile: Option<f64>,
}

impl SimConfig {
    /// A configuration with the defaults: FedAvg, no drop-outs or stragglers, stragglers 10x
    /// slower, 1 ms per example, deadline 3x the average device's time, commit with any
    /// update.
    pub fn new(model: ModelSpec, plan: Plan, sample: Sample, rounds: u32, seed: u64) -> Self {
        Self {
            model,
            plan,
            strategy: StrategyConfig::default(),
            sample,
            rounds,
            dropout: 0.0,
            stragglers: 0.0,
            straggler_slowdown: 10.0,
            partial_work: false,
            secs_per_example: 1e-3,
            deadline_factor: 3.0,
            min_fraction: 0.0,
            seed,
            stop_at_accuracy: None,
            threads: 0,
            latency: None,
            deadline_secs: None,
            buffered: None,
            eval_every: 1,
            privacy: None,
            secagg: None,
        }
    }

    /// The round deadline (synchronous) or assignment lifetime (buffered) in virtual seconds,
    /// for devices holding `mean_examples` examples on average.
    pub(crate) fn deadline(&self, mean_examples: f64) -> f64 {
        match (self.deadline_secs, self.latency) {
            (Some(secs), _) => secs,
            (None, Some(_)) => LATENCY_DEADLINE_SECS,
            (None, None) => {
                self.deadline_factor
                    * self
                        .epoch_secs(mean_examples.round() as usize)
                        .max(self.secs_per_example)
            }
        }
    }

    /// Virtual seconds a device with `examples` examples needs without `latency`.
    pub(crate) fn epoch_secs(&self, examples: usize) -> f64 {
        examples as f64 * f64::from(self.plan.epochs) * self.secs_per_example
    }

    /// A device's training time for one assignment: a seeded draw from `latency`, or its
    /// examples' time; times `straggler_slowdown` for a straggler.
    pub(crate) fn train_secs(&self, examples: usize, straggler: bool, seed: u64) -> f64 {
        let t = match &self.latency {
            Some(l) => l.sample(&mut rand::rngs::StdRng::seed_from_u64(seed)),
            None => self.epoch_secs(examples),
        };
        if straggler {
            t * self.straggler_slowdown
        } else {
            t
        }
    }

    fn per_round(&self, devices: usize) -> Result<usize, SimError> {
        let k = match self.sample {
            Sample::Fraction(f) if f > 0.0 && f <= 1.0 => {
                ((devices as f64 * f).round() as usize).max(1)
            }
            Sample::Count(k) if k >= 1 && k <= devices => k,
            other => {
                return Err(SimError::Config(format!(
                    "cannot sample {other:?} of {devices} devices"
                )))
            }
        };
        Ok(k)
    }

    fn validate(&self) -> Result<(), SimError> {
        let prob = |p: f64| (0.0..=1.0).contains(&p);
        if !prob(self.dropout) || !prob(self.stragglers) || !prob(self.min_fraction) {
            return Err(SimError::Config(
                "dropout, stragglers and min_fraction are probabilities in [0, 1]".into(),
            ));
        }
        if self.rounds == 0 {
            return Err(SimError::Config("rounds must be at least 1".into()));
        }
        if !(self.straggler_slowdown >= 1.0
            && self.deadline_factor > 0.0
            && self.secs_per_example > 0.0)
        {
            return Err(SimError::Config(
                "straggler_slowdown >= 1, deadline_factor > 0 and secs_per_example > 0".into(),
            ));
        }
        if let Some(l) = &self.latency {
            l.validate()
                .map_err(|e| SimError::Config(format!("latency {l}: {e}")))?;
        }
        if let Some(d) = self.deadline_secs {
            if !(d.is_finite() && d > 0.0 && d <= MAX_DEADLINE_SECS) {
                return Err(SimError::Config(format!(
                    "deadline_secs must be a positive number of seconds up to \
                     {MAX_DEADLINE_SECS:e}, not {d}"
                )));
            }
        }
        if self.eval_every == 0 {
            return Err(SimError::Config("eval_every must be at least 1".into()));
        }
        if let Some(b) = &self.buffered {
            if b.buffer == 0 || b.concurrency == 0 {
                return Err(SimError::Config(
                    "buffered mode needs a buffer (K) and a concurrency (C) of at least 1".into(),
                ));
            }
            if !(b.staleness_exponent.is_finite() && b.staleness_exponent >= 0.0) {
                return Err(SimError::Config(format!(
                    "the staleness exponent must be a finite number >= 0, not {}",
                    b.staleness_exponent
                )));
            }
            if self.partial_work {
                return Err(SimError::Config(
                    "partial work applies to synchronous rounds only, not to buffered mode".into(),
                ));
            }
        }
        self.plan.validate()?;
        self.strategy.validate().map_err(SimError::Config)?;
        Ok(())
    }
}

/// The strategies [`strategy`] knows, by name.
pub const STRATEGIES: [&str; 5] = ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"];

/// A strategy by name (one of [`STRATEGIES`]) with its default hyperparameters, and
/// `server_lr` instead of the default server learning rate if given; validated.
pub fn strategy(name: &str, server_lr: Option<f64>) -> Result<StrategyConfig, SimError> {
    let unknown = || {
        SimError::Config(format!(
            "unknown strategy `{name}` ({})",
            STRATEGIES.join(", ")
        ))
    };
    if !STRATEGIES.contains(&name) {
        return Err(unknown());
    }
    let mut config: StrategyConfig =
        serde_json::from_value(serde_json::json!({ "name": name })).map_err(|_| unknown())?;
    if let Some(lr) = server_lr {
        match &mut config {
            StrategyConfig::FedAvg { server_lr }
            | StrategyConfig::FedAvgM { server_lr, .. }
            | StrategyConfig::FedAdagrad { server_lr, .. }
            | StrategyConfig::FedAdam { server_lr, .. }
            | StrategyConfig::FedYogi { server_lr, .. } => *server_lr = lr,
        }
    }
    config.validate().map_err(SimError::Config)?;
    Ok(config)
}

/// A sampled device's fate this round (this assignment, in buffered mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Fate {
    OnTime,
    Straggler,
    Dropped,
}

impl Fate {
    /// A seeded draw: dropped with probability `dropout`, else a straggler with probability
    /// `stragglers`.
    pub(crate) fn draw(rng: &mut impl Rng, config: &SimConfig) -> Fate {
        if rng.random::<f64>() < config.dropout {
            Fate::Dropped
        } else if rng.random::<f64>() < config.stragglers {
            Fate::Straggler
        } else {
            Fate::OnTime
        }
    }
}

/// The share of a device's data a straggler has time for: a seeded random sample (a device's
/// data may be sorted by label), at least one example. Training on it for the plan's epochs
/// takes that share of the local steps, and the update reports its real example count.
fn partial_data(data: &Dataset, share: f64, seed: u64) -> Dataset {
    let n = data.len();
    let k = ((n as f64 * share).floor() as usize).clamp(1, n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut picked = sample(&mut rng, n, k).into_vec();
    picked.sort_unstable();
    data.subset(&picked)
}

/// Loss and accuracy of `params` on `data`, evaluated in parallel chunks.
pub fn evaluate(model: &Model, params: &Parameters, data: &Dataset) -> Evaluation {
    let n = data.len();
    let (fw, tw) = (data.feature_dim(), data.target_dim());
    // A few chunks per thread, so that an evaluation running beside training (the next
    // round's) fills whichever thread comes free.
    let chunk = n.div_ceil(4 * rayon::current_num_threads().max(1)).max(1);
    let parts: Vec<(usize, Evaluation)> = (0..n)
        .step_by(chunk)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let m = chunk.min(n - start);
            let x = &data.features()[start * fw..(start + m) * fw];
            let y = &data.targets()[start * tw..(start + m) * tw];
            (m, model.evaluate(params, x, y, m))
        })
        .collect();
    let total = n.max(1) as f64;
    let loss = parts
        .iter()
        .map(|(m, r)| *m as f64 * f64::from(r.loss))
        .sum::<f64>()
        / total;
    let accuracy = parts
        .iter()
        .map(|(m, r)| r.accuracy.map(|a| *m as f64 * f64::from(a)))
        .sum::<Option<f64>>()
        .map(|a| (a / total) as f32);
    Evaluation {
        loss: loss as f32,
        accuracy,
    }
}

/// A stable per-(round, device) seed.
pub(crate) fn mix(seed: u64, round: u64, device: usize) -> u64 {
    let mut x = seed
        ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (device as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Salt of the seeds of training-time draws, so that they differ from the shuffle seeds.
const LATENCY_SALT: u64 = 0x4C41_5445_4E43_5921;

/// A stable seed for the training-time draw of `(round, device)` (or, in buffered mode,
/// `(assignment, device)`).
pub(crate) fn latency_seed(seed: u64, round: u64, device: usize) -> u64 {
    mix(seed ^ LATENCY_SALT, round, device)
}

/// What both loops share: the model, the engine on its virtual clock, the training pool.
pub(crate) struct Setup {
    /// The compiled model.
    pub(crate) model: Arc<Model>,
    /// The task's engine.
    pub(crate) task: TaskHandle,
    /// The engine's clock.
    pub(crate) clock: VirtualClock,
    /// Local training and evaluation run here.
    pub(crate) pool: Arc<rayon::ThreadPool>,
    /// When the run started (wall clock).
    pub(crate) started: Instant,
    /// Round deadline (synchronous) or assignment lifetime (buffered), virtual seconds.
    pub(crate) deadline: f64,
}

impl Setup {
    /// Loss and accuracy of `params` on the test set, on the pool, off the async reactor.
    pub(crate) async fn evaluate(
        &self,
        params: Arc<Parameters>,
        test: &Arc<Dataset>,
    ) -> Result<Evaluation, SimError> {
        let (model, test, pool) = (self.model.clone(), test.clone(), self.pool.clone());
        tokio::task::spawn_blocking(move || pool.install(|| evaluate(&model, &params, &test)))
            .await
            .map_err(|e| SimError::Config(format!("evaluation thread: {e}")))
    }

    /// [`Setup::evaluate`] started on the pool, to be awaited later: the caller goes on
    /// (with the next round's training) meanwhile.
    pub(crate) fn spawn_evaluation(
        &self,
        params: Arc<Parameters>,
        test: &Arc<Dataset>,
    ) -> tokio::task::JoinHandle<Evaluation> {
        let (model, test, pool) = (self.model.clone(), test.clone(), self.pool.clone());
        tokio::task::spawn_blocking(move || pool.install(|| evaluate(&model, &params, &test)))
    }

    /// Whether round (step) `i` of at most `last` is evaluated.
    pub(crate) fn evaluates(config: &SimConfig, i: u32, last: u32) -> bool {
        i.is_multiple_of(config.eval_every) || i == last
    }
}

/// Runs a simulation, calling `on_round` after every round (in buffered mode: every server
/// step).
pub async fn run(
    config: &SimConfig,
    federation: &Federation,
    mut on_round: impl FnMut(&RoundMetrics),
) -> Result<SimReport, SimError> {
    config.validate()?;
    let n = federation.devices.len();
    // Synchronous rounds sample k devices; buffered mode keeps C training.
    let k = match &config.buffered {
        None => config.per_round(n)?,
        Some(b) => {
            if b.concurrency as usize > n {
                return Err(SimError::Config(format!(
                    "a concurrency of {} needs at least as many devices, not {n}",
                    b.concurrency
                )));
            }
            b.buffer as usize
        }
    };
    let model = Model::new(config.model.clone()).map_err(|e| SimError::Config(e.to_string()))?;
    for (i, d) in federation.devices.iter().enumerate() {
        starling_core::trainer::train::check_data(&model, d)
            .map_err(|e| SimError::Config(format!("device {i}: {e}")))?;
    }
    let min = match &config.buffered {
        None => ((k as f64 * config.min_fraction).ceil() as u32).clamp(1, k as u32),
        Some(b) => b.buffer,
    };
    let mean_examples =
        federation.devices.iter().map(Dataset::len).sum::<usize>() as f64 / n as f64;
    let deadline = config.deadline(mean_examples);
    let privacy = config.privacy.map(|p| PrivacyPolicy {
        clip: p.clip,
        noise_multiplier: p.noise_multiplier,
        population: n as u64,
        epsilon: p.epsilon,
        delta: p.delta,
        target_quantile: p.target_quantile,
        clip_learning_rate: 0.2,
        count_noise: None,
    });
    if let Some(p) = &privacy {
        if config.buffered.is_some() {
            return Err(SimError::Config(
                "differential privacy needs synchronous rounds, not --buffer".into(),
            ));
        }
        p.validate(k as u32).map_err(SimError::Config)?;
    }
    let def = TaskDefinition {
        name: "sim".into(),
        spec: config.model.clone(),
        plan: config.plan.clone(),
        rounds: RoundPolicy {
            goal: k as u32,
            min,
            // Deadlines come from the virtual clock, never from the wall clock.
            deadline_secs: deadline,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        init_seed: config.seed,
        initial_params: None,
        // A simulation's updates are the researcher's own: no bound beyond finiteness (the
        // bound also caps a commit's step, so it must be finite), weights as claimed, and
        // rounds of any size.
        max_update_norm: f64::MAX,
        max_examples_per_update: starling_core::wire::update::MAX_EXAMPLES as u64,
        weighting: Weighting::Examples,
        min_cohort: min,
        max_assignments_per_address: u32::MAX,
        retention: Retention::default(),
        strategy: config.strategy,
        buffered: config.buffered.map(|b| BufferedPolicy {
            buffer: b.buffer,
            concurrency: b.concurrency,
            max_staleness: b.max_staleness,
            staleness_exponent: b.staleness_exponent,
            // An assignment lapses (a dropped device's place frees) after the deadline.
            assignment_secs: deadline,
        }),
        evaluate_every: 0,
        privacy: privacy.clone(),
        // The simulation is a function of its seed, its noise included.
        privacy_noise_seed: Some(config.seed),
        secure_aggregation: None,
        // The simulator's devices are in-process callers of the engine, not HTTP clients.
        admission: starling_server::settings::Admission::Open,
        enrollment_secret: None,
    };
    let def = crate::secagg::configure(def, config, federation, k)?;
    let store = Store::open_memory().await?;
    let clock = VirtualClock::new();
    let task = engine::spawn(
        def,
        store,
        Arc::new(ServerMetrics::default()),
        Arc::new(clock.clone()),
    )
    .await?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .build()
        .map_err(|e| SimError::Config(e.to_string()))?;
    // The run's CPU time and wall time start together.
    let cpu_at_start = crate::cpu::process_cpu_secs();
    let setup = Setup {
        model: Arc::new(model),
        task,
        clock,
        pool: Arc::new(pool),
        started: Instant::now(),
        deadline,
    };
    let rounds = match &config.buffered {
        None if config.secagg.is_some() => {
            crate::secagg::run(config, federation, &setup, k, &mut on_round).await?
        }
        None => run_rounds(config, federation, &setup, k, &mut on_round).await?,
        Some(b) => crate::buffered::run(config, *b, federation, &setup, &mut on_round).await?,
    };
    let mut report = SimReport::new(
        config,
        federation,
        rounds,
        setup.started.elapsed().as_secs_f64(),
    );
    report.stopped = setup.task.status().stopped;
    report.set_cpu_secs(
        crate::cpu::process_cpu_secs()
            .zip(cpu_at_start)
            .map(|(end, start)| end - start),
    );
    Ok(report)
}

/// Synchronous rounds of `k` sampled devices each.
async fn run_rounds(
    config: &SimConfig,
    federation: &Federation,
    setup: &Setup,
    k: usize,
    on_round: &mut impl FnMut(&RoundMetrics),
) -> Result<Vec<RoundMetrics>, SimError> {
    let n = federation.devices.len();
    let Setup {
        model,
        task,
        clock,
        pool,
        started,
        deadline,
    } = setup;
    let deadline = *deadline;
    let devices = federation.devices.clone();
    let mut virtual_secs = 0.0;
    let mut rounds = Vec::new();
    let mut status_rx = task.subscribe();
    let mut pending: Option<PendingRound> = None;
    for i in 1..=config.rounds {
        let status = task.status();
        let round = status.round.round;
        let base_version = status.model.version;
        // Every sampled device checks in and downloads the model; a task whose privacy
        // budget is spent stops the simulation (the report says why).
        let Some(RoundDraw {
            base,
            sampled,
            fates,
            answers,
            ..
        }) = draw_round(task, config, &status, n, k).await?
        else {
            break;
        };
        let mut tokens = Vec::with_capacity(k);
        for (&d, answer) in sampled.iter().zip(answers) {
            match answer {
                CheckIn::Assigned(a) => tokens.push(a.token),
                CheckIn::Retry { reason, .. } => {
                    return Err(SimError::Config(format!(
                        "device {d} was not assigned: {reason}"
                    )))
                }
            }
        }
        let bytes_down = (status.model.body.len() * k) as u64;
        // Devices that drop out never upload; those too slow for the deadline either miss the
        // round or, with partial work, train on the share of their data they have time for.
        // A job: (device, token, virtual seconds, share of its data).
        let jobs: Vec<(usize, String, f64, f64)> = sampled
            .iter()
            .zip(&fates)
            .zip(tokens)
            .filter_map(|((&d, &fate), token)| {
                let t = config.train_secs(
                    federation.devices[d].len(),
                    fate == Fate::Straggler,
                    latency_seed(config.seed, round, d),
                );
                if fate == Fate::Dropped {
                    None
                } else if t <= deadline {
                    Some((d, token, t, 1.0))
                } else if config.partial_work {
                    Some((d, token, deadline, deadline / t))
                } else {
                    None
                }
            })
            .collect();
        let slowest = jobs.iter().map(|j| j.2).fold(0.0f64, f64::max);
        // The virtual clock stands at the round's start. The last on-time device reports at
        // `slowest`: move the clock there first (unless that is the deadline itself), so
        // that a round that completes opens the next one at the right virtual time.
        let round_start = clock.now();
        let at = |secs: f64| round_start + Duration::from_secs_f64(secs);
        if slowest < deadline {
            clock.advance_to(at(slowest));
        }
        let mut bytes_up = 0u64;
        let mut reported = 0usize;
        // Train and upload in waves, so that at most one wave of updates (not a whole round's)
        // is in memory at once: the round's memory stays O(model size x wave).
        let wave = (pool.current_num_threads() * 16).max(64);
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let batch: Vec<(usize, String, f64, f64)> = jobs.by_ref().take(wave).collect();
            let mut results = train_in_order(
                pool.clone(),
                model.clone(),
                base.clone(),
                devices.clone(),
                config.plan.clone(),
                config.seed,
                round,
                base_version,
                batch,
            );
            // Upload in device order as the updates arrive: the engine checks and folds the
            // first devices' updates while the pool trains the others.
            while let Some(bodies) = results.next_in_order().await {
                let mut uploads = Vec::with_capacity(bodies.len());
                for body in bodies {
                    let body = body?;
                    bytes_up += body.len() as u64;
                    uploads.push(Upload::from(body));
                }
                for r in task.upload_many(round, uploads).await {
                    r?;
                    reported += 1;
                }
            }
            results.finish().await?;
        }
        // The previous round's evaluation ran beside this round's training: report it.
        if let Some(p) = pending.take() {
            let m = p.finish().await?;
            on_round(&m);
            rounds.push(m);
        }
        let round_virtual = if reported < k {
            // Not everyone reported: the round ends at its deadline, on the virtual clock.
            clock.advance_to(at(deadline));
            deadline
        } else {
            slowest
        };
        virtual_secs += round_virtual;
        let st = status_rx
            .wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round == round))
            .await
            .map_err(|_| SimError::Config("the round engine stopped".into()))?
            .clone();
        let record = st.last_round.expect("waited for it");
        let evaluates = Setup::evaluates(config, i, config.rounds);
        let mut m = RoundMetrics {
            round,
            version: st.model.version,
            committed: record.status == RoundStatus::Committed,
            sampled: k,
            reported,
            dropped: fates.iter().filter(|f| **f == Fate::Dropped).count(),
            stragglers: fates.iter().filter(|f| **f == Fate::Straggler).count(),
            refused_stale: 0,
            mean_staleness: (reported > 0).then_some(0.0),
            max_in_flight: k,
            epsilon: st.epsilon_spent,
            examples: record.examples,
            train_loss: record.mean_loss,
            train_accuracy: record.mean_accuracy,
            test_loss: None,
            test_accuracy: None,
            bytes_up,
            bytes_down,
            virtual_secs,
            wall_secs: started.elapsed().as_secs_f64(),
        };
        if !evaluates {
            on_round(&m);
            rounds.push(m);
            continue;
        }
        let eval = setup.spawn_evaluation(st.model.params.clone(), &federation.test);
        if config.stop_at_accuracy.is_none() && i < config.rounds {
            // The next round trains the same model that is evaluated here: evaluate it on
            // the pool beside that training, and report this round once it is done.
            pending = Some(PendingRound { metrics: m, eval });
            continue;
        }
        // Whether to go on depends on this evaluation: wait for it.
        let eval = join_evaluation(eval).await?;
        m.test_loss = Some(eval.loss);
        m.test_accuracy = eval.accuracy;
        on_round(&m);
        let done = reached(config, &m);
        rounds.push(m);
        if done {
            break;
        }
    }
    // A round that stopped the loop early (a spent privacy budget) leaves the previous
    // round's evaluation behind.
    if let Some(p) = pending.take() {
        let m = p.finish().await?;
        on_round(&m);
        rounds.push(m);
    }
    Ok(rounds)
}

/// A round whose metrics wait for its evaluation on the test set.
struct PendingRound {
    metrics: RoundMetrics,
    eval: tokio::task::JoinHandle<Evaluation>,
}

impl PendingRound {
    /// The round's metrics with its test loss and accuracy.
    async fn finish(self) -> Result<RoundMetrics, SimError> {
        let mut m = self.metrics;
        let eval = join_evaluation(self.eval).await?;
        m.test_loss = Some(eval.loss);
        m.test_accuracy = eval.accuracy;
        Ok(m)
    }
}

async fn join_evaluation(
    eval: tokio::task::JoinHandle<Evaluation>,
) -> Result<Evaluation, SimError> {
    eval.await
        .map_err(|e| SimError::Config(format!("evaluation thread: {e}")))
}

/// The updates of a wave of devices, trained on the pool, handed out in device order.
struct TrainedInOrder {
    rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Result<Vec<u8>, SimError>)>,
    ready: Vec<Option<Result<Vec<u8>, SimError>>>,
    next: usize,
    training: tokio::task::JoinHandle<()>,
}

impl TrainedInOrder {
    /// The next updates in device order that are ready (at least one), waiting for them;
    /// `None` once every update has been handed out.
    async fn next_in_order(&mut self) -> Option<Vec<Result<Vec<u8>, SimError>>> {
        loop {
            let mut out = Vec::new();
            while let Some(r) = self.ready.get_mut(self.next).and_then(Option::take) {
                out.push(r);
                self.next += 1;
            }
            if !out.is_empty() {
                return Some(out);
            }
            if self.next == self.ready.len() {
                return None;
            }
            let (j, r) = self.rx.recv().await?;
            self.ready[j] = Some(r);
        }
    }

    /// Waits for the training task itself (it has sent everything by now).
    async fn finish(self) -> Result<(), SimError> {
        self.training
            .await
            .map_err(|e| SimError::Config(format!("training thread: {e}")))
    }
}

/// Trains `jobs` (device, token, virtual seconds, share of its data) on the pool, off the
/// async reactor. The pool's threads take the devices in order, one at a time, so updates
/// come out roughly in device order and the uploads that must follow it wait little.
#[allow(clippy::too_many_arguments)]
fn train_in_order(
    pool: Arc<rayon::ThreadPool>,
    model: Arc<Model>,
    base: Arc<Parameters>,
    devices: Arc<Vec<Dataset>>,
    plan: Plan,
    seed: u64,
    round: u64,
    base_version: u64,
    jobs: Vec<(usize, String, f64, f64)>,
) -> TrainedInOrder {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let n = jobs.len();
    let training = tokio::task::spawn_blocking(move || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let threads = pool.current_num_threads().min(n);
        pool.install(|| {
            (0..threads).into_par_iter().for_each(|_| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((d, token, _, share)) = jobs.get(j) else {
                    break;
                };
                let mut plan = plan.clone();
                plan.seed = mix(seed, round, *d);
                let partial;
                let data = if *share < 1.0 {
                    partial = partial_data(&devices[*d], *share, plan.seed);
                    &partial
                } else {
                    &devices[*d]
                };
                let body = local_update(
                    &model,
                    &base,
                    data,
                    &plan,
                    base_version,
                    token.clone(),
                    |_| {},
                )
                .map(|(body, _)| body)
                .map_err(SimError::from);
                // The receiver is gone only when the round failed already.
                let _ = tx.send((j, body));
            })
        });
    });
    TrainedInOrder {
        rx,
        ready: (0..n).map(|_| None).collect(),
        next: 0,
        training,
    }
}

/// One round's draw: the model it trains, the sampled devices (sorted) with their fates,
/// their check-in answers, and the round's generator for any further draws.
pub(crate) struct RoundDraw {
    pub(crate) base: Arc<Parameters>,
    pub(crate) sampled: Vec<usize>,
    pub(crate) fates: Vec<Fate>,
    pub(crate) answers: Vec<CheckIn>,
    pub(crate) rng: rand::rngs::StdRng,
}

/// Draws round `status.round`'s `k` of `n` devices and their fates from the run's seed and
/// checks them in; `None` once the task has stopped (a spent privacy budget).
pub(crate) async fn draw_round(
    task: &TaskHandle,
    config: &SimConfig,
    status: &starling_server::engine::TaskStatus,
    n: usize,
    k: usize,
) -> Result<Option<RoundDraw>, SimError> {
    let base = Arc::new(
        checkpoint::decode(&status.model.body)
            .map_err(|e| SimError::Config(format!("checkpoint: {e}")))?
            .params,
    );
    let round = status.round.round;
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(config.seed, round, usize::MAX));
    let mut sampled = sample(&mut rng, n, k).into_vec();
    sampled.sort_unstable();
    let fates: Vec<Fate> = sampled
        .iter()
        .map(|_| Fate::draw(&mut rng, config))
        .collect();
    let callers = sampled
        .iter()
        .map(|d| Caller::device(format!("device-{d}")))
        .collect();
    let answers = match task.check_in_many(callers).await {
        Err(starling_server::engine::EngineError::TaskStopped(_)) => return Ok(None),
        other => other?,
    };
    Ok(Some(RoundDraw {
        base,
        sampled,
        fates,
        answers,
        rng,
    }))
}

/// Whether `m` reached the configured target accuracy.
pub(crate) fn reached(config: &SimConfig, m: &RoundMetrics) -> bool {
    config
        .stop_at_accuracy
        .zip(m.test_accuracy)
        .is_some_and(|(target, acc)| acc >= target)
}
