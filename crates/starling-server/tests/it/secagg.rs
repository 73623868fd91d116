//! Secure aggregation in the round engine (`[tasks.secure_aggregation]`), through the task's
//! handle on a virtual clock: whole rounds of devices running the core's SecAgg+ `Client`
//! against the engine's four steps, with devices dropping out after advertising keys, after
//! sharing and after sending masked inputs. The committed model is plain FedAvg's within the
//! quantisation error; below the threshold the round is abandoned and the model stays; what
//! the server receives of any one device is indistinguishable from uniform words of the ring;
//! and every misuse is refused with a stable code, leaving the round as it was.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use starling_core::secagg::encode::FixedPoint;
use starling_core::secagg::input::InputSpec;
use starling_core::secagg::protocol::{AdvertiseKeys, Client, Envelope, Params};
use starling_core::wire::protocol::ErrorCode;
use starling_core::Parameters;
use starling_server::engine::round::AbandonReason;
use starling_server::engine::secagg::{SecureAnswer, SecureRequest, SecureSeat, Step};
use starling_server::engine::{Caller, CheckIn, EngineError, TaskHandle, VirtualClock};
use starling_server::settings::{
    PrivacyPolicy, RoundPolicy, SecureAggregationPolicy, TaskSettings,
};
use starling_server::store::{RoundRecord, RoundStatus};

use crate::harness::{spawn_clocked, spawn_on, STUCK};

const INPUTS: usize = 64;
const OUTPUTS: usize = 4;
const CAP: u64 = 100;

fn policy() -> SecureAggregationPolicy {
    SecureAggregationPolicy {
        input_bits: 16,
        clip: 1.0,
        loss_bound: 10.0,
        advertise_secs: 60.0,
        share_secs: 30.0,
        masked_input_secs: 60.0,
        unmask_secs: 30.0,
    }
}

/// A softmax regression of 64 inputs and 4 classes (260 parameters), in secure rounds of
/// `n` devices that need `min`.
fn task(n: u32, min: u32) -> TaskSettings {
    TaskSettings {
        model: "logistic".into(),
        inputs: INPUTS,
        outputs: OUTPUTS,
        rounds: RoundPolicy {
            goal: n,
            min,
            deadline_secs: 600.0,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        min_cohort: min,
        max_examples_per_update: CAP,
        secure_aggregation: Some(policy()),
        ..TaskSettings::default()
    }
}

/// One simulated device's local result.
#[derive(Clone)]
struct Local {
    delta: Vec<f32>,
    examples: u64,
    loss: f32,
    accuracy: f32,
}

fn locals(n: usize, numel: usize, seed: u64) -> Vec<Local> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| Local {
            delta: (0..numel).map(|_| rng.random_range(-0.05..0.05)).collect(),
            examples: rng.random_range(20..=150),
            loss: rng.random_range(0.1..3.0),
            accuracy: rng.random_range(0.0..1.0),
        })
        .collect()
}

/// Who leaves after which step (by position in the cohort).
#[derive(Default, Clone)]
struct Fates {
    after_keys: BTreeSet<usize>,
    after_shares: BTreeSet<usize>,
    after_masked: BTreeSet<usize>,
    /// Survivors that never send their unmasking (beyond those that left).
    silent_in_unmask: BTreeSet<usize>,
}

/// A device of the test: its assignment and its core `Client`.
struct Device {
    token: String,
    seat: SecureSeat,
    client: Client,
}

/// What the server received in a round, for inspection.
#[derive(Default)]
struct Received {
    masked: Vec<Vec<u32>>,
    /// The same devices' inputs before masking (never sent: the reference).
    plain: Vec<Vec<u32>>,
    fixed_point: Option<FixedPoint>,
}

async fn ask(task: &TaskHandle, round: u64, token: &str, request: SecureRequest) -> SecureAnswer {
    try_ask(task, round, token, request)
        .await
        .expect("the round closed")
}

/// Asks until the step is ready; `None` once the round has closed (abandoned).
async fn try_ask(
    task: &TaskHandle,
    round: u64,
    token: &str,
    request: SecureRequest,
) -> Option<SecureAnswer> {
    tokio::time::timeout(STUCK, async {
        loop {
            match task.secure(round, token, None, request.clone()).await {
                Ok(SecureAnswer::Wait { .. }) => tokio::task::yield_now().await,
                Ok(a) => return Some(a),
                Err(EngineError::RoundClosed(_)) => return None,
                Err(e) => panic!("{request:?}: {e}"),
            }
        }
    })
    .await
    .expect("the step never closed: the engine is stuck")
}

