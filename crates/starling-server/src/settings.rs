//! Typed settings: defaults, then a TOML file, then environment variables, then validation.
//! Every key is documented once, in `starling.example.toml` at the repository root.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use starling_core::aggregate::StrategyConfig;
use starling_core::trainer::builtin;
use starling_core::trainer::spec::ModelSpec;
use starling_core::trainer::train::Plan;
use starling_core::Parameters;

/// Errors in loading settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("invalid settings file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// An environment variable has an unusable value.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why.
        message: String,
    },
    /// The settings are inconsistent.
    #[error("invalid settings: {0}")]
    Invalid(String),
}

/// All settings of a server.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HTTP server and storage.
    pub server: ServerSettings,
    /// The tasks hosted; when empty, one `linear` task with the demo's model.
    pub tasks: Vec<TaskSettings>,
}

/// The HTTP server and storage.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to bind.
    pub host: String,
    /// Port to bind (`PORT` overrides, as cloud platforms set it; 0 picks a free port).
    pub port: u16,
    /// Directory for the database and other state.
    pub data_dir: PathBuf,
    /// SQLite file; default `<data_dir>/starling.db`.
    pub database: Option<PathBuf>,
    /// Largest accepted request body, in bytes, of every request but an upload (whose limit
    /// is derived from its task's model size).
    pub max_body_bytes: usize,
    /// Seconds to let in-flight requests finish on shutdown.
    pub shutdown_timeout_secs: f64,
    /// Seconds a client has to send a request's headers once it starts, or once its
    /// connection is open.
    pub header_timeout_secs: f64,
    /// Seconds a client has to send a whole request body.
    pub body_timeout_secs: f64,
    /// Seconds a kept-alive connection may sit idle between requests.
    pub idle_timeout_secs: f64,
    /// Connections open at once, over all clients; further clients wait in the listen queue.
    pub max_connections: usize,
    /// Connections open at once from one client address; further ones are closed at once.
    pub max_connections_per_address: usize,
    /// Upload bodies being received or checked at once; further uploads get 503 `busy` with
    /// `Retry-After`, so memory stays bounded whatever the number of clients.
    pub max_uploads_in_flight: usize,
    /// The token of the admin API (`/v1/admin/...`); without one the admin API is off.
    pub admin_token: Option<Secret>,
    /// Behind a proxy (Heroku, a load balancer): the header in which the proxy names the
    /// client's address (`x-forwarded-for`); its last entry, the one the proxy added, counts
    /// as the client's address for `max_assignments_per_address`. Unset, the peer address
    /// counts (and behind a proxy every device would share the proxy's).
    pub client_address_header: Option<String>,
    /// PEM file of the certificate chain (the server's own certificate first) with which the
    /// server serves HTTPS itself; set together with `tls_key`. Unset, it speaks plain HTTP,
    /// as behind a proxy that terminates TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM file of `tls_cert`'s private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Requests a minute one client address may send of check-ins, enrollments, uploads and
    /// evaluation reports, in a burst or spread out; more get 429 `rate_limited` with
    /// `Retry-After`. 0 (the default): no limit, since behind carrier-grade NAT thousands of
    /// phones share one address.
    pub rate_limit_per_address: u32,
    /// The same per device credential (enrolled tasks); 0: no limit.
    pub rate_limit_per_credential: u32,
    /// Wrong enrollment secrets a minute one client address may send; past them its
    /// enrollments get 429 `rate_limited` until the minute is over, the secret not even
    /// compared. Devices that enroll correctly never count. 0: no limit.
    pub enrollment_failures_per_address: u32,
    /// A folder for TensorBoard event files of every task's round history
    /// (`<dir>/<task>/events.out.tfevents.*`, see `tensorboard.rs`); unset, none are written.
    pub tensorboard_dir: Option<PathBuf>,
}

/// A secret setting: shown as `<redacted>` by `Debug`, so it never reaches a log.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for comparing with what a request presents.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            data_dir: PathBuf::from("starling-data"),
            database: None,
            max_body_bytes: 64 * 1024,
            shutdown_timeout_secs: 10.0,
            header_timeout_secs: 10.0,
            body_timeout_secs: 60.0,
            idle_timeout_secs: 30.0,
            max_connections: 1024,
            max_connections_per_address: 128,
            max_uploads_in_flight: 32,
            admin_token: None,
            client_address_header: None,
            tls_cert: None,
            tls_key: None,
            rate_limit_per_address: 0,
            rate_limit_per_credential: 120,
            enrollment_failures_per_address: 10,
            tensorboard_dir: None,
        }
    }
}

impl ServerSettings {
    /// The SQLite file in use.
    pub fn database_path(&self) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| self.data_dir.join("starling.db"))
    }
}

