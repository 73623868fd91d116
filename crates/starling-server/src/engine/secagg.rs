//! Secure aggregation's round (`[tasks.secure_aggregation]`): the core's SecAgg+
//! [`Aggregator`] driven through four steps on the engine's clock, each closing at its goal or
//! its deadline:
//!
//! ```text
//!  Advertise ──▶ Share ──▶ MaskedInput ──▶ Unmask ──▶ Commit (decoded sum) | Abandon
//!  check-ins,    encrypted   masked inputs,   survivors'
//!  public keys   shares      folded at once   shares
//! ```
//!
//! A device is known by its assignment's token (and, in an enrolled task, by its credential,
//! which must be the one the assignment was handed to) and has the index it was given at
//! check-in. Every message is checked before it touches the round (step, membership,
//! duplicate, length, neighbours), so a refused one leaves the round as it was. A masked
//! input is added into the aggregator's running sum in the call that carries it and dropped;
//! nothing else of it is kept. A step that ends with fewer than `max(rounds.min,
//! min_cohort)` devices, or a secret that cannot be rebuilt, abandons the round and the model
//! stays.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;
use starling_core::secagg::encode::FixedPoint;
use starling_core::secagg::input::{input_len, InputSpec};
use starling_core::secagg::protocol::{
    AdvertiseKeys, Aggregator, Envelope, Params, SecAggError, Unmasking,
};
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::RoundKind;
use starling_core::WeightedSum;

use super::round::{AbandonReason, NoRoom, RoundSummary};
use super::{EngineError, RoundInfo};
use crate::settings::{RoundPolicy, SecureAggregationPolicy};

/// The step a secure round is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Devices check in and send their public keys.
    Advertise,
    /// Devices fetch their neighbours' keys and send encrypted shares.
    Share,
    /// Devices fetch the shares sent to them and send their masked inputs.
    MaskedInput,
    /// Survivors fetch the survivor list and send their unmasking shares.
    Unmask,
}

impl Step {
    /// The step's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Advertise => "advertise_keys",
            Step::Share => "share_keys",
            Step::MaskedInput => "masked_input",
            Step::Unmask => "unmask",
        }
    }
}

/// What the engine gives a device that joins a secure round.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureSeat {
    /// The device's index.
    pub index: usize,
    /// The round's public parameters.
    pub params: Params,
    /// How inputs are scaled.
    pub spec: InputSpec,
}

/// A device's message or question for one step of a secure round.
#[derive(Debug, Clone)]
pub enum SecureRequest {
    /// Step 1: its public keys.
    AdvertiseKeys(AdvertiseKeys),
    /// Before step 2: its neighbours' keys.
    GetKeys,
    /// Step 2: its encrypted shares, one per neighbour that advertised.
    ShareKeys(Vec<Envelope>),
    /// Before step 3: the envelopes addressed to it.
    GetEnvelopes,
    /// Step 3: its masked input (ring elements).
    MaskedInput(Vec<u32>),
    /// Before step 4: the survivors.
    GetSurvivors,
    /// Step 4: its unmasking shares (its `from` is set by the engine from the assignment).
    Unmask(Unmasking),
}

/// The engine's answer to a [`SecureRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum SecureAnswer {
    /// The message is taken.
    Accepted,
    /// What was asked for is not ready: the round is still in `step`; ask again after.
    Wait {
        /// The step the round is in.
        step: Step,
        /// When to ask again.
        after: Duration,
    },
    /// The neighbours' keys, by index.
    Keys(BTreeMap<usize, AdvertiseKeys>),
    /// The envelopes addressed to the device.
    Envelopes(Vec<Envelope>),
    /// The survivors' indices.
    Survivors(BTreeSet<usize>),
}

/// One device's place and progress in the round.
#[derive(Debug)]
struct Member {
    index: usize,
    device: Option<String>,
    advertised: bool,
    shared: bool,
    masked: bool,
    unmasked: bool,
}

/// How a step ended.
// Made once per step change and consumed at once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Advance {
    /// The round goes on (in the same or the next step).
    Continue(SecureRound),
    /// The round is over: abandoned with a reason.
    Abandon(RoundSummary, AbandonReason),
    /// The unmask step closed: rebuild the secrets and decode the sum
    /// ([`Unmasked::finish`], off the actor).
    Unmasked(RoundSummary, Unmasked),
}

/// The last step's state, handed off to be finished off the async reactor.
#[derive(Debug)]
pub struct Unmasked {
    aggregator: Aggregator,
    fixed_point: FixedPoint,
    spec: InputSpec,
    layout: Layout,
}