async fn check_in(task: &TaskHandle, n: usize, seed: u64) -> (u64, Vec<Device>) {
    let answers = task
        .check_in_many((0..n).map(|i| Caller::device(format!("d{i}"))).collect())
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut round = 0;
    let devices = answers
        .into_iter()
        .map(|a| match a {
            CheckIn::Assigned(a) => {
                round = a.round;
                let seat = a.secure.expect("a secure round's assignment has a seat");
                let (client, _) = Client::new(seat.index, seat.params, &mut rng);
                Device {
                    token: a.token,
                    seat,
                    client,
                }
            }
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect();
    (round, devices)
}

/// One whole secure round: every device advertises, then devices leave as `fates` say; the
/// clock is moved past a step's deadline only when someone left in it. Returns the round's
/// record and what the server received.
async fn secure_round(
    task: &TaskHandle,
    clock: &VirtualClock,
    locals: &[Local],
    fates: &Fates,
    seed: u64,
) -> (RoundRecord, Received) {
    let p = policy();
    let (round, mut devices) = check_in(task, locals.len(), seed).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 1);
    // Step 1: keys (the engine's seats and the keys the device's own Client drew).
    for d in &mut devices {
        let (client, keys) = Client::new(d.seat.index, d.seat.params, &mut rng);
        d.client = client;
        let a = task
            .secure(round, &d.token, None, SecureRequest::AdvertiseKeys(keys))
            .await
            .unwrap();
        assert_eq!(a, SecureAnswer::Accepted);
    }
    let alive = |set: &BTreeSet<usize>, i: usize| !set.contains(&i);
    // Step 2: shares.
    for (i, d) in devices.iter_mut().enumerate() {
        if !alive(&fates.after_keys, i) {
            continue;
        }
        let Some(SecureAnswer::Keys(keys)) =
            try_ask(task, round, &d.token, SecureRequest::GetKeys).await
        else {
            return (wait_round(task, round).await, Received::default());
        };
        let envelopes = d.client.share_keys(&keys, &mut rng).unwrap();
        task.secure(round, &d.token, None, SecureRequest::ShareKeys(envelopes))
            .await
            .unwrap();
    }
    if !fates.after_keys.is_empty() {
        clock.advance(Duration::from_secs_f64(p.share_secs + 1.0));
    }
    // Step 3: masked inputs.
    let mut received = Received::default();
    for (i, d) in devices.iter_mut().enumerate() {
        if !alive(&fates.after_keys, i) || !alive(&fates.after_shares, i) {
            continue;
        }
        let Some(SecureAnswer::Envelopes(envelopes)) =
            try_ask(task, round, &d.token, SecureRequest::GetEnvelopes).await
        else {
            return (wait_round(task, round).await, received);
        };
        let l = &locals[i];
        let fp = d.seat.params.fixed_point;
        let x = d.seat.spec.encode(
            &fp,
            &l.delta,
            l.examples,
            Some(l.loss),
            Some(l.accuracy),
            &mut rng,
        );
        let y = d.client.masked_input(&envelopes, &x).unwrap();
        received.masked.push(y.clone());
        received.plain.push(x);
        received.fixed_point = Some(fp);
        task.secure(round, &d.token, None, SecureRequest::MaskedInput(y))
            .await
            .unwrap();
    }
    if !fates.after_shares.is_empty() {
        clock.advance(Duration::from_secs_f64(p.masked_input_secs + 1.0));
    }
    // Step 4: unmasking.
    let mut silent = false;
    for (i, d) in devices.iter().enumerate() {
        if [&fates.after_keys, &fates.after_shares, &fates.after_masked]
            .iter()
            .any(|s| s.contains(&i))
        {
            continue;
        }
        if fates.silent_in_unmask.contains(&i) {
            silent = true;
            continue;
        }
        let Some(SecureAnswer::Survivors(survivors)) =
            try_ask(task, round, &d.token, SecureRequest::GetSurvivors).await
        else {
            return (wait_round(task, round).await, received);
        };
        let u = d.client.unmask(&survivors).unwrap();
        task.secure(round, &d.token, None, SecureRequest::Unmask(u))
            .await
            .unwrap();
    }
    if !fates.after_masked.is_empty() || silent {
        clock.advance(Duration::from_secs_f64(p.unmask_secs + 1.0));
    }
    (wait_round(task, round).await, received)
}

/// Abandoned rounds need the clock moved past every step that waits for leavers.
async fn wait_round(task: &TaskHandle, round: u64) -> RoundRecord {
    let mut rx = task.subscribe();
    let status = tokio::time::timeout(
        STUCK,
        rx.wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round == round)),
    )
    .await
    .unwrap_or_else(|_| panic!("round {round} never closed: the engine is stuck"))
    .unwrap()
    .clone();
    status.last_round.unwrap()
}