/// One federated training task.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSettings {
    /// The task's name, used in URLs.
    pub name: String,
    /// A built-in model (`linear`, `logistic`, `mlp`, `cnn`) — or set `spec_file` — or
    /// `external`: a model brought from outside, defined by `initial_model` alone and trained
    /// by devices through an SDK.
    pub model: String,
    /// A JSON model spec file, instead of a built-in model.
    pub spec_file: Option<PathBuf>,
    /// With `model = "external"`: a safetensors file whose F32 tensors (names, shapes,
    /// values) are the model and its version 0.
    pub initial_model: Option<PathBuf>,
    /// Input features of a built-in model.
    pub inputs: usize,
    /// Outputs (classes for `logistic`) of a built-in model.
    pub outputs: usize,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// The plan devices follow: keys given here override the model's default plan
    /// ([`builtin::default_plan`]); keys left out keep it.
    pub plan: Option<toml::Table>,
    /// The round policy (in buffered mode only its `retry_secs` applies).
    pub rounds: RoundPolicy,
    /// Refuse updates whose L2 norm exceeds this; also the bound on one commit's step.
    pub max_update_norm: f64,
    /// The most weight one update carries: its example count is capped at this, so no
    /// device can own the average by claiming a huge count.
    pub max_examples_per_update: u64,
    /// How updates are weighted in the average.
    pub weighting: Weighting,
    /// The fewest devices a round may publish anything about (a model version or round
    /// statistics). Below [`MIN_COHORT`] only by saying so here; the server warns.
    pub min_cohort: u32,
    /// Assignments one client address may hold in one round.
    pub max_assignments_per_address: u32,
    /// Which committed checkpoints are kept on disk.
    pub retention: Retention,
    /// How a round's aggregate becomes the next model (`[tasks.strategy]`, default FedAvg).
    pub strategy: StrategyConfig,
    /// Buffered asynchronous training (FedBuff) instead of synchronous rounds
    /// (`[tasks.buffered]`; absent: synchronous rounds).
    pub buffered: Option<BufferedPolicy>,
    /// A federated evaluation round after every this many committed training rounds: its
    /// devices score the current model on their local data and report loss, accuracy and
    /// example count, recorded beside the training rounds (0, the default: none).
    /// Synchronous rounds only.
    pub evaluate_every: u32,
    /// Differential privacy (DP-FedAvg) with a budget the server enforces
    /// (`[tasks.privacy]`; absent: none).
    pub privacy: Option<PrivacyPolicy>,
    /// Secure aggregation, SecAgg+ (`[tasks.secure_aggregation]`; absent: plain uploads):
    /// the server sees only the sum of each round's updates.
    pub secure_aggregation: Option<SecureAggregationPolicy>,
    /// Who may check in: `"enrolled"` devices only (each presents `enrollment_secret` once
    /// and gets a credential of its own), or `"open"`: anyone, under any number of ids (for
    /// demos; the server warns). A settings file must say which ([`Settings::from_toml_file`]
    /// refuses a task that does not); left out in code, a task is open.
    pub admission: Option<Admission>,
    /// The secret a device presents once to enroll in an `enrolled` task (at least 16
    /// characters; never logged). Give it to devices out of band: a string, a QR code, or a
    /// link to the device app with `#enroll=<secret>`.
    pub enrollment_secret: Option<Secret>,
}

/// Who may check in to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Anyone who can reach the server, under any number of ids: for demos.
    Open,
    /// Devices with a credential: each enrolls once with the task's enrollment secret and
    /// gets its own credential, which it presents with every request; one credential holds
    /// at most one assignment per round, and operators can list and revoke credentials.
    Enrolled,
}

impl Admission {
    /// As written in settings and served.
    pub fn as_str(self) -> &'static str {
        match self {
            Admission::Open => "open",
            Admission::Enrolled => "enrolled",
        }
    }
}

/// Central differential privacy for a task: DP-FedAvg (McMahan et al. 2018, "Learning
/// Differentially Private Recurrent Language Models") with a Rényi-DP accountant and a budget.
///
/// Every update is clipped to L2 norm `clip` (scaled down, not refused) and weighs the same
/// (the sensitivity must not depend on a claimed example count); at commit the server adds
/// Gaussian noise of standard deviation `noise_multiplier · clip` to the sum, drawn from a
/// cryptographically secure generator, and divides by the round's `goal` (a fixed
/// denominator). A round takes at most `goal` updates. The accountant treats each committed
/// round as the Poisson-subsampled Gaussian mechanism with sampling rate
/// `goal / population`; the ε spent is recorded with every round and saved with every
/// version, and once the next round would take ε past `epsilon` the task stops training.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyPolicy {
    /// The L2 clip bound S of one update.
    pub clip: f64,
    /// The noise multiplier z: the noise's standard deviation on the sum is z · S.
    pub noise_multiplier: f64,
    /// How many devices may be sampled (the population the cohort is drawn from): the
    /// sampling rate is `rounds.goal / population`. The guarantee holds only if devices are
    /// this many and the cohort is a random sample of them; the server cannot check either.
    pub population: u64,
    /// The budget's ε: no round is committed that would take the task past it.
    pub epsilon: f64,
    /// The budget's δ (at most 1 / population, conventionally much less).
    pub delta: f64,
    /// Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
    /// Clipping"): the clip bound follows this quantile of the update norms (e.g. 0.5, the
    /// median), starting from `clip`; absent, the bound stays `clip`.
    #[serde(default)]
    pub target_quantile: Option<f64>,
    /// Adaptive clipping's learning rate η: after each round the bound is multiplied by
    /// `exp(-η (b - target_quantile))`, b the noised share of unclipped updates (default 0.2).
    #[serde(default = "default_clip_learning_rate")]
    pub clip_learning_rate: f64,
    /// Adaptive clipping's noise on the count of unclipped updates, as a standard deviation
    /// σ_b (default `rounds.goal / 20`, the paper's). It must exceed `noise_multiplier / 2`:
    /// the update's noise multiplier becomes `(z^-2 - (2 σ_b)^-2)^-1/2`, so that update and
    /// count together cost what one Gaussian release of multiplier z costs.
    #[serde(default)]
    pub count_noise: Option<f64>,
}

fn default_clip_learning_rate() -> f64 {
    0.2
}

impl PrivacyPolicy {
    /// The sampling rate of a round of `goal` devices.
    pub fn sampling_rate(&self, goal: u32) -> f64 {
        (f64::from(goal) / self.population as f64).min(1.0)
    }

    /// Adaptive clipping's noise σ_b on the count of unclipped updates, for rounds of `goal`.
    pub fn count_noise(&self, goal: u32) -> f64 {
        self.count_noise.unwrap_or(f64::from(goal) / 20.0)
    }

