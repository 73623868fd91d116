//! `starling simulate --secagg`: synchronous rounds with secure aggregation, through the real
//! engine's four steps (the task has `[tasks.secure_aggregation]`) and the core's SecAgg+
//! `Client` for every virtual device. A device that drops out (`--dropout`) leaves after one
//! of the first three steps, in equal shares (after advertising keys, after sharing them,
//! after sending its masked input), and a straggler too slow for the deadline leaves after
//! sharing; the engine's step deadlines then close the steps on the virtual clock. The engine
//! sees only masked inputs and commits the decoded sum, so the run's numbers are FedAvg's
//! within the quantisation error, and a round whose survivors are too few is abandoned.
//!
//! Every device's secrets and stochastic rounding come from a generator seeded by the run's
//! seed, the round and the device, so a run is a function of its seed (the engine's public
//! graph seed varies, but masks cancel exactly in the ring, so the decoded sum does not).

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;
use starling_core::secagg::encode::FixedPoint;
use starling_core::secagg::protocol::Client;
use starling_core::trainer::train::local_update;
use starling_core::wire::update;
use starling_server::engine::secagg::{SecureAnswer, SecureRequest, SecureSeat};
use starling_server::engine::{CheckIn, Clock, EngineError, TaskHandle};
use starling_server::settings::{SecureAggregationPolicy, TaskDefinition};
use starling_server::store::RoundStatus;

use crate::report::RoundMetrics;
use crate::sim::{draw_round, latency_seed, mix, reached, Fate, RoundDraw, Setup, SimConfig};
use crate::{Federation, SimError};

/// `--secagg`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SimSecAgg {
    /// Bits per value of one device's input.
    pub input_bits: u32,
    /// The L2 bound devices clip their updates to.
    pub clip: f64,
}

impl Default for SimSecAgg {
    fn default() -> Self {
        Self {
            input_bits: 20,
            clip: 10.0,
        }
    }
}

/// Virtual seconds of each step after the advertise step (which lasts the round deadline).
const STEP_SECS: f64 = 10.0;

/// Gives the simulation's task secure aggregation when `config.secagg` asks for it: the
/// weight cap is the largest device's example count (weights in (0, 1]), and combinations the
/// engine refuses are refused here with the same reasons.
pub(crate) fn configure(
    mut def: TaskDefinition,
    config: &SimConfig,
    federation: &Federation,
    k: usize,
) -> Result<TaskDefinition, SimError> {
    let Some(s) = config.secagg else {
        return Ok(def);
    };
    if config.buffered.is_some() {
        return Err(SimError::Config(
            "--secagg needs synchronous rounds, not --buffer: each cohort goes through four \
             steps together"
                .into(),
        ));
    }
    if config.privacy.is_some_and(|p| p.target_quantile.is_some()) {
        return Err(SimError::Config(
            "--secagg with --dp-target-quantile: adaptive clipping counts clipped updates on \
             the server, which cannot see them under secure aggregation"
                .into(),
        ));
    }
    if k < 2 {
        return Err(SimError::Config(
            "--secagg needs at least 2 devices a round: the sum of one input is that input".into(),
        ));
    }
    FixedPoint::new(s.input_bits, k).map_err(|e| SimError::Config(format!("--secagg: {e}")))?;
    if !(s.clip.is_finite() && s.clip > 0.0) {
        return Err(SimError::Config("--secagg-clip must be positive".into()));
    }
    def.max_examples_per_update = federation
        .devices
        .iter()
        .map(|d| d.len() as u64)
        .max()
        .unwrap_or(1)
        .max(1);
    // A round of fewer than 2 survivors would reveal an input. With distributed DP the
    // devices' noise is calibrated so that the fewest survivors a round commits with reach
    // the noise multiplier: a round needs 80% of the devices expected to survive the
    // drop-outs, so that the noise is not calibrated for a handful.
    def.rounds.min = def.rounds.min.max(2);
    if def.privacy.is_some() {
        let expected = k as f64 * (1.0 - config.dropout);
        def.rounds.min = def.rounds.min.max((0.8 * expected).floor() as u32);
    }
    def.min_cohort = def.rounds.min;
    def.secure_aggregation = Some(SecureAggregationPolicy {
        input_bits: s.input_bits,
        // With differential privacy (distributed: the devices add Skellam noise) the devices
        // clip to the privacy clip, which the noise is calibrated to.
        clip: config.privacy.map_or(s.clip, |p| p.clip),
        loss_bound: 100.0,
        advertise_secs: def.rounds.deadline_secs,
        share_secs: STEP_SECS,
        masked_input_secs: STEP_SECS,
        unmask_secs: STEP_SECS,
    });
    if let (Some(sa), Some(p)) = (&def.secure_aggregation, &def.privacy) {
        let noise = sa.distributed_noise(p, &def.rounds, def.min_cohort, def.spec.layout().numel());
        FixedPoint::new(s.input_bits, k)
            .and_then(|f| f.with_noise(k, noise.mu))
            .map_err(|e| {
                SimError::Config(format!(
                    "--secagg-bits {} leave no room in the ring for the devices' noise: {e}",
                    s.input_bits
                ))
            })?;
    }
    Ok(def)
}