/// Plain FedAvg of the devices in `who`: base + Σ wᵢδᵢ / Σ wᵢ, wᵢ the capped example count.
fn fedavg(base: &Parameters, locals: &[Local], who: &[usize]) -> Vec<f64> {
    let numel: usize = base.iter().map(|(_, t)| t.data().len()).sum();
    let mut sum = vec![0.0f64; numel];
    let mut weight = 0.0;
    for &i in who {
        let w = locals[i].examples.min(CAP) as f64;
        weight += w;
        for (s, d) in sum.iter_mut().zip(&locals[i].delta) {
            *s += w * f64::from(*d);
        }
    }
    let flat: Vec<f64> = base
        .iter()
        .flat_map(|(_, t)| t.data().iter().map(|&v| f64::from(v)))
        .collect();
    flat.iter().zip(&sum).map(|(b, s)| b + s / weight).collect()
}

fn flat(p: &Parameters) -> Vec<f64> {
    p.iter()
        .flat_map(|(_, t)| t.data().iter().map(|&v| f64::from(v)))
        .collect()
}

/// The bound on the decoded mean's error: each survivor's values and weight are within one
/// level (1/L) of exact, so with S the scaled sum and W the summed weight,
/// |S'/W' - S/W| <= (n/L)(1 + max|S/W|) / (W - n/L), times the clip; plus f32 rounding.
fn quantisation_bound(locals: &[Local], who: &[usize], levels: f64, clip: f64) -> f64 {
    let n = who.len() as f64;
    let w: f64 = who
        .iter()
        .map(|&i| locals[i].examples.min(CAP) as f64 / CAP as f64)
        .sum();
    let max_mean = 0.05 / clip;
    clip * (n / levels) * (1.0 + max_mean) / (w - n / levels) + 1e-6
}

fn spread(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<usize> = (0..n).collect();
    ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    ids.truncate((n as f64 * fraction).round() as usize);
    ids
}

/// Must-show 1: with 0%, 10% and 30% of the devices leaving after advertising keys, after
/// sharing, or after sending masked inputs, every round commits the model plain FedAvg of
/// the survivors makes, within the quantisation error; the record carries the aggregate's
/// statistics only.
#[tokio::test]
async fn secure_rounds_commit_plain_fedavg_within_quantisation_under_dropouts() {
    const N: usize = 20;
    let (task, clock) = spawn_clocked(task(N as u32, 8)).await;
    let mut seed = 10;
    let mut scenarios: Vec<(&str, f64)> = vec![("none", 0.0)];
    for f in [0.1, 0.3] {
        for when in ["after_keys", "after_shares", "after_masked"] {
            scenarios.push((when, f));
        }
    }
    for (when, fraction) in scenarios {
        seed += 1;
        let base = task.status().model.params.clone();
        let numel: usize = base.iter().map(|(_, t)| t.data().len()).sum();
        let locals = locals(N, numel, seed);
        let leavers: BTreeSet<usize> = spread(N, fraction, seed).into_iter().collect();
        let mut fates = Fates::default();
        match when {
            "after_keys" => fates.after_keys = leavers.clone(),
            "after_shares" => fates.after_shares = leavers.clone(),
            "after_masked" => fates.after_masked = leavers.clone(),
            _ => {}
        }
        let (record, received) = secure_round(&task, &clock, &locals, &fates, seed).await;
        assert_eq!(
            record.status,
            RoundStatus::Committed,
            "{when} {fraction}: {:?}",
            record.reason
        );
        // Who is in the sum: those that sent a masked input.
        let survivors: Vec<usize> = (0..N)
            .filter(|i| !fates.after_keys.contains(i) && !fates.after_shares.contains(i))
            .collect();
        assert_eq!(record.participants, survivors.len() as u64);
        let fp = received.fixed_point.unwrap();
        let expected = fedavg(&base, &locals, &survivors);
        let got = flat(&task.status().model.params);
        let bound = quantisation_bound(&locals, &survivors, fp.levels(), policy().clip);
        let worst = expected
            .iter()
            .zip(&got)
            .map(|(e, g)| (e - g).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= bound,
            "{when} {fraction}: off by {worst}, bound {bound}"
        );
        // The aggregate's statistics: weighted mean loss and accuracy of the survivors.
        let w: f64 = survivors
            .iter()
            .map(|&i| locals[i].examples.min(CAP) as f64)
            .sum();
        let loss: f64 = survivors
            .iter()
            .map(|&i| locals[i].examples.min(CAP) as f64 * f64::from(locals[i].loss))
            .sum::<f64>()
            / w;
        let mean_loss = record.mean_loss.unwrap();
        assert!((mean_loss - loss).abs() < 1e-2, "{mean_loss} vs {loss}");
        assert!(record.mean_accuracy.is_some());
        assert!((record.examples as f64 - w).abs() <= 1.0 + N as f64 * CAP as f64 / fp.levels());
    }
}