    /// The noise multiplier of the updates' sum: `noise_multiplier` itself, or with adaptive
    /// clipping the share left after the count's noise, `(z^-2 - (2 σ_b)^-2)^-1/2` (Andrew et
    /// al. 2021, Theorem 1), so that the round costs what a release of multiplier z costs.
    pub fn update_noise_multiplier(&self, goal: u32) -> f64 {
        match self.target_quantile {
            None => self.noise_multiplier,
            Some(_) => {
                let z = self.noise_multiplier;
                let two_sigma_b = 2.0 * self.count_noise(goal);
                (z.powi(-2) - two_sigma_b.powi(-2)).powf(-0.5)
            }
        }
    }

    /// Checks the policy for rounds of `goal` devices.
    pub fn validate(&self, goal: u32) -> Result<(), String> {
        let positive = |key: &str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "privacy.{key} must be positive and finite, not {x}"
                ))
            }
        };
        positive("clip", self.clip)?;
        positive("noise_multiplier", self.noise_multiplier)?;
        positive("epsilon", self.epsilon)?;
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(format!(
                "privacy.delta must be in (0, 1), not {}",
                self.delta
            ));
        }
        if self.population < u64::from(goal) {
            return Err(format!(
                "privacy.population ({}) is smaller than rounds.goal ({goal}): a round cannot \
                 sample more devices than there are",
                self.population
            ));
        }
        if let Some(q) = self.target_quantile {
            if !(q > 0.0 && q < 1.0) {
                return Err(format!(
                    "privacy.target_quantile must be in (0, 1), not {q}"
                ));
            }
            positive("clip_learning_rate", self.clip_learning_rate)?;
            let sigma_b = self.count_noise(goal);
            positive("count_noise", sigma_b)?;
            if 2.0 * sigma_b <= self.noise_multiplier {
                return Err(format!(
                    "privacy.count_noise ({sigma_b}) must exceed noise_multiplier / 2 ({}): the \
                     count of clipped updates must be noised enough to leave budget for the \
                     updates",
                    self.noise_multiplier / 2.0
                ));
            }
        }
        if self.delta > 1.0 / self.population as f64 {
            return Err(format!(
                "privacy.delta ({}) is above 1 / population ({}): such a δ allows releasing a \
                 device's data outright; choose a smaller one",
                self.delta,
                1.0 / self.population as f64
            ));
        }
        Ok(())
    }
}

/// Buffered asynchronous training (FedBuff, Nguyen et al. 2022): no synchronous rounds.
/// Devices check in whenever they are ready and train the version they download; the server
/// folds each update, weighted by `(1 + staleness)^-staleness_exponent`, into a buffer and
/// steps the model (through the task's strategy) after every `buffer` updates. Staleness is
/// how many versions the model moved on since the update's base version.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BufferedPolicy {
    /// Updates per server step (K); at least the task's `min_cohort`.
    pub buffer: u32,
    /// Assignments outstanding at once (devices training).
    pub concurrency: u32,
    /// Updates built on a version more than this many versions old are refused
    /// (`too_stale`).
    pub max_staleness: u64,
    /// The staleness discount's exponent a: an update `s` versions old weighs
    /// `(1 + s)^-a`. 0.5 (the default) is FedBuff's `1/sqrt(1 + s)`; 0 weighs all alike.
    pub staleness_exponent: f64,
    /// Seconds an assignment stays valid; an assignment not delivered by then frees its
    /// place for another device.
    pub assignment_secs: f64,
}

impl Default for BufferedPolicy {
    fn default() -> Self {
        Self {
            buffer: 10,
            concurrency: 100,
            max_staleness: 50,
            staleness_exponent: 0.5,
            assignment_secs: 600.0,
        }
    }
}

impl BufferedPolicy {
    /// The weight factor of an update `staleness` versions old.
    pub fn discount(&self, staleness: u64) -> f64 {
        (1.0 + staleness as f64).powf(-self.staleness_exponent)
    }

    fn validate(&self, min_cohort: u32) -> Result<(), String> {
        if self.buffer < min_cohort.max(1) {
            return Err(format!(
                "buffered.buffer ({}) is below min_cohort ({min_cohort}): a step of fewer \
                 updates would publish a model that reveals them",
                self.buffer
            ));
        }
        if self.concurrency == 0 {
            return Err("buffered.concurrency must be at least 1".into());
        }
        if !(self.staleness_exponent.is_finite() && self.staleness_exponent >= 0.0) {
            return Err("buffered.staleness_exponent must be a finite number >= 0".into());
        }
        if !(self.assignment_secs.is_finite() && self.assignment_secs > 0.0) {
            return Err("buffered.assignment_secs must be positive".into());
        }
        Ok(())
    }
}

/// Secure aggregation (SecAgg+, Bonawitz et al. 2017 and Bell et al. 2020) for a task: each
/// round goes through four steps (advertise keys, share keys, masked input, unmask), each
/// closing at its goal or its deadline, and the server learns only the sum of the devices'
/// inputs. A device weighs its own update (its example count capped at
/// `max_examples_per_update`, over the cap; or 1 with uniform weighting), clips it to `clip`,
/// and encodes it with its loss and accuracy in fixed point (`input_bits` per value, with
/// stochastic rounding). The degree of the neighbourhood graph and the threshold follow the
/// core's `secagg::protocol::Params::new` (about 6 log2(n) neighbours; a third plus one).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SecureAggregationPolicy {
    /// Bits of one device's input per value (2 to 24); the ring adds room for the sum.
    pub input_bits: u32,
    /// The L2 bound a device clips its update to (at most `max_update_norm`); values are
    /// scaled by it, so a bound far above real updates' norms costs precision.
    pub clip: f64,
    /// Local losses are clamped to [0, loss_bound] before they are summed.
    pub loss_bound: f64,
    /// Seconds for devices to check in, train and advertise their keys (the step also
    /// closes when `rounds.goal` devices have): `starling device` trains before it
    /// advertises, so that the later steps are quick.
    pub advertise_secs: f64,
    /// Seconds for the devices that advertised to send their encrypted shares.
    pub share_secs: f64,
    /// Seconds for the devices that shared to send their masked inputs.
    pub masked_input_secs: f64,
    /// Seconds for the survivors to send their unmasking shares.
    pub unmask_secs: f64,
}

