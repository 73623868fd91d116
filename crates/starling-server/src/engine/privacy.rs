//! A task's differential privacy (`[tasks.privacy]`): DP-FedAvg's release of a round's sum
//! and the budget the task spends on it. With secure aggregation the devices add the noise
//! themselves (distributed DP, [`Distributed`]: Skellam noise in the ring, so the server
//! never sees an un-noised sum) and the release here only accounts for it. The clipping itself happens when an update is
//! checked ([`starling_core::wire::update::Rules::clip`]); here the round's clipped sum gets
//! its Gaussian noise, adaptive clipping moves the bound toward a quantile of the update
//! norms (from a noised count of the unclipped ones), the Rényi-DP accountant composes the
//! round, and the budget decides whether another round may run.

use rand::Rng;
use serde::{Deserialize, Serialize};
use starling_core::privacy::{DistributedSkellam, PrivacyError, RdpAccountant};
use starling_core::WeightedSum;

use crate::settings::PrivacyPolicy;
use crate::store::RoundPrivacy;

/// The mechanism's name, as recorded in the ledger.
pub const MECHANISM: &str = "gaussian";

/// The distributed mechanism's name, as recorded in the ledger.
pub const DISTRIBUTED_MECHANISM: &str = "skellam";

/// Distributed DP under secure aggregation: the noise every device adds, the fewest devices
/// a round commits with (whose noise alone must suffice), and the places a round hands out
/// (at most that many devices are sampled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distributed {
    /// Each device's Skellam noise and the sum's sensitivity.
    pub noise: DistributedSkellam,
    /// The fewest devices a secure round commits with.
    pub min_devices: u64,
    /// Places a round hands out.
    pub places: u64,
}

/// A task's privacy: its policy, the rounds' sampling rate and the accountant's state (the ε
/// spent by every committed round so far).
#[derive(Debug, Clone)]
pub struct Privacy {
    policy: PrivacyPolicy,
    cohort: u32,
    sampling_rate: f64,
    state: PrivacyState,
    noise_seed: Option<u64>,
    distributed: Option<Distributed>,
}

/// What a version stores of a task's privacy: the accountant, and the clip bound the next
/// round uses (it moves with adaptive clipping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyState {
    /// The Rényi-DP accountant: what every released round spent.
    pub accountant: RdpAccountant,
    /// The clip bound of the next round.
    pub clip: f64,
}

/// Why a task's state cannot be resumed.
#[derive(Debug, thiserror::Error)]
#[error("the stored privacy ledger is unreadable: {0}")]
pub struct LedgerError(String);

impl Privacy {
    /// The privacy of a task with rounds of `cohort` devices, resumed from the accountant
    /// state stored with its latest version (empty: nothing spent yet).
    ///
    /// `noise_seed` makes the noise reproducible (the simulator's runs are functions of their
    /// seed); a server leaves it `None` and draws from the operating system's entropy.
    /// `distributed`: the devices add the noise (secure aggregation); the sampling rate is
    /// then the round's places over the population, as up to that many devices take part.
    pub fn resume(
        policy: PrivacyPolicy,
        cohort: u32,
        stored: &[u8],
        noise_seed: Option<u64>,
        distributed: Option<Distributed>,
    ) -> Result<Self, LedgerError> {
        let state = if stored.is_empty() {
            PrivacyState {
                accountant: RdpAccountant::new(),
                clip: policy.clip,
            }
        } else {
            serde_json::from_slice(stored).map_err(|e| LedgerError(e.to_string()))?
        };
        if !(state.clip.is_finite() && state.clip > 0.0) {
            return Err(LedgerError(format!("clip bound {}", state.clip)));
        }
        let sampling_rate = match distributed {
            Some(d) => (d.places as f64 / policy.population as f64).min(1.0),
            None => policy.sampling_rate(cohort),
        };
        Ok(Self {
            sampling_rate,
            policy,
            cohort,
            state,
            noise_seed,
            distributed,
        })
    }

    /// The policy.
    pub fn policy(&self) -> &PrivacyPolicy {
        &self.policy
    }

    /// The sampling rate the accountant uses for each round.
    pub fn sampling_rate(&self) -> f64 {
        self.sampling_rate
    }

    /// The state to store with a version.
    pub fn state(&self) -> Vec<u8> {
        Self::state_of(&self.state)
    }

    /// The clip bound of the next round.
    pub fn clip(&self) -> f64 {
        self.state.clip
    }

    /// ε spent so far, at the budget's δ (infinite if the accountant cannot say: the budget
    /// then counts as spent, failing closed).
    pub fn spent(&self) -> f64 {
        self.state
            .accountant
            .epsilon(self.policy.delta)
            .unwrap_or(f64::INFINITY)
    }

    /// The accountant after one more round, and its ε.
    /// With distributed noise, a round of `devices` survivors (the fewest a round commits
    /// with, when asking whether one more may run).
    fn with_one_more_round(&self) -> Result<(RdpAccountant, f64), PrivacyError> {
        let devices = self.distributed.map_or(0, |d| d.min_devices);
        self.with_one_more_round_of(devices)
    }

    fn with_one_more_round_of(&self, devices: u64) -> Result<(RdpAccountant, f64), PrivacyError> {
        let mut next = self.state.accountant.clone();
        match &self.distributed {
            Some(d) => {
                let step = d.noise.rdp(self.sampling_rate, devices, next.orders())?;
                next.compose_rdp(&step)?;
            }
            None => next.compose_subsampled_gaussian(
                self.sampling_rate,
                self.policy.noise_multiplier,
                1,
            )?,
        }
        let epsilon = next.epsilon(self.policy.delta)?;
        Ok((next, epsilon))
    }