/// Must-show 1, below the threshold: too few devices left after sharing (the masked-input
/// step closes with fewer than `rounds.min`), or too few survivors sent their shares to
/// rebuild the secrets: the round is abandoned with its reason and the model stays.
#[tokio::test]
async fn below_the_threshold_the_round_is_abandoned_and_the_model_stays() {
    const N: usize = 20;
    let (task, clock) = spawn_clocked(task(N as u32, 8)).await;
    let before = task.status().model.clone();
    let numel: usize = before.params.iter().map(|(_, t)| t.data().len()).sum();
    let locals = locals(N, numel, 1);
    // 13 of 20 leave after sharing: 7 masked inputs, below the minimum of 8.
    let fates = Fates {
        after_shares: (0..13).collect(),
        ..Fates::default()
    };
    let (record, _) = secure_round(&task, &clock, &locals, &fates, 1).await;
    assert_eq!(record.status, RoundStatus::Abandoned);
    assert_eq!(record.reason, Some(AbandonReason::TooFewSurvivors));
    assert_eq!(record.mean_loss, None);
    assert_eq!(task.status().model.version, before.version);
    assert_eq!(task.status().model.body, before.body);

    // All 20 send masked inputs but only 3 send their shares: with a threshold of 7 shares
    // per secret, no self mask can be removed.
    let fates = Fates {
        silent_in_unmask: (3..N).collect(),
        ..Fates::default()
    };
    let (record, _) = secure_round(&task, &clock, &locals, &fates, 2).await;
    assert_eq!(record.status, RoundStatus::Abandoned);
    assert_eq!(record.reason, Some(AbandonReason::UnmaskFailed));
    assert_eq!(task.status().model.body, before.body);

    // Too few devices advertise keys at all: abandoned at the advertise deadline.
    let (round, devices) = check_in(&task, 5, 3).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for d in &devices {
        let (_, keys) = Client::new(d.seat.index, d.seat.params, &mut rng);
        task.secure(round, &d.token, None, SecureRequest::AdvertiseKeys(keys))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs_f64(policy().advertise_secs + 1.0));
    let record = wait_round(&task, round).await;
    assert_eq!(record.reason, Some(AbandonReason::TooFewSurvivors));
    assert_eq!(task.status().model.body, before.body);
}

/// Pearson's chi-square statistic of the top 4 bits of `words` (of a `bits`-bit ring)
/// against the uniform distribution on 16 bins.
fn chi_square_high_bits(words: &[u32], bits: u32) -> f64 {
    let mut bins = [0u64; 16];
    for &w in words {
        bins[(w >> (bits - 4)) as usize & 15] += 1;
    }
    let expected = words.len() as f64 / 16.0;
    bins.iter()
        .map(|&o| (o as f64 - expected).powi(2) / expected)
        .sum()
}

/// Must-show 2: the server never holds an unmasked individual update. Everything the engine
/// received of each device (its masked input, here captured as it was handed to the engine)
/// passes a chi-square test of uniformity on its words' high bits, while the same test
/// rejects the unmasked inputs by a wide margin; the coordinates that carry the weight, loss
/// and accuracy are masked like the rest; what the server publishes about the round are
/// aggregates only; and its store's files (SQLite on disk) hold no device's masked input,
/// encoded input or update values.
#[tokio::test]
async fn the_server_receives_only_masked_inputs_and_no_per_device_metadata() {
    const N: usize = 16;
    // A store on disk, searched after the round.
    let dir = tempfile::tempdir().unwrap();
    let store = starling_server::store::Store::open(&dir.path().join("starling.db"))
        .await
        .unwrap();
    let clock = VirtualClock::new();
    let task = spawn_on(task(N as u32, 8), store, Arc::new(clock.clone())).await;
    let base = task.status().model.params.clone();
    let numel: usize = base.iter().map(|(_, t)| t.data().len()).sum();
    let locals = locals(N, numel, 7);
    let (record, received) = secure_round(&task, &clock, &locals, &Fates::default(), 7).await;
    assert_eq!(record.status, RoundStatus::Committed);
    let fp = received.fixed_point.unwrap();
    // Chi-square with 15 degrees of freedom: P(X > 56) < 1e-6 for uniform words.
    const CRITICAL: f64 = 56.0;
    for (masked, plain) in received.masked.iter().zip(&received.plain) {
        let x2 = chi_square_high_bits(masked, fp.bits);
        assert!(x2 < CRITICAL, "a masked input is not uniform: chi2 = {x2}");
        let x2_plain = chi_square_high_bits(plain, fp.bits);
        assert!(
            x2_plain > 10.0 * CRITICAL,
            "the test must tell an unmasked input apart: chi2 = {x2_plain}"
        );
        // The metadata coordinates (weight, loss, accuracy, accuracy weight) are not the
        // device's values in the clear.
        assert_ne!(&masked[numel..], &plain[numel..]);
    }
    // Pooled over the round, the metadata coordinates are uniform too.
    let meta: Vec<u32> = received
        .masked
        .iter()
        .flat_map(|m| m[numel..].iter().copied())
        .collect();
    assert!(chi_square_high_bits(&meta, fp.bits) < CRITICAL);
    // What is published and stored: only the round's aggregate statistics.
    let history = task.status().last_round.unwrap();
    assert_eq!(history.participants, N as u64);
    let json = serde_json::to_string(&history).unwrap();
    for l in &locals {
        assert!(
            !json.contains(&format!("{}", l.loss)),
            "a device's loss is published"
        );
    }
    // Nothing a device sent or computed is in the store's files: neither its masked input,
    // nor its encoded input, nor its update's values.
    task.stop().await;
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        stored.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(stored.len() > 1000, "the store wrote its files");
    let le32 = |v: &[u32]| -> Vec<u8> { v[..16].iter().flat_map(|x| x.to_le_bytes()).collect() };
    let contains = |needle: &[u8]| stored.windows(needle.len()).any(|w| w == needle);
    for ((masked, plain), l) in received.masked.iter().zip(&received.plain).zip(&locals) {
        assert!(!contains(&le32(masked)), "a masked input is stored");
        assert!(!contains(&le32(plain)), "an encoded input is stored");
        let delta: Vec<u8> = l.delta[..8].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(!contains(&delta), "an update's values are stored");
    }
}