impl Default for SecureAggregationPolicy {
    fn default() -> Self {
        Self {
            input_bits: 16,
            clip: 10.0,
            loss_bound: 100.0,
            advertise_secs: 120.0,
            share_secs: 30.0,
            masked_input_secs: 30.0,
            unmask_secs: 30.0,
        }
    }
}

impl SecureAggregationPolicy {
    /// Places in a round: assignments handed out, `ceil(goal * overcommit)`.
    pub fn places(rounds: &RoundPolicy) -> usize {
        (f64::from(rounds.goal) * rounds.overcommit).ceil().max(1.0) as usize
    }

    /// The ring of a round's inputs, before any room for noise.
    pub fn fixed_point(
        &self,
        rounds: &RoundPolicy,
    ) -> Result<starling_core::secagg::encode::FixedPoint, starling_core::secagg::encode::EncodeError>
    {
        starling_core::secagg::encode::FixedPoint::new(self.input_bits, Self::places(rounds))
    }

    /// Distributed differential privacy (`[tasks.privacy]` with secure aggregation): the
    /// Skellam noise each device adds so that the fewest survivors a round commits with
    /// (`max(rounds.min, min_cohort)`) reach the policy's noise multiplier on a model of
    /// `numel` parameters.
    pub fn distributed_noise(
        &self,
        privacy: &PrivacyPolicy,
        rounds: &RoundPolicy,
        min_cohort: u32,
        numel: usize,
    ) -> starling_core::privacy::DistributedSkellam {
        let levels = self.fixed_point(rounds).map_or(1.0, |f| f.levels());
        starling_core::privacy::DistributedSkellam::new(
            levels,
            numel,
            privacy.noise_multiplier,
            rounds.min.max(min_cohort) as usize,
        )
    }

    fn validate(&self, rounds: &RoundPolicy, max_update_norm: f64) -> Result<(), String> {
        if let Err(e) =
            starling_core::secagg::encode::FixedPoint::new(self.input_bits, Self::places(rounds))
        {
            return Err(format!(
                "secure_aggregation.input_bits ({}) with {} places a round                  (rounds.goal * rounds.overcommit): {e}",
                self.input_bits,
                Self::places(rounds)
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= max_update_norm) {
            return Err(format!(
                "secure_aggregation.clip must be positive and at most max_update_norm                  ({max_update_norm}), not {}",
                self.clip
            ));
        }
        if !(self.loss_bound.is_finite() && self.loss_bound > 0.0) {
            return Err("secure_aggregation.loss_bound must be positive and finite".into());
        }
        for (key, secs) in [
            ("advertise_secs", self.advertise_secs),
            ("share_secs", self.share_secs),
            ("masked_input_secs", self.masked_input_secs),
            ("unmask_secs", self.unmask_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0) {
                return Err(format!(
                    "secure_aggregation.{key} must be positive, not {secs}"
                ));
            }
        }
        if rounds.min < 2 {
            return Err(
                "secure aggregation needs rounds.min of at least 2: the sum of one device's                  input is that input"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The smallest `min_cohort` a task gets without saying so: rounds of fewer devices let the
/// difference of two versions reveal a device's update.
pub const MIN_COHORT: u32 = 10;

/// How updates are weighted in the average.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// By example count, capped at `max_examples_per_update` (FedAvg).
    #[default]
    Examples,
    /// Every update weighs the same, whatever it claims.
    Uniform,
}

/// Which committed checkpoints are kept: the newest `keep_last`, and every version that is a
/// multiple of `keep_every` (0: none). Version 0, the initial model, is always kept.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// The newest versions kept (at least 1).
    pub keep_last: u64,
    /// Versions that are multiples of this are kept too (0: none).
    pub keep_every: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep_last: 10,
            keep_every: 100,
        }
    }
}

impl Retention {
    /// Whether `version` is kept while `latest` is the newest.
    pub fn keeps(&self, version: u64, latest: u64) -> bool {
        version == 0
            || version + self.keep_last > latest
            || (self.keep_every > 0 && version.is_multiple_of(self.keep_every))
    }
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            name: "linear".into(),
            model: "linear".into(),
            spec_file: None,
            initial_model: None,
            inputs: 1,
            outputs: 1,
            init_seed: 0,
            plan: None,
            rounds: RoundPolicy::default(),
            max_update_norm: 1000.0,
            max_examples_per_update: 10_000,
            weighting: Weighting::Examples,
            min_cohort: MIN_COHORT,
            max_assignments_per_address: 3,
            retention: Retention::default(),
            strategy: StrategyConfig::default(),
            buffered: None,
            evaluate_every: 0,
            privacy: None,
            secure_aggregation: None,
            admission: None,
            enrollment_secret: None,
        }
    }
}

/// A whole plan as `[tasks.plan]` overrides, for settings built in code.
pub fn plan_table(plan: &Plan) -> toml::Table {
    toml::Table::try_from(plan).expect("a plan is a flat table of numbers and booleans")
}