impl Unmasked {
    /// Rebuilds the secrets, removes the masks and decodes the sum into the round's
    /// aggregate; `Err` with the reason when a secret has too few shares or the sum carries
    /// no weight.
    pub fn finish(self) -> Result<WeightedSum, AbandonReason> {
        let (sum, survivors) = self.aggregator.finish().map_err(|e| {
            tracing::warn!("secure round cannot be unmasked: {e}");
            AbandonReason::UnmaskFailed
        })?;
        self.spec
            .decode_sum(&self.fixed_point, &sum, &self.layout, survivors)
            .map_err(|_| AbandonReason::UnmaskFailed)
    }
}

/// A secure round in whichever step it is.
#[derive(Debug)]
pub struct SecureRound {
    number: u64,
    base_version: u64,
    started_at_ms: i64,
    step: Step,
    deadline: Duration,
    deadline_ms: i64,
    policy: SecureAggregationPolicy,
    rounds: RoundPolicy,
    places: usize,
    min_survivors: usize,
    max_per_address: u32,
    params: Params,
    spec: InputSpec,
    layout: Layout,
    members: HashMap<String, Member>,
    devices: HashSet<String>,
    per_address: HashMap<IpAddr, u32>,
    advertised: usize,
    shared: usize,
    masked: usize,
    unmasked: usize,
    aggregator: Aggregator,
}

/// What a secure round needs from its task.
#[derive(Debug, Clone)]
pub struct SecureSetup {
    /// The task's secure-aggregation settings.
    pub policy: SecureAggregationPolicy,
    /// The round policy (goal, min, overcommit).
    pub rounds: RoundPolicy,
    /// The task's minimum cohort.
    pub min_cohort: u32,
    /// Assignments per client address.
    pub max_per_address: u32,
    /// How inputs are scaled.
    pub spec: InputSpec,
    /// The model's layout.
    pub layout: Layout,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

impl SecureRound {
    /// Opens round `number` on `base_version` in its advertise step, with a fresh public
    /// graph seed.
    pub fn open(
        setup: &SecureSetup,
        number: u64,
        base_version: u64,
        now: Duration,
        now_ms: i64,
    ) -> Self {
        let places = SecureAggregationPolicy::places(&setup.rounds);
        let mut fixed_point = FixedPoint::new(setup.policy.input_bits, places)
            .expect("settings validation checked the ring");
        if let Some(mu) = setup.spec.noise_mu {
            fixed_point = fixed_point
                .with_noise(places, mu)
                .expect("settings validation checked the ring's room for noise");
        }
        let min_survivors = setup.rounds.min.max(setup.min_cohort) as usize;
        let mut graph_seed = [0u8; 32];
        rand::rng().fill_bytes(&mut graph_seed);
        let params = Params::new(
            number,
            places,
            min_survivors,
            fixed_point,
            input_len(setup.layout.numel()),
            graph_seed,
        );
        let period = secs(setup.policy.advertise_secs);
        Self {
            number,
            base_version,
            started_at_ms: now_ms,
            step: Step::Advertise,
            deadline: now + period,
            deadline_ms: now_ms + period.as_millis() as i64,
            policy: setup.policy.clone(),
            rounds: setup.rounds.clone(),
            places,
            min_survivors,
            max_per_address: setup.max_per_address,
            params,
            spec: setup.spec,
            layout: setup.layout.clone(),
            members: HashMap::new(),
            devices: HashSet::new(),
            per_address: HashMap::new(),
            advertised: 0,
            shared: 0,
            masked: 0,
            unmasked: 0,
            aggregator: Aggregator::new(params),
        }
    }

    /// The round's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The version it trains.
    pub fn base_version(&self) -> u64 {
        self.base_version
    }

    /// The step it is in.
    pub fn step(&self) -> Step {
        self.step
    }

    /// The current step's deadline on the engine's clock.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The latest a device may send its masked input, from `now`: the rest of the advertise
    /// step and the share and masked-input steps' whole time (a device's training budget).
    pub fn time_to_masked_input(&self, now: Duration) -> Duration {
        self.deadline.saturating_sub(now)
            + secs(self.policy.share_secs)
            + secs(self.policy.masked_input_secs)
    }

    /// The round as published: `updates` counts masked inputs in the sum.
    pub fn info(&self) -> RoundInfo {
        RoundInfo {
            round: self.number,
            kind: RoundKind::Training,
            base_version: self.base_version,
            updates: self.masked as u64,
            assigned: self.members.len() as u64,
            goal: self.rounds.goal,
            min: self.rounds.min,
            deadline_ms: self.deadline_ms,
        }
    }