    /// Why no further round may run: one more would take ε past the budget, or the
    /// accountant cannot compute it (`None`: it may run).
    pub fn exhausted(&self) -> Option<String> {
        match self.with_one_more_round() {
            Ok((_, next)) if next <= self.policy.epsilon => None,
            Ok((_, next)) => Some(format!(
                "the privacy budget is spent: ε = {:.4} so far, and one more round would reach \
                 ε = {next:.4}, past the budget ε = {} at δ = {}",
                self.spent(),
                self.policy.epsilon,
                self.policy.delta
            )),
            Err(e) => Some(format!("the privacy accountant failed: {e}")),
        }
    }

    /// Releases a round's sum: adds Gaussian noise of standard deviation `z · clip` to every
    /// coordinate (from the operating system's cryptographically secure generator, through
    /// `rand`'s thread generator) and divides by the cohort, a fixed denominator. Returns the
    /// ledger entry and the accountant the round leaves behind, for the caller to adopt
    /// once the version is stored ([`Privacy::adopt`]).
    ///
    /// Fails, leaving `sum` as it was, if the round would take ε past the budget (the round
    /// was opened only if it would not, so this is a second line of defence).
    ///
    /// With adaptive clipping the next round's bound is
    /// `clip · exp(-η (b - target_quantile))`, b the share of this round's updates the bound
    /// left unscaled, counted with Gaussian noise of deviation σ_b (Andrew et al. 2021,
    /// Algorithm 1, geometric update).
    pub fn release(
        &self,
        sum: &mut WeightedSum,
        round: u64,
    ) -> Result<(RoundPrivacy, PrivacyState), String> {
        if let Some(d) = self.distributed {
            return self.release_distributed(d, sum);
        }
        if let Some(reason) = self.exhausted() {
            return Err(reason);
        }
        let (next, epsilon) = self.with_one_more_round().map_err(|e| e.to_string())?;
        let p = &self.policy;
        let clip = self.state.clip;
        let std = p.update_noise_multiplier(self.cohort) * clip;
        let denominator = f64::from(self.cohort);
        let unclipped = (sum.updates() - sum.clipped()) as f64;
        let next_clip = match self.noise_seed {
            None => {
                let mut rng = rand::rng();
                sum.privatize(std, denominator, &mut rng);
                self.next_clip(unclipped, &mut rng)
            }
            Some(seed) => {
                use rand::SeedableRng;
                let seed = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                sum.privatize(std, denominator, &mut rng);
                self.next_clip(unclipped, &mut rng)
            }
        };
        let entry = RoundPrivacy {
            mechanism: MECHANISM.into(),
            clip,
            next_clip: p.target_quantile.map(|_| next_clip),
            noise_multiplier: p.noise_multiplier,
            cohort: self.cohort,
            sampling_rate: self.sampling_rate,
            epsilon,
            delta: p.delta,
        };
        Ok((
            entry,
            PrivacyState {
                accountant: next,
                clip: next_clip,
            },
        ))
    }

    /// Releases a secure round's decoded sum, which already holds the devices' Skellam noise:
    /// accounts for the noise of the devices whose inputs are in it (at least the minimum, or
    /// the round would not have committed) and fixes the denominator at the cohort.
    fn release_distributed(
        &self,
        d: Distributed,
        sum: &mut WeightedSum,
    ) -> Result<(RoundPrivacy, PrivacyState), String> {
        let devices = sum.updates();
        if devices < d.min_devices {
            return Err(format!(
                "{devices} devices' noise is less than the {} the accounting needs",
                d.min_devices
            ));
        }
        let (next, epsilon) = self
            .with_one_more_round_of(devices)
            .map_err(|e| e.to_string())?;
        if epsilon > self.policy.epsilon {
            return Err(format!(
                "the round would take ε to {epsilon:.4}, past the budget ε = {}",
                self.policy.epsilon
            ));
        }
        sum.set_denominator(f64::from(self.cohort));
        let entry = RoundPrivacy {
            mechanism: DISTRIBUTED_MECHANISM.into(),
            clip: self.state.clip,
            next_clip: None,
            noise_multiplier: d.noise.noise_multiplier(devices),
            cohort: self.cohort,
            sampling_rate: self.sampling_rate,
            epsilon,
            delta: self.policy.delta,
        };
        Ok((
            entry,
            PrivacyState {
                accountant: next,
                clip: self.state.clip,
            },
        ))
    }

    /// The next round's clip bound: this one's without adaptive clipping; with it, moved by
    /// the noised share of unclipped updates toward the target quantile.
    fn next_clip<R: Rng + ?Sized>(&self, unclipped: f64, rng: &mut R) -> f64 {
        let p = &self.policy;
        let Some(target) = p.target_quantile else {
            return self.state.clip;
        };
        use rand_distr::{Distribution, StandardNormal};
        let noise: f64 = StandardNormal.sample(rng);
        let share = (unclipped + p.count_noise(self.cohort) * noise) / f64::from(self.cohort);
        let next = self.state.clip * (-p.clip_learning_rate * (share - target)).exp();
        // A bound of 0 or infinity would end learning or privacy's meaning; the geometric
        // update cannot reach either in finitely many rounds, but noise can overflow it.
        if next.is_finite() && next > 0.0 {
            next
        } else {
            self.state.clip
        }
    }

    /// Makes a released round's state the task's (its version is stored).
    pub fn adopt(&mut self, state: PrivacyState) {
        self.state = state;
    }

    /// A state's stored form.
    pub fn state_of(state: &PrivacyState) -> Vec<u8> {
        serde_json::to_vec(state).expect("the privacy state is numbers")
    }
}