/// When a round commits, is abandoned, and how devices are paced.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoundPolicy {
    /// Updates that commit a round at once.
    pub goal: u32,
    /// Updates needed to commit at the deadline; below it the round is abandoned.
    pub min: u32,
    /// Seconds from a round's start to its deadline.
    pub deadline_secs: f64,
    /// Assignments handed out per round, as a multiple of `goal` (covers devices that drop).
    pub overcommit: f64,
    /// Base "come back after" time for devices beyond the round's goal, in seconds; each
    /// answer adds up to 50% random jitter so they do not return together.
    pub retry_secs: f64,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        Self {
            goal: 12,
            min: 10,
            deadline_secs: 60.0,
            overcommit: 1.3,
            retry_secs: 5.0,
        }
    }
}

/// A task's settings resolved into a model spec and plan.
#[derive(Debug, Clone)]
pub struct TaskDefinition {
    /// The task's name.
    pub name: String,
    /// The model.
    pub spec: ModelSpec,
    /// The plan.
    pub plan: Plan,
    /// The round policy.
    pub rounds: RoundPolicy,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// The initial parameters of an external model (from `initial_model`); otherwise the
    /// spec's initialisers with `init_seed` make them.
    pub initial_params: Option<Parameters>,
    /// L2 bound on updates and on a commit's step.
    pub max_update_norm: f64,
    /// Cap on one update's weight.
    pub max_examples_per_update: u64,
    /// How updates are weighted.
    pub weighting: Weighting,
    /// The fewest devices a published round may have.
    pub min_cohort: u32,
    /// Assignments one client address may hold in one round.
    pub max_assignments_per_address: u32,
    /// Which checkpoints are kept.
    pub retention: Retention,
    /// The server strategy (its state is stored with each version).
    pub strategy: StrategyConfig,
    /// Buffered asynchronous mode, if the task uses it.
    pub buffered: Option<BufferedPolicy>,
    /// A federated evaluation round after every this many committed training rounds (0:
    /// none).
    pub evaluate_every: u32,
    /// Central differential privacy, if the task uses it.
    pub privacy: Option<PrivacyPolicy>,
    /// Seeds the privacy noise so that a run can be repeated (the simulator); `None`, as a
    /// server's settings always give, draws it from the operating system's entropy.
    pub privacy_noise_seed: Option<u64>,
    /// Secure aggregation, if the task uses it.
    pub secure_aggregation: Option<SecureAggregationPolicy>,
    /// Who may check in.
    pub admission: Admission,
    /// The enrollment secret of an enrolled task.
    pub enrollment_secret: Option<Secret>,
}

impl TaskSettings {
    /// Refuses a task that does not say who may check in, as a settings file or an admin
    /// call must.
    pub fn require_admission(&self) -> Result<(), String> {
        if self.admission.is_none() {
            return Err(format!(
                "task `{}` does not say who may check in: add admission = \"enrolled\" with \
                 an enrollment_secret (devices enroll once and each gets a credential), or \
                 admission = \"open\" (anyone, under any number of ids: for demos)",
                self.name
            ));
        }
        Ok(())
    }

    /// Resolves the model and plan, reading `spec_file` or `initial_model` if set.
    pub fn resolve(&self) -> Result<TaskDefinition, SettingsError> {
        self.resolve_with(None)
    }