/// Misuse is refused with stable codes and leaves the round as it was: a message in the
/// wrong step, an unknown token, keys sent twice, a replayed share message, shares for
/// devices that are not neighbours (or not addressed as the sender), a masked input of the
/// wrong length or outside the ring, a device that skipped a step, a plain upload to a
/// secure round; and a device that hangs up between steps leaves the round to finish
/// without it.
#[tokio::test]
async fn misuse_is_refused_with_stable_codes_and_the_round_goes_on() {
    const N: usize = 12;
    let (task, clock) = spawn_clocked(task(N as u32, 6)).await;
    let (round, mut devices) = check_in(&task, N, 5).await;
    let code = |r: Result<SecureAnswer, EngineError>| r.unwrap_err().code();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut keys_of = Vec::new();
    for d in &mut devices {
        let (client, keys) = Client::new(d.seat.index, d.seat.params, &mut rng);
        d.client = client;
        keys_of.push(keys);
    }
    let t0 = devices[0].token.clone();
    // Wrong step: shares and masked inputs before keys are closed.
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::ShareKeys(vec![]))
                .await
        ),
        ErrorCode::WrongPhase
    );
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::MaskedInput(vec![0; 3]))
                .await
        ),
        ErrorCode::WrongPhase
    );
    // Unknown device (token), and another round.
    assert_eq!(
        code(
            task.secure(
                round,
                "nobody",
                None,
                SecureRequest::AdvertiseKeys(keys_of[0])
            )
            .await
        ),
        ErrorCode::InvalidToken
    );
    assert_eq!(
        code(
            task.secure(
                round + 1,
                &t0,
                None,
                SecureRequest::AdvertiseKeys(keys_of[0])
            )
            .await
        ),
        ErrorCode::UnknownRound
    );
    // A plain upload to a secure round.
    let plain = task.admit_upload(round, &t0, None).await.unwrap_err();
    assert_eq!(plain.code(), ErrorCode::WrongPhase);
    // Keys of low order (u = 0 and u = 1, RFC 7748's points of order 2 and 4): no neighbour
    // could agree a secret, so they are refused and the device may still send good ones.
    let mut one = [0u8; 32];
    one[0] = 1;
    for bad in [[0u8; 32], one] {
        for keys in [
            AdvertiseKeys {
                encryption: bad,
                ..keys_of[0]
            },
            AdvertiseKeys {
                masking: bad,
                ..keys_of[0]
            },
        ] {
            assert_eq!(
                code(
                    task.secure(round, &t0, None, SecureRequest::AdvertiseKeys(keys))
                        .await
                ),
                ErrorCode::InvalidKey
            );
        }
    }
    // Keys twice: the second is refused and the first stands.
    task.secure(round, &t0, None, SecureRequest::AdvertiseKeys(keys_of[0]))
        .await
        .unwrap();
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::AdvertiseKeys(keys_of[1]))
                .await
        ),
        ErrorCode::DuplicateMessage
    );
    // Device 11 never advertises (it hangs up after checking in); the others do.
    for (d, k) in devices.iter().zip(&keys_of).skip(1).take(N - 2) {
        task.secure(round, &d.token, None, SecureRequest::AdvertiseKeys(*k))
            .await
            .unwrap();
    }
    assert_eq!(task.status().round.updates, 0);
    clock.advance(Duration::from_secs_f64(policy().advertise_secs + 1.0));
    let SecureAnswer::Keys(k0) = ask(&task, round, &t0, SecureRequest::GetKeys).await else {
        panic!()
    };
    assert!(
        !k0.contains_key(&devices[N - 1].seat.index),
        "11 gave no keys"
    );
    // The device that gave no keys is not in the cohort.
    assert_eq!(
        code(
            task.secure(round, &devices[N - 1].token, None, SecureRequest::GetKeys)
                .await
        ),
        ErrorCode::NotInCohort
    );
    // Keys after the step closed.
    assert_eq!(
        code(
            task.secure(
                round,
                &devices[N - 1].token,
                None,
                SecureRequest::AdvertiseKeys(keys_of[N - 1])
            )
            .await
        ),
        ErrorCode::WrongPhase
    );
    // Shares: one missing, one for a non-neighbour (itself), one claiming another sender.
    let good = devices[0].client.share_keys(&k0, &mut rng).unwrap();
    let mut short = good.clone();
    short.pop();
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::ShareKeys(short))
                .await
        ),
        ErrorCode::InvalidShares
    );
    let mut stranger = good.clone();
    stranger[0].to = devices[N - 1].seat.index;
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::ShareKeys(stranger))
                .await
        ),
        ErrorCode::InvalidShares
    );
    let mut forged: Vec<Envelope> = good.clone();
    forged[0].from = devices[1].seat.index;
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::ShareKeys(forged))
                .await
        ),
        ErrorCode::InvalidShares
    );
    task.secure(round, &t0, None, SecureRequest::ShareKeys(good.clone()))
        .await
        .unwrap();
    // A replay of the same message.
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::ShareKeys(good))
                .await
        ),
        ErrorCode::DuplicateMessage
    );
    // Devices 1..=9 share; device 10 hangs up here (after advertising keys).
    for d in devices.iter_mut().skip(1).take(N - 3) {
        let SecureAnswer::Keys(k) = ask(&task, round, &d.token, SecureRequest::GetKeys).await
        else {
            panic!()
        };
        let e = d.client.share_keys(&k, &mut rng).unwrap();
        task.secure(round, &d.token, None, SecureRequest::ShareKeys(e))
            .await
            .unwrap();
    }
    clock.advance(Duration::from_secs_f64(policy().share_secs + 1.0));
    let base = task.status().model.params.clone();
    let numel: usize = base.iter().map(|(_, t)| t.data().len()).sum();
    let locals = locals(N, numel, 5);
    // Masked inputs: wrong length, values outside the ring, and a device that did not share.
    let SecureAnswer::Envelopes(env0) = ask(&task, round, &t0, SecureRequest::GetEnvelopes).await
    else {
        panic!()
    };
    let len = devices[0].seat.params.len;
    assert_eq!(
        code(
            task.secure(
                round,
                &t0,
                None,
                SecureRequest::MaskedInput(vec![1; len - 1])
            )
            .await
        ),
        ErrorCode::WrongLength
    );
    assert_eq!(
        code(
            task.secure(
                round,
                &t0,
                None,
                SecureRequest::MaskedInput(vec![u32::MAX; len])
            )
            .await
        ),
        ErrorCode::WrongLength
    );
    assert_eq!(
        code(
            task.secure(
                round,
                &devices[N - 2].token,
                None,
                SecureRequest::MaskedInput(vec![0; len])
            )
            .await
        ),
        ErrorCode::NotInCohort
    );
    assert_eq!(task.status().round.updates, 0, "nothing refused was folded");
    let encode = |d: &Device, l: &Local, rng: &mut rand::rngs::StdRng| {
        let p: Params = d.seat.params;
        p.fixed_point.encode(
            &d.seat
                .spec
                .scaled(&l.delta, l.examples, Some(l.loss), Some(l.accuracy)),
            rng,
        )
    };
    let x0 = encode(&devices[0], &locals[0], &mut rng);
    let y0 = devices[0].client.masked_input(&env0, &x0).unwrap();
    task.secure(round, &t0, None, SecureRequest::MaskedInput(y0.clone()))
        .await
        .unwrap();
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::MaskedInput(y0))
                .await
        ),
        ErrorCode::DuplicateMessage
    );
    for i in 1..N - 2 {
        let d = &mut devices[i];
        let SecureAnswer::Envelopes(e) =
            ask(&task, round, &d.token, SecureRequest::GetEnvelopes).await
        else {
            panic!()
        };
        let x = encode(d, &locals[i], &mut rng);
        let y = d.client.masked_input(&e, &x).unwrap();
        task.secure(round, &d.token, None, SecureRequest::MaskedInput(y))
            .await
            .unwrap();
    }
    // Every sharer sent its input: the step closes at its goal, without the clock.
    let SecureAnswer::Survivors(survivors) =
        ask(&task, round, &t0, SecureRequest::GetSurvivors).await
    else {
        panic!()
    };
    assert_eq!(survivors.len(), N - 2);
    // Unmasking: a share of a device that is not a neighbour is refused.
    let mut u = devices[0].client.unmask(&survivors).unwrap();
    let mut bad = u.clone();
    if let Some(s) = bad.seeds.first_mut() {
        s.0 = devices[0].seat.index; // its own secret: not its neighbour
    }
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::Unmask(bad))
                .await
        ),
        ErrorCode::InvalidShares
    );
    u.from = 999; // the engine sets the sender from the assignment
    task.secure(round, &t0, None, SecureRequest::Unmask(u.clone()))
        .await
        .unwrap();
    assert_eq!(
        code(
            task.secure(round, &t0, None, SecureRequest::Unmask(u))
                .await
        ),
        ErrorCode::DuplicateMessage
    );
    for d in devices.iter().skip(1).take(N - 3) {
        let SecureAnswer::Survivors(s) =
            ask(&task, round, &d.token, SecureRequest::GetSurvivors).await
        else {
            panic!()
        };
        task.secure(
            round,
            &d.token,
            None,
            SecureRequest::Unmask(d.client.unmask(&s).unwrap()),
        )
        .await
        .unwrap();
    }
    let record = wait_round(&task, round).await;
    assert_eq!(record.status, RoundStatus::Committed, "{:?}", record.reason);
    let survivors: Vec<usize> = (0..N - 2).collect();
    let expected = fedavg(&base, &locals, &survivors);
    let got = flat(&task.status().model.params);
    let fp = devices[0].seat.params.fixed_point;
    let bound = quantisation_bound(&locals, &survivors, fp.levels(), policy().clip);
    for (e, g) in expected.iter().zip(&got) {
        assert!((e - g).abs() <= bound, "{e} vs {g}");
    }
    // The next round is secure again, in its advertise step.
    assert_eq!(task.status().round.round, round + 1);
    let _ = Step::Advertise;
}