    /// What the round's record needs.
    pub fn summary(&self) -> RoundSummary {
        RoundSummary {
            number: self.number,
            kind: RoundKind::Training,
            base_version: self.base_version,
            started_at_ms: self.started_at_ms,
            updates: self.masked as u64,
        }
    }

    /// A place in the round for `token`, or why there is none: only in the advertise step, at
    /// most one per device id and `max_per_address` per address, `ceil(goal * overcommit)`
    /// in all.
    pub fn assign(
        &mut self,
        token: &str,
        device: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<SecureSeat, NoRoom> {
        if self.step != Step::Advertise || self.advertised >= self.rounds.goal as usize {
            return Err(NoRoom::Closing);
        }
        if device.is_some_and(|d| self.devices.contains(d)) {
            return Err(NoRoom::DeviceHasOne);
        }
        if self.members.len() >= self.places {
            return Err(NoRoom::Full);
        }
        if let Some(a) = address {
            let held = self.per_address.entry(a).or_insert(0);
            if *held >= self.max_per_address {
                return Err(NoRoom::AddressFull);
            }
            *held += 1;
        }
        let index = self.members.len();
        self.members.insert(
            token.to_string(),
            Member {
                index,
                device: device.map(str::to_string),
                advertised: false,
                shared: false,
                masked: false,
                unmasked: false,
            },
        );
        if let Some(d) = device {
            self.devices.insert(d.to_string());
        }
        Ok(SecureSeat {
            index,
            params: self.params,
            spec: self.spec,
        })
    }

    fn wrong_step(&self, hint: &'static str) -> EngineError {
        EngineError::WrongPhase {
            round: self.number,
            phase: self.step.as_str(),
            hint,
        }
    }

    fn wait(&self, now: Duration) -> SecureAnswer {
        let left = self.deadline.saturating_sub(now);
        SecureAnswer::Wait {
            step: self.step,
            after: left.clamp(Duration::from_millis(50), Duration::from_millis(500)),
        }
    }

    /// One device's message or question. Everything is checked before anything changes.
    pub fn handle(
        &mut self,
        token: &str,
        device: Option<&str>,
        request: SecureRequest,
        now: Duration,
    ) -> Result<SecureAnswer, EngineError> {
        let Some(member) = self.members.get(token) else {
            return Err(EngineError::UnknownToken(self.number));
        };
        if let Some(d) = device {
            if member.device.as_deref() != Some(d) {
                return Err(EngineError::NotYourAssignment);
            }
        }
        let index = member.index;
        match request {
            SecureRequest::AdvertiseKeys(keys) => {
                if member.advertised {
                    return Err(EngineError::DuplicateMessage("keys"));
                }
                if self.step != Step::Advertise {
                    return Err(self.wrong_step("keys are taken only in the advertise_keys step"));
                }
                self.aggregator
                    .advertise(index, keys)
                    .map_err(|e| match e {
                        SecAggError::BadKey(_) => EngineError::InvalidKey(
                            "a public key of low order: no device could agree a secret with it"
                                .into(),
                        ),
                        e => EngineError::InvalidShares(e.to_string()),
                    })?;
                self.member(token).advertised = true;
                self.advertised += 1;
                Ok(SecureAnswer::Accepted)
            }
            SecureRequest::GetKeys => {
                if self.step == Step::Advertise {
                    return Ok(self.wait(now));
                }
                if !member.advertised {
                    return Err(EngineError::NotInCohort("it did not advertise keys"));
                }
                Ok(SecureAnswer::Keys(self.aggregator.keys_for(index)))
            }
            SecureRequest::ShareKeys(envelopes) => {
                if member.shared {
                    return Err(EngineError::DuplicateMessage("shares"));
                }
                if self.step != Step::Share {
                    return Err(self.wrong_step("shares are taken only in the share_keys step"));
                }
                if !member.advertised {
                    return Err(EngineError::NotInCohort("it did not advertise keys"));
                }
                if envelopes.iter().any(|e| e.from != index) {
                    return Err(EngineError::InvalidShares(
                        "an envelope names another device as its sender".into(),
                    ));
                }
                self.aggregator
                    .share(index, envelopes)
                    .map_err(|e| EngineError::InvalidShares(e.to_string()))?;
                self.member(token).shared = true;
                self.shared += 1;
                Ok(SecureAnswer::Accepted)
            }
            SecureRequest::GetEnvelopes => {
                if self.step <= Step::Share {
                    return Ok(self.wait(now));
                }
                if !member.shared {
                    return Err(EngineError::NotInCohort("it did not share its keys"));
                }
                Ok(SecureAnswer::Envelopes(
                    self.aggregator.envelopes_for(index),
                ))
            }
            SecureRequest::MaskedInput(y) => {
                if member.masked {
                    return Err(EngineError::DuplicateMessage("masked input"));
                }
                if self.step != Step::MaskedInput {
                    return Err(
                        self.wrong_step("masked inputs are taken only in the masked_input step")
                    );
                }
                if !member.shared {
                    return Err(EngineError::NotInCohort("it did not share its keys"));
                }
                let ring = self.params.fixed_point.ring_mask();
                if y.len() != self.params.len || y.iter().any(|&v| v > ring) {
                    return Err(EngineError::WrongLength {
                        got: y.len(),
                        expected: self.params.len,
                    });
                }
                // Folded into the running sum now; `y` is dropped when this returns.
                self.aggregator
                    .masked_input(index, &y)
                    .map_err(|e| EngineError::InvalidShares(e.to_string()))?;
                self.member(token).masked = true;
                self.masked += 1;
                Ok(SecureAnswer::Accepted)
            }
            SecureRequest::GetSurvivors => {
                if self.step < Step::Unmask {
                    return Ok(self.wait(now));
                }
                if !member.masked {
                    return Err(EngineError::NotInCohort("it did not send its masked input"));
                }
                self.aggregator
                    .survivors()
                    .map(SecureAnswer::Survivors)
                    .map_err(|e| EngineError::InvalidShares(e.to_string()))
            }
            SecureRequest::Unmask(mut u) => {
                if member.unmasked {
                    return Err(EngineError::DuplicateMessage("unmasking"));
                }
                if self.step != Step::Unmask {
                    return Err(self.wrong_step("unmasking is taken only in the unmask step"));
                }
                if !member.masked {
                    return Err(EngineError::NotInCohort("it did not send its masked input"));
                }
                u.from = index;
                self.aggregator
                    .unmask(u)
                    .map_err(|e| EngineError::InvalidShares(e.to_string()))?;
                self.member(token).unmasked = true;
                self.unmasked += 1;
                Ok(SecureAnswer::Accepted)
            }
        }
    }

    fn member(&mut self, token: &str) -> &mut Member {
        self.members.get_mut(token).expect("checked above")
    }

    /// Whether the current step reached its goal.
    fn step_done(&self) -> bool {
        match self.step {
            Step::Advertise => {
                self.advertised >= self.rounds.goal as usize
                    || (self.members.len() >= self.places && self.advertised == self.places)
            }
            Step::Share => self.shared == self.advertised,
            Step::MaskedInput => self.masked == self.shared,
            Step::Unmask => self.unmasked == self.masked,
        }
    }

    /// Moves the round on: the current step closes at its goal, or when its deadline has
    /// passed (`deadline_passed`); a round nobody joined keeps its advertise step open for
    /// another period. Loops, so a step that closes with its next step's goal already met
    /// moves on too.
    pub fn advance(mut self, deadline_passed: bool, now: Duration, now_ms: i64) -> Advance {
        let mut expired = deadline_passed && now >= self.deadline;
        loop {
            if self.step == Step::Advertise && expired && self.members.is_empty() {
                let period = secs(self.policy.advertise_secs);
                self.deadline = now + period;
                self.deadline_ms = now_ms + period.as_millis() as i64;
                return Advance::Continue(self);
            }
            if !(expired || self.step_done()) {
                return Advance::Continue(self);
            }
            let (have, next, secs_next) = match self.step {
                Step::Advertise => (self.advertised, Step::Share, self.policy.share_secs),
                Step::Share => (
                    self.shared,
                    Step::MaskedInput,
                    self.policy.masked_input_secs,
                ),
                Step::MaskedInput => (self.masked, Step::Unmask, self.policy.unmask_secs),
                Step::Unmask => {
                    let summary = self.summary();
                    return Advance::Unmasked(
                        summary,
                        Unmasked {
                            aggregator: self.aggregator,
                            fixed_point: self.params.fixed_point,
                            spec: self.spec,
                            layout: self.layout,
                        },
                    );
                }
            };
            if have < self.min_survivors {
                tracing::info!(
                    round = self.number,
                    step = self.step.as_str(),
                    devices = have,
                    need = self.min_survivors,
                    "secure round abandoned: too few devices completed a step"
                );
                return Advance::Abandon(self.summary(), AbandonReason::TooFewSurvivors);
            }
            self.step = next;
            let period = secs(secs_next);
            self.deadline = now + period;
            self.deadline_ms = now_ms + period.as_millis() as i64;
            expired = false;
        }
    }
}