    /// Resolves the model and plan; an external model's initial parameters are `initial_model`
    /// (a safetensors file's bytes, as an admin call sends them) when given, else read from
    /// the `initial_model` path.
    pub fn resolve_with(
        &self,
        initial_model: Option<&[u8]>,
    ) -> Result<TaskDefinition, SettingsError> {
        let invalid = |m: String| SettingsError::Invalid(format!("task `{}`: {m}", self.name));
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "a task name uses only letters, digits, `-` and `_`".into(),
            ));
        }
        let mut initial_params = None;
        let spec = match &self.spec_file {
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                    path: path.clone(),
                    source,
                })?;
                ModelSpec::from_json(&json).map_err(|e| invalid(e.to_string()))?
            }
            None if self.model == starling_core::trainer::spec::EXTERNAL => {
                let (bytes, source) = match (initial_model, &self.initial_model) {
                    (Some(bytes), _) => (bytes.to_vec(), "the initial model".to_string()),
                    (None, Some(path)) => (
                        std::fs::read(path).map_err(|source| SettingsError::Read {
                            path: path.clone(),
                            source,
                        })?,
                        format!("initial_model {}", path.display()),
                    ),
                    (None, None) => {
                        return Err(invalid(
                            "model = \"external\" needs initial_model: a safetensors file of \
                             the model's tensors"
                                .into(),
                        ))
                    }
                };
                let (params, _) = Parameters::from_safetensors(&bytes)
                    .map_err(|e| invalid(format!("{source}: {e}")))?;
                if let Some((name, _)) = params
                    .iter()
                    .find(|(_, t)| t.data().iter().any(|v| !v.is_finite()))
                {
                    return Err(invalid(format!(
                        "{source}: tensor `{name}` holds NaN or an infinity"
                    )));
                }
                let spec = ModelSpec::external(
                    params
                        .iter()
                        .map(|(name, t)| starling_core::trainer::spec::TensorSpec {
                            name: name.to_string(),
                            shape: t.shape().to_vec(),
                        })
                        .collect(),
                );
                initial_params = Some(params);
                spec
            }
            None => builtin::by_name(&self.model, self.inputs, self.outputs).ok_or_else(|| {
                if builtin::NAMES.contains(&self.model.as_str()) {
                    invalid(format!(
                        "the built-in model `{}` cannot take {} inputs (the cnn needs square \
                         images, e.g. 784 for 28x28)",
                        self.model, self.inputs
                    ))
                } else {
                    invalid(format!(
                        "unknown model `{}` (built-in models: {}; or `external` with \
                         initial_model)",
                        self.model,
                        builtin::NAMES.join(", ")
                    ))
                }
            })?,
        };
        spec.validate().map_err(|e| invalid(e.to_string()))?;
        let mut plan = builtin::default_plan(&spec.name);
        if let Some(overrides) = &self.plan {
            let mut merged =
                toml::Table::try_from(&plan).map_err(|e| invalid(format!("plan: {e}")))?;
            merged.extend(overrides.clone());
            plan = merged
                .try_into()
                .map_err(|e: toml::de::Error| invalid(format!("plan: {}", e.message())))?;
        }
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        let r = &self.rounds;
        if r.goal == 0 || r.min == 0 || r.min > r.goal {
            return Err(invalid(format!(
                "rounds need 1 <= min <= goal (min {}, goal {})",
                r.min, r.goal
            )));
        }
        if !(r.deadline_secs.is_finite() && r.deadline_secs > 0.0) {
            return Err(invalid("rounds.deadline_secs must be positive".into()));
        }
        if !(r.overcommit.is_finite() && r.overcommit >= 1.0) {
            return Err(invalid("rounds.overcommit must be at least 1".into()));
        }
        if !(r.retry_secs.is_finite() && r.retry_secs > 0.0) {
            return Err(invalid("rounds.retry_secs must be positive".into()));
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm > 0.0) {
            return Err(invalid(
                "max_update_norm must be a positive, finite number".into(),
            ));
        }
        if self.max_examples_per_update == 0
            || self.max_examples_per_update > starling_core::wire::update::MAX_EXAMPLES as u64
        {
            return Err(invalid(format!(
                "max_examples_per_update must be 1 to {}",
                starling_core::wire::update::MAX_EXAMPLES
            )));
        }
        if self.min_cohort == 0 {
            return Err(invalid("min_cohort must be at least 1".into()));
        }
        if r.min < self.min_cohort && self.buffered.is_none() {
            return Err(invalid(format!(
                "rounds.min ({}) is below min_cohort ({}): a round of fewer devices would \
                 publish a model that reveals their updates; raise rounds.min, or lower \
                 min_cohort explicitly (demos only)",
                r.min, self.min_cohort
            )));
        }
        if self.min_cohort < MIN_COHORT {
            tracing::warn!(
                task = %self.name, min_cohort = self.min_cohort,
                "min_cohort is below {MIN_COHORT}: a round of this few devices publishes a model \
                 and statistics that reveal much about each device's update; for demos only"
            );
        }
        if self.max_assignments_per_address == 0 {
            return Err(invalid(
                "max_assignments_per_address must be at least 1".into(),
            ));
        }
        if self.retention.keep_last == 0 {
            return Err(invalid("retention.keep_last must be at least 1".into()));
        }
        self.strategy.validate().map_err(invalid)?;
        if let Some(b) = &self.buffered {
            b.validate(self.min_cohort).map_err(invalid)?;
            if self.evaluate_every > 0 {
                return Err(invalid(
                    "evaluate_every needs synchronous rounds; a buffered task has none (score \
                     its versions with a separate task, or drop [tasks.buffered])"
                        .into(),
                ));
            }
        }
        if let Some(p) = &self.privacy {
            p.validate(r.goal).map_err(invalid)?;
            if self.buffered.is_some() {
                return Err(invalid(
                    "[tasks.privacy] needs synchronous rounds: the accountant treats each round \
                     as one sampled Gaussian release, which buffered mode is not"
                        .into(),
                ));
            }
            if self.evaluate_every > 0 {
                return Err(invalid(
                    "evaluate_every publishes devices' losses without noise, which \
                     [tasks.privacy] does not account for; evaluate on held-out data instead"
                        .into(),
                ));
            }
        }
        if let Some(sa) = &self.secure_aggregation {
            sa.validate(r, self.max_update_norm).map_err(invalid)?;
            if self.buffered.is_some() {
                return Err(invalid(
                    "[tasks.secure_aggregation] needs synchronous rounds: its cohort goes \
                     through four steps together, and buffered mode (where staleness \
                     discounts would have to be applied on the device) is not built for it"
                        .into(),
                ));
            }
            if let Some(p) = &self.privacy {
                if p.target_quantile.is_some() {
                    return Err(invalid(
                        "privacy.target_quantile with [tasks.secure_aggregation]: adaptive \
                         clipping counts the clipped updates on the server, which cannot see \
                         updates under secure aggregation; drop privacy.target_quantile"
                            .into(),
                    ));
                }
                if p.clip != sa.clip {
                    return Err(invalid(format!(
                        "privacy.clip ({}) and secure_aggregation.clip ({}) must be equal: \
                         devices clip their updates to it and the noise they add is \
                         calibrated to it",
                        p.clip, sa.clip
                    )));
                }
                let noise = sa.distributed_noise(p, r, self.min_cohort, spec.layout().numel());
                let places = SecureAggregationPolicy::places(r);
                if let Err(e) = sa
                    .fixed_point(r)
                    .and_then(|f| f.with_noise(places, noise.mu))
                {
                    return Err(invalid(format!(
                        "secure_aggregation.input_bits ({}) leave no room in the ring for the \
                         devices' noise (noise_multiplier {}, {places} places): {e}",
                        sa.input_bits, p.noise_multiplier
                    )));
                }
            }
            if self.evaluate_every > 0 {
                return Err(invalid(
                    "[tasks.secure_aggregation] cannot be combined with evaluate_every: an \
                     evaluation report is one device's loss and accuracy in the clear, which \
                     secure aggregation exists to hide"
                        .into(),
                ));
            }
        }
        let admission = self.admission.unwrap_or(Admission::Open);
        match (admission, &self.enrollment_secret) {
            (Admission::Enrolled, None) => {
                return Err(invalid(
                    "admission = \"enrolled\" needs an enrollment_secret (at least 16 \
                     characters) for devices to enroll with"
                        .into(),
                ))
            }
            (Admission::Enrolled, Some(secret)) if secret.0.chars().count() < 16 => {
                return Err(invalid(
                    "enrollment_secret must have at least 16 characters".into(),
                ))
            }
            (Admission::Open, Some(_)) => {
                return Err(invalid(
                    "enrollment_secret is set but admission is \"open\": set admission = \
                     \"enrolled\", or drop the secret"
                        .into(),
                ))
            }
            _ => {}
        }
        Ok(TaskDefinition {
            name: self.name.clone(),
            spec,
            plan,
            rounds: r.clone(),
            init_seed: self.init_seed,
            initial_params,
            max_update_norm: self.max_update_norm,
            max_examples_per_update: self.max_examples_per_update,
            weighting: self.weighting,
            min_cohort: self.min_cohort,
            max_assignments_per_address: self.max_assignments_per_address,
            retention: self.retention,
            strategy: self.strategy,
            buffered: self.buffered.clone(),
            evaluate_every: self.evaluate_every,
            privacy: self.privacy.clone(),
            privacy_noise_seed: None,
            secure_aggregation: self.secure_aggregation.clone(),
            admission,
            enrollment_secret: self.enrollment_secret.clone(),
        })
    }
}