/// Settings refuse what secure aggregation cannot support, saying why.
#[test]
fn settings_refuse_unsupported_combinations() {
    let mut t = task(20, 8);
    t.buffered = Some(Default::default());
    t.rounds.min = 10;
    t.min_cohort = 10;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("synchronous rounds"), "{e}");
    let mut t = task(20, 8);
    t.evaluate_every = 3;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("evaluate_every"), "{e}");
    let mut t = task(20, 8);
    t.secure_aggregation.as_mut().unwrap().input_bits = 30;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("input_bits"), "{e}");
    let mut t = task(20, 8);
    t.secure_aggregation.as_mut().unwrap().clip = 2000.0;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("clip"), "{e}");
    let mut t = task(20, 8);
    t.secure_aggregation.as_mut().unwrap().share_secs = 0.0;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("share_secs"), "{e}");
    assert!(task(20, 8).resolve().is_ok());
    let _ = InputSpec {
        clip: 1.0,
        loss_bound: 1.0,
        weight_cap: None,
        noise_mu: None,
    };
}

/// Issue 10 item 5, distributed DP: with `[tasks.privacy]` and secure aggregation each device
/// adds Skellam noise to its input before masking, so every input the server could unmask is
/// already noised and the sum carries the noise of all survivors: here 20 devices with zero
/// updates, whose committed model moves by that noise alone. Its standard deviation is the
/// one the noise multiplier asks of the fewest survivors (10), times √(20/10); the ledger
/// records the Skellam mechanism and exactly the ε of the core's accountant for 20 devices'
/// noise; no loss is published; and once the next round would pass the budget the task stops.
#[tokio::test]
async fn distributed_dp_noises_every_input_on_the_device_and_spends_the_ledger() {
    use starling_core::privacy::{DistributedSkellam, RdpAccountant};
    const N: usize = 20;
    const MIN: u32 = 10;
    const INPUTS_DP: usize = 1000;
    let z = 1.0;
    let population = 1000;
    let delta = 1e-5;
    let numel = (INPUTS_DP + 1) * OUTPUTS;
    let places = N;
    let levels = FixedPoint::new(policy().input_bits, places)
        .unwrap()
        .levels();
    let noise = DistributedSkellam::new(levels, numel, z, MIN as usize);
    let q = places as f64 / population as f64;
    // ε after rounds whose sums held these many devices' noise.
    let spent_after = |rounds: &[u64]| {
        let mut a = RdpAccountant::new();
        for &devices in rounds {
            let step = noise.rdp(q, devices, a.orders()).unwrap();
            a.compose_rdp(&step).unwrap();
        }
        a.epsilon(delta).unwrap()
    };
    let one = spent_after(&[N as u64]);
    // A round may open if even the fewest survivors' noise keeps ε within the budget.
    let (may_open, may_not) = (
        spent_after(&[u64::from(MIN)]),
        spent_after(&[N as u64, u64::from(MIN)]),
    );
    assert!(may_open < may_not);
    let settings = TaskSettings {
        inputs: INPUTS_DP,
        privacy: Some(PrivacyPolicy {
            clip: policy().clip,
            noise_multiplier: z,
            population,
            // The first round fits; a second would pass the budget (with the fewest
            // survivors' noise, which is what the engine asks before it opens one).
            epsilon: (may_open + may_not) / 2.0,
            delta,
            target_quantile: None,
            clip_learning_rate: 0.2,
            count_noise: None,
        }),
        ..task(N as u32, MIN)
    };
    let (task, clock) = spawn_clocked(settings).await;
    let base = flat(&task.status().model.params);
    assert_eq!(base.len(), numel);
    let locals: Vec<Local> = (0..N)
        .map(|_| Local {
            delta: vec![0.0; numel],
            examples: 50,
            loss: 1.0,
            accuracy: 0.5,
        })
        .collect();
    let (record, received) = secure_round(&task, &clock, &locals, &Fates::default(), 77).await;
    assert_eq!(record.status, RoundStatus::Committed, "{:?}", record.reason);
    let fp = received.fixed_point.unwrap();
    // The ring every device and the server built has room for the noise.
    let ring = FixedPoint::new(16, places).unwrap();
    assert_eq!(fp, ring.with_noise(places, noise.mu).unwrap());

    // Each device's input, before masking, already carries Sk(μ) on every update value.
    let mu = noise.mu;
    for x in &received.plain {
        let values = fp.decode(&x[..numel]);
        let var = values
            .iter()
            .map(|v| (v * fp.levels()).powi(2))
            .sum::<f64>()
            / numel as f64;
        assert!(
            (var / (2.0 * mu) - 1.0).abs() < 0.1,
            "an input's noise variance {var}, want {}",
            2.0 * mu
        );
        // No loss or accuracy travels (they would be un-noised).
        assert_eq!(fp.decode(&x[numel + 1..])[0], 0.0);
    }

    // The model moved by the summed noise over the fixed denominator (the goal, 20).
    let got = flat(&task.status().model.params);
    let moved: Vec<f64> = got.iter().zip(&base).map(|(g, b)| g - b).collect();
    let mean = moved.iter().sum::<f64>() / numel as f64;
    let sd = (moved.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (numel - 1) as f64).sqrt();
    let want = noise.variance(N as u64).sqrt() / levels * policy().clip / N as f64;
    assert!(
        (sd / want - 1.0).abs() < 0.06,
        "the model's noise deviation {sd}, want {want}"
    );
    assert!(
        mean.abs() < 5.0 * want / (numel as f64).sqrt(),
        "mean {mean}"
    );
    // It is the noise the multiplier asks of 10 devices, times √2 for 20.
    let central = z * noise.l2 / levels * policy().clip / N as f64;
    assert!((want / central - 2f64.sqrt()).abs() < 1e-9);

    // The ledger: the Skellam mechanism, the effective multiplier and the core's ε.
    let entry = record.privacy.expect("a private round has a ledger entry");
    assert_eq!(entry.mechanism, "skellam");
    assert!((entry.noise_multiplier - z * 2f64.sqrt()).abs() < 1e-9);
    assert!((entry.sampling_rate - q).abs() < 1e-12);
    assert!(
        (entry.epsilon - one).abs() < 1e-12 * one.max(1.0),
        "{} vs {one}",
        entry.epsilon
    );
    assert_eq!(record.mean_loss, None);
    assert_eq!(record.mean_accuracy, None);

    // The next round would pass the budget: the task stops with the reason.
    let status = task.status();
    let reason = status.stopped.expect("the budget is spent");
    assert!(reason.contains("privacy budget"), "{reason}");
    assert!((status.epsilon_spent.unwrap() - one).abs() < 1e-12 * one.max(1.0));
    match task.check_in_many(vec![Caller::device("late")]).await {
        Err(EngineError::TaskStopped(r)) => assert!(r.contains("privacy budget"), "{r}"),
        other => panic!("a device checked in past the budget: {other:?}"),
    }
}