/// When a device leaves a secure round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaves {
    AfterKeys,
    AfterShares,
    AfterMasked,
    Never,
}

/// Asks the engine until the step is ready; `None` once the round has closed (abandoned).
async fn ask(
    task: &TaskHandle,
    round: u64,
    token: &str,
    request: SecureRequest,
) -> Result<Option<SecureAnswer>, SimError> {
    loop {
        match task.secure(round, token, None, request.clone()).await {
            Ok(SecureAnswer::Wait { .. }) => tokio::task::yield_now().await,
            Ok(a) => return Ok(Some(a)),
            Err(EngineError::RoundClosed(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

fn protocol(e: impl std::fmt::Display) -> SimError {
    SimError::Config(format!("secure aggregation: {e}"))
}

/// One sampled device in a secure round.
struct Member {
    device: usize,
    token: String,
    seat: SecureSeat,
    client: Client,
    rng: rand::rngs::StdRng,
    leaves: Leaves,
    /// Its encoded update (before masking), for those that send one.
    input: Option<Vec<u32>>,
}

/// Synchronous secure rounds of `k` sampled devices each.
pub(crate) async fn run(
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
    let mut virtual_secs = 0.0;
    let mut rounds = Vec::new();
    let mut status_rx = task.subscribe();
    for i in 1..=config.rounds {
        let status = task.status();
        let round = status.round.round;
        let base_version = status.model.version;
        // A task whose privacy budget is spent stops the simulation (the report says why).
        let Some(RoundDraw {
            base,
            sampled,
            fates,
            answers,
            mut rng,
        }) = draw_round(task, config, &status, n, k).await?
        else {
            break;
        };
        let layout = base.layout();
        let round_start = clock.now();
        let mut members = Vec::with_capacity(k);
        for ((&d, answer), &fate) in sampled.iter().zip(answers).zip(&fates) {
            let CheckIn::Assigned(a) = answer else {
                return Err(SimError::Config(format!("device {d} was not assigned")));
            };
            let seat = a
                .secure
                .ok_or_else(|| protocol("the round is not secure"))?;
            let t = config.train_secs(
                federation.devices[d].len(),
                fate == Fate::Straggler,
                latency_seed(config.seed, round, d),
            );
            let leaves = match fate {
                Fate::Dropped => match rng.random_range(0..3) {
                    0 => Leaves::AfterKeys,
                    1 => Leaves::AfterShares,
                    _ => Leaves::AfterMasked,
                },
                _ if t > deadline => Leaves::AfterShares,
                _ => Leaves::Never,
            };
            let mut device_rng =
                rand::rngs::StdRng::seed_from_u64(mix(config.seed ^ 0x5345_4341_4747, round, d));
            let (client, _) = Client::new(seat.index, seat.params, &mut device_rng);
            members.push(Member {
                device: d,
                token: a.token,
                seat,
                client,
                rng: device_rng,
                leaves,
                input: None,
            });
        }
        // Train (on the pool) the devices that will send a masked input, and encode each
        // update into the ring on the device's own generator.
        let jobs: Vec<(usize, usize)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.leaves, Leaves::Never | Leaves::AfterMasked))
            .map(|(j, m)| (j, m.device))
            .collect();
        let (pool2, model2, base2) = (pool.clone(), model.clone(), base.clone());
        let (plan, seed, devices) = (config.plan.clone(), config.seed, federation.devices.clone());
        let trained: Vec<Result<(usize, Vec<u8>), SimError>> =
            tokio::task::spawn_blocking(move || {
                pool2.install(|| {
                    jobs.into_par_iter()
                        .map(|(j, d)| {
                            let mut plan = plan.clone();
                            plan.seed = mix(seed, round, d);
                            let (body, _) = local_update(
                                &model2,
                                &base2,
                                &devices[d],
                                &plan,
                                base_version,
                                String::new(),
                                |_| {},
                            )?;
                            Ok((j, body))
                        })
                        .collect()
                })
            })
            .await
            .map_err(|e| SimError::Config(format!("training thread: {e}")))?;
        let mut bytes_up = 0u64;
        for r in trained {
            let (j, body) = r?;
            let m = &mut members[j];
            let view = update::decode(&body, &layout, None).map_err(protocol)?;
            let fp = m.seat.params.fixed_point;
            m.input = Some(m.seat.spec.encode_update(&fp, &view, &mut m.rng));
        }
        // Step 1: every sampled device advertises keys (the step closes at its goal).
        for m in &mut members {
            let (client, keys) = Client::new(m.seat.index, m.seat.params, &mut m.rng);
            m.client = client;
            bytes_up += 64;
            task.secure(round, &m.token, None, SecureRequest::AdvertiseKeys(keys))
                .await?;
        }
        let advance_if = |leavers: bool, secs: f64| {
            if leavers {
                clock.advance(Duration::from_secs_f64(secs + 1e-3));
            }
        };
        let mut closed = false;
        // Step 2: shares.
        for m in members.iter_mut().filter(|m| m.leaves != Leaves::AfterKeys) {
            let Some(SecureAnswer::Keys(keys)) =
                ask(task, round, &m.token, SecureRequest::GetKeys).await?
            else {
                closed = true;
                break;
            };
            match m.client.share_keys(&keys, &mut m.rng) {
                Ok(envelopes) => {
                    bytes_up += envelopes
                        .iter()
                        .map(|e| e.ciphertext.len() as u64)
                        .sum::<u64>();
                    task.secure(round, &m.token, None, SecureRequest::ShareKeys(envelopes))
                        .await?;
                }
                // Too few of its neighbours advertised: this device cannot take part.
                Err(_) => m.leaves = Leaves::AfterKeys,
            }
        }
        advance_if(
            !closed && members.iter().any(|m| m.leaves == Leaves::AfterKeys),
            STEP_SECS,
        );
        // Step 3: masked inputs.
        let mut reported = 0;
        if !closed {
            for m in members
                .iter_mut()
                .filter(|m| matches!(m.leaves, Leaves::Never | Leaves::AfterMasked))
            {
                let Some(SecureAnswer::Envelopes(envelopes)) =
                    ask(task, round, &m.token, SecureRequest::GetEnvelopes).await?
                else {
                    closed = true;
                    break;
                };
                let x = m.input.take().expect("trained above");
                let y = m.client.masked_input(&envelopes, &x).map_err(protocol)?;
                bytes_up += 4 * y.len() as u64;
                task.secure(round, &m.token, None, SecureRequest::MaskedInput(y))
                    .await?;
                reported += 1;
            }
        }
        advance_if(
            !closed && members.iter().any(|m| m.leaves == Leaves::AfterShares),
            STEP_SECS,
        );
        // Step 4: unmasking.
        if !closed {
            for m in members.iter().filter(|m| m.leaves == Leaves::Never) {
                let Some(SecureAnswer::Survivors(survivors)) =
                    ask(task, round, &m.token, SecureRequest::GetSurvivors).await?
                else {
                    closed = true;
                    break;
                };
                let u = m.client.unmask(&survivors).map_err(protocol)?;
                task.secure(round, &m.token, None, SecureRequest::Unmask(u))
                    .await?;
            }
        }
        advance_if(
            !closed && members.iter().any(|m| m.leaves == Leaves::AfterMasked),
            STEP_SECS,
        );
        let st = status_rx
            .wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round == round))
            .await
            .map_err(|_| SimError::Config("the round engine stopped".into()))?
            .clone();
        virtual_secs += (clock.now() - round_start).as_secs_f64();
        let record = st.last_round.expect("waited for it");
        let eval = if Setup::evaluates(config, i, config.rounds) {
            Some(
                setup
                    .evaluate(st.model.params.clone(), &federation.test)
                    .await?,
            )
        } else {
            None
        };
        let m = RoundMetrics {
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
            test_loss: eval.as_ref().map(|e| e.loss),
            test_accuracy: eval.and_then(|e| e.accuracy),
            bytes_up,
            bytes_down: (status.model.body.len() * k) as u64,
            virtual_secs,
            wall_secs: started.elapsed().as_secs_f64(),
        };
        on_round(&m);
        let done = reached(config, &m);
        rounds.push(m);
        if done {
            break;
        }
    }
    Ok(rounds)
}