fn env_var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_env<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, SettingsError>
where
    T::Err: std::fmt::Display,
{
    env_var(name)
        .map(|v| {
            v.parse().map_err(|e: T::Err| SettingsError::Env {
                name,
                value: v.clone(),
                message: e.to_string(),
            })
        })
        .transpose()
}

impl Settings {
    /// Loads settings: defaults, then `file` if given, then environment variables
    /// (`STARLING_HOST`, `STARLING_PORT`, `PORT`, `STARLING_DATA_DIR`, `STARLING_DATABASE`,
    /// `STARLING_MAX_BODY_BYTES`, `STARLING_ADMIN_TOKEN`, `STARLING_CLIENT_ADDRESS_HEADER`,
    /// `STARLING_TLS_CERT`, `STARLING_TLS_KEY`, `STARLING_TENSORBOARD_DIR`).
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut s = match file {
            Some(path) => Self::from_toml_file(path)?,
            None => Self::default(),
        };
        s.apply_env()?;
        Ok(s)
    }

    /// Parses a TOML file. A relative `spec_file` is taken relative to the file's folder.
    /// Every task in a file must say who may check in (`admission`): a file is what an
    /// operator deploys, and open admission should never be an accident.
    pub fn from_toml_file(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut settings: Settings = toml::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for task in &settings.tasks {
            task.require_admission().map_err(SettingsError::Invalid)?;
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        for task in &mut settings.tasks {
            if let Some(spec) = task.spec_file.as_mut().filter(|p| p.is_relative()) {
                *spec = dir.join(&*spec);
            }
            if let Some(m) = task.initial_model.as_mut().filter(|p| p.is_relative()) {
                *m = dir.join(&*m);
            }
        }
        Ok(settings)
    }

    /// Applies environment overrides. `STARLING_PORT` wins over `PORT`.
    pub fn apply_env(&mut self) -> Result<(), SettingsError> {
        if let Some(h) = env_var("STARLING_HOST") {
            self.server.host = h;
        }
        if let Some(p) = parse_env("PORT")? {
            self.server.port = p;
            // A platform that sets PORT routes outside traffic to it: listen on every interface.
            if env_var("STARLING_HOST").is_none() {
                self.server.host = "0.0.0.0".into();
            }
        }
        if let Some(p) = parse_env("STARLING_PORT")? {
            self.server.port = p;
        }
        if let Some(d) = env_var("STARLING_DATA_DIR") {
            self.server.data_dir = d.into();
        }
        if let Some(d) = env_var("STARLING_DATABASE") {
            self.server.database = Some(d.into());
        }
        if let Some(m) = parse_env("STARLING_MAX_BODY_BYTES")? {
            self.server.max_body_bytes = m;
        }
        if let Some(h) = env_var("STARLING_CLIENT_ADDRESS_HEADER") {
            self.server.client_address_header = Some(h);
        }
        if let Some(t) = env_var("STARLING_ADMIN_TOKEN") {
            self.server.admin_token = Some(Secret(t));
        }
        if let Some(c) = env_var("STARLING_TLS_CERT") {
            self.server.tls_cert = Some(c.into());
        }
        if let Some(k) = env_var("STARLING_TLS_KEY") {
            self.server.tls_key = Some(k.into());
        }
        if let Some(d) = env_var("STARLING_TENSORBOARD_DIR") {
            self.server.tensorboard_dir = Some(d.into());
        }
        Ok(())
    }

    /// The tasks resolved and checked (the default `linear` task when none is configured).
    pub fn task_definitions(&self) -> Result<Vec<TaskDefinition>, SettingsError> {
        let tasks = if self.tasks.is_empty() {
            vec![TaskSettings::default()]
        } else {
            self.tasks.clone()
        };
        let defs = tasks
            .iter()
            .map(TaskSettings::resolve)
            .collect::<Result<Vec<_>, _>>()?;
        for (i, d) in defs.iter().enumerate() {
            if defs[..i].iter().any(|o| o.name == d.name) {
                return Err(SettingsError::Invalid(format!(
                    "task `{}` is defined twice",
                    d.name
                )));
            }
        }
        let sv = &self.server;
        if sv.max_body_bytes < 1024 {
            return Err(SettingsError::Invalid(
                "server.max_body_bytes must be at least 1024".into(),
            ));
        }
        for (key, secs) in [
            ("header_timeout_secs", sv.header_timeout_secs),
            ("body_timeout_secs", sv.body_timeout_secs),
            ("idle_timeout_secs", sv.idle_timeout_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0) {
                return Err(SettingsError::Invalid(format!(
                    "server.{key} must be positive"
                )));
            }
        }
        if let Some(h) = &sv.client_address_header {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(SettingsError::Invalid(format!(
                    "server.client_address_header `{h}` is not a header name"
                )));
            }
        }
        match (&sv.tls_cert, &sv.tls_key) {
            (Some(_), None) => {
                return Err(SettingsError::Invalid(
                    "server.tls_cert is set but server.tls_key is not: HTTPS needs the \
                     certificate's private key too (STARLING_TLS_KEY, --tls-key)"
                        .into(),
                ))
            }
            (None, Some(_)) => {
                return Err(SettingsError::Invalid(
                    "server.tls_key is set but server.tls_cert is not: HTTPS needs the \
                     certificate too (STARLING_TLS_CERT, --tls-cert)"
                        .into(),
                ))
            }
            _ => {}
        }
        if sv.admin_token.as_ref().is_some_and(|t| t.0.len() < 16) {
            return Err(SettingsError::Invalid(
                "server.admin_token must have at least 16 characters".into(),
            ));
        }
        for (key, n) in [
            ("max_connections", sv.max_connections),
            (
                "max_connections_per_address",
                sv.max_connections_per_address,
            ),
            ("max_uploads_in_flight", sv.max_uploads_in_flight),
        ] {
            if n == 0 {
                return Err(SettingsError::Invalid(format!(
                    "server.{key} must be at least 1"
                )));
            }
        }
        Ok(defs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_file_with_a_task_parses_and_resolves() {
        let s: Settings = toml::from_str(
            r#"
            [server]
            port = 9000
            [[tasks]]
            name = "digits"
            model = "logistic"
            inputs = 64
            outputs = 10
            [tasks.plan]
            epochs = 2
            batch_size = 10
            learning_rate = 0.1
            [tasks.rounds]
            goal = 20
            min = 10
            [tasks.strategy]
            name = "fedadam"
            server_lr = 0.05
            "#,
        )
        .unwrap();
        assert_eq!(s.server.port, 9000);
        let d = &s.task_definitions().unwrap()[0];
        assert_eq!(d.spec.outputs(), 10);
        assert_eq!(d.plan.epochs, 2);
        assert_eq!(d.rounds.goal, 20);
        assert_eq!(
            d.strategy,
            StrategyConfig::FedAdam {
                server_lr: 0.05,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3
            }
        );
        assert_eq!(
            TaskSettings::default().strategy,
            StrategyConfig::FedAvg { server_lr: 1.0 }
        );
    }

    /// Keys missing from `[tasks.plan]` keep the model's own defaults, not the generic ones.
    #[test]
    fn a_partial_plan_keeps_the_models_defaults() {
        let s: Settings = toml::from_str(
            "[[tasks]]\nname = 'digits'\nmodel = 'logistic'\ninputs = 64\noutputs = 10\n\
             [tasks.plan]\nepochs = 3\n",
        )
        .unwrap();
        let d = &s.task_definitions().unwrap()[0];
        assert_eq!(d.plan.epochs, 3);
        assert_eq!(
            d.plan.learning_rate,
            builtin::default_plan("logistic").learning_rate
        );
        let bad: Settings =
            toml::from_str("[[tasks]]\nname = 'x'\n[tasks.plan]\nepoch = 3\n").unwrap();
        let err = bad.task_definitions().unwrap_err().to_string();
        assert!(err.contains("epoch"), "{err}");
    }

    #[test]
    fn a_relative_spec_file_is_found_beside_the_settings_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = builtin::logistic(4, 3);
        std::fs::write(dir.path().join("model.json"), spec.to_json()).unwrap();
        let cfg = dir.path().join("starling.toml");
        std::fs::write(
            &cfg,
            "[[tasks]]\nname = 'custom'\nadmission = 'open'\nspec_file = 'model.json'\n",
        )
        .unwrap();
        let s = Settings::from_toml_file(&cfg).unwrap();
        assert_eq!(s.task_definitions().unwrap()[0].spec, spec);
    }

    #[test]
    fn inconsistent_settings_are_named() {
        let bad: Result<Settings, _> = toml::from_str("[server]\nprot = 1\n");
        assert!(bad.unwrap_err().to_string().contains("prot"));
        let s: Settings =
            toml::from_str("[[tasks]]\nname='x'\n[tasks.rounds]\ngoal=2\nmin=3\n").unwrap();
        assert!(s
            .task_definitions()
            .unwrap_err()
            .to_string()
            .contains("min <= goal"));
        let s: Settings =
            toml::from_str("[[tasks]]\nname='x'\n[tasks.strategy]\nname='fedadam'\nbeta2=1.0\n")
                .unwrap();
        assert!(s
            .task_definitions()
            .unwrap_err()
            .to_string()
            .contains("beta2 must be in [0, 1)"));
        let bad: Result<Settings, _> =
            toml::from_str("[[tasks]]\nname='x'\n[tasks.strategy]\nname='fedavg'\nbeta1=0.9\n");
        assert!(bad.unwrap_err().to_string().contains("beta1"));
        let s: Settings = toml::from_str("[[tasks]]\nname='x'\nmodel='cnn9'\n").unwrap();
        assert!(s
            .task_definitions()
            .unwrap_err()
            .to_string()
            .contains("unknown model `cnn9`"));
    }
}