/// Distributed DP's settings refuse what would not be private or would not fit: adaptive
/// clipping (the server cannot count clipped updates it cannot see), a privacy clip other
/// than the devices' clip, and a ring with no room for the noise.
#[tokio::test]
async fn distributed_dp_settings_refuse_what_cannot_hold() {
    let private = |t: &mut TaskSettings| {
        t.privacy = Some(PrivacyPolicy {
            clip: 1.0,
            noise_multiplier: 1.0,
            population: 1000,
            epsilon: 10.0,
            delta: 1e-5,
            target_quantile: None,
            clip_learning_rate: 0.2,
            count_noise: None,
        });
    };
    let mut t = task(20, 8);
    private(&mut t);
    assert!(t.resolve().is_ok());
    t.privacy.as_mut().unwrap().target_quantile = Some(0.5);
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("target_quantile"), "{e}");
    let mut t = task(20, 8);
    private(&mut t);
    t.privacy.as_mut().unwrap().clip = 2.0;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("must be equal"), "{e}");
    let mut t = task(20, 8);
    private(&mut t);
    t.secure_aggregation.as_mut().unwrap().input_bits = 24;
    t.privacy.as_mut().unwrap().noise_multiplier = 1e6;
    let e = t.resolve().unwrap_err().to_string();
    assert!(e.contains("no room in the ring"), "{e}");
}
