//! Differential privacy with a budget (`[tasks.privacy]`): clipped, fixed-weight updates, at
//! most `goal` per round, a ledger whose ε is the accountant's for the rounds released, a
//! task that stops before a round would pass the budget, and a ledger that a restart resumes
//! exactly and a rollback does not rewind. Through the engine and over real HTTP.

use serde_json::Value;
use starling_core::privacy;
use starling_core::wire::protocol::ErrorCode;
use starling_server::engine::{Caller, CheckIn, EngineError, SystemClock, TaskHandle};
use starling_server::settings::{BufferedPolicy, PrivacyPolicy, RoundPolicy, TaskSettings};
use starling_server::store::{RoundRecord, RoundStatus, Store};

use crate::harness::{self, delta, encode, STUCK};

const GOAL: u32 = 3;
const POPULATION: u64 = 30;
const Z: f64 = 1.0;
const DELTA: f64 = 1e-3;

fn q() -> f64 {
    f64::from(GOAL) / POPULATION as f64
}

/// ε after `rounds` released rounds, by the accountant directly.
fn eps(rounds: u64) -> f64 {
    privacy::epsilon(q(), Z, rounds, DELTA).unwrap()
}

/// The demo's task under DP with rounds of three and a budget that affords `rounds` rounds
/// and not one more.
fn dp_task(rounds: u64) -> TaskSettings {
    TaskSettings {
        rounds: RoundPolicy {
            goal: GOAL,
            min: GOAL,
            deadline_secs: 600.0,
            overcommit: 2.0,
            retry_secs: 1.0,
        },
        min_cohort: GOAL,
        max_assignments_per_address: 100,
        privacy: Some(PrivacyPolicy {
            clip: 1.0,
            noise_multiplier: Z,
            population: POPULATION,
            epsilon: (eps(rounds) + eps(rounds + 1)) / 2.0,
            delta: DELTA,
            target_quantile: None,
            clip_learning_rate: 0.2,
            count_noise: None,
        }),
        ..TaskSettings::default()
    }
}

async fn spawn(settings: TaskSettings, store: Store) -> TaskHandle {
    harness::spawn_on(settings, store, SystemClock::new()).await
}

/// One round: `GOAL` devices upload long updates claiming many examples; returns the
/// round's record.
async fn one_round(task: &TaskHandle) -> RoundRecord {
    round_of(task, GOAL, |_| (delta(30.0, 40.0), 1_000_000)).await
}

/// One round of `n` devices, device `i` uploading `update(i)` (a delta and its claimed
/// example count); returns the round's record.
async fn round_of(
    task: &TaskHandle,
    n: u32,
    update: impl Fn(usize) -> (starling_core::Parameters, u64),
) -> RoundRecord {
    let round = task.status().round.round;
    let answers = task
        .check_in_many(
            (0..n)
                .map(|i| Caller::device(format!("r{round}d{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let version = task.status().model.version;
    let uploads = answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| match a {
            CheckIn::Assigned(a) => {
                let (d, examples) = update(i);
                encode(&d, version, examples, Some(0.5), &a.token).into()
            }
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect();
    for r in task.upload_many(round, uploads).await {
        r.unwrap();
    }
    let mut rx = task.subscribe();
    let st = tokio::time::timeout(
        STUCK,
        rx.wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round == round)),
    )
    .await
    .expect("the round closes")
    .unwrap()
    .clone();
    st.last_round.unwrap()
}

#[tokio::test]
async fn each_round_spends_what_the_accountant_says_and_the_task_stops_at_the_budget() {
    let task = spawn(dp_task(3), Store::open_memory().await.unwrap()).await;
    assert_eq!(task.status().epsilon_spent, Some(0.0));
    for k in 1..=3u64 {
        let before = task.status().model.params.get("W").unwrap().data()[0];
        let record = one_round(&task).await;
        assert_eq!(record.status, RoundStatus::Committed, "{record:?}");
        let p = record.privacy.as_ref().expect("a ledger entry");
        assert_eq!(p.mechanism, "gaussian");
        assert_eq!((p.clip, p.noise_multiplier, p.cohort), (1.0, Z, GOAL));
        assert!((p.sampling_rate - q()).abs() < 1e-15);
        assert_eq!(
            p.epsilon,
            eps(k),
            "round {k}'s ε is the accountant's for {k} rounds"
        );
        assert_eq!(task.status().epsilon_spent, Some(eps(k)));
        // Nothing un-noised about the devices is published.
        assert_eq!(
            (record.examples, record.mean_loss, record.mean_accuracy),
            (0, None, None)
        );
        // Three updates of norm 50 clipped to 1, claiming a million examples each: the step
        // is their clipped mean (0.6 on W) plus noise of deviation z·S/goal = 1/3. Unclipped
        // it would be 30.
        let step = task.status().model.params.get("W").unwrap().data()[0] - before;
        assert!(step.abs() < 0.6 + 5.0 / 3.0, "W moved {step}");
    }
    // A fourth round would pass the budget: the task stopped, and says why.
    let st = task.status();
    let reason = st.stopped.expect("stopped");
    assert!(reason.contains("privacy budget is spent"), "{reason}");
    let e = task.check_in(Caller::device("late")).await.unwrap_err();
    assert!(matches!(e, EngineError::TaskStopped(_)));
    assert_eq!(e.code(), ErrorCode::TaskStopped);
    assert_eq!(st.model.version, 3);
}

#[tokio::test]
async fn a_private_round_takes_at_most_its_goal() {
    let task = spawn(dp_task(3), Store::open_memory().await.unwrap()).await;
    // Overcommit 2: six assignments, but only three updates may be released.
    let answers = task
        .check_in_many((0..6).map(|i| Caller::device(format!("d{i}"))).collect())
        .await
        .unwrap();
    let tokens: Vec<String> = answers
        .into_iter()
        .filter_map(|a| match a {
            CheckIn::Assigned(a) => Some(a.token),
            CheckIn::Retry { .. } => None,
        })
        .collect();
    assert_eq!(tokens.len(), 6);
    let uploads = tokens
        .iter()
        .map(|t| encode(&delta(0.1, 0.1), 0, 1, None, t).into())
        .collect();
    let results = task.upload_many(1, uploads).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(accepted, 3);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), ErrorCode::RoundClosed);
    }
}

#[tokio::test]
async fn a_restart_resumes_the_ledger_exactly_and_a_rollback_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dp.db");
    let store = Store::open(&path).await.unwrap();
    let task = spawn(dp_task(4), store.clone()).await;
    one_round(&task).await;
    one_round(&task).await;
    let spent = task.status().epsilon_spent.unwrap();
    assert_eq!(spent, eps(2));
    drop(task);
    store.close().await;

    // A new engine on the same file: the same ε, and the third round composes onto it.
    let store = Store::open(&path).await.unwrap();
    let task = spawn(dp_task(4), store.clone()).await;
    assert_eq!(task.status().epsilon_spent, Some(spent));
    let third = one_round(&task).await;
    assert_eq!(third.privacy.unwrap().epsilon, eps(3));

    // Rolling back to version 0 restores its parameters, not its ε.
    let v = task.rollback(0).await.unwrap();
    assert_eq!(v, 4);
    assert_eq!(task.status().epsilon_spent, Some(eps(3)));
    let fourth = one_round(&task).await;
    assert_eq!(fourth.privacy.unwrap().epsilon, eps(4));
    // And the budget (four rounds) is spent.
    assert!(task.status().stopped.is_some());
}

#[test]
fn privacy_settings_that_void_the_guarantee_are_refused() {
    let mut s = dp_task(3);
    s.privacy.as_mut().unwrap().delta = 0.1;
    let e = s.resolve().unwrap_err().to_string();
    assert!(e.contains("above 1 / population"), "{e}");
    let mut s = dp_task(3);
    s.privacy.as_mut().unwrap().population = 2;
    let e = s.resolve().unwrap_err().to_string();
    assert!(e.contains("smaller than rounds.goal"), "{e}");
    let mut s = dp_task(3);
    s.privacy.as_mut().unwrap().noise_multiplier = 0.0;
    assert!(s.resolve().is_err());
    let mut s = dp_task(3);
    s.buffered = Some(BufferedPolicy {
        buffer: GOAL,
        ..BufferedPolicy::default()
    });
    let e = s.resolve().unwrap_err().to_string();
    assert!(e.contains("needs synchronous rounds"), "{e}");
    let mut s = dp_task(3);
    s.evaluate_every = 2;
    assert!(s.resolve().is_err());
}

/// Over HTTP: the ledger at `/v1/tasks/{task}/privacy`, and a stopped task's check-in
/// answered `409 task_stopped` with the reason.
#[tokio::test]
async fn the_ledger_is_served_and_a_spent_budget_refuses_check_ins() {
    let h = harness::start(dp_task(1), |_| {}).await;
    for _ in 0..GOAL {
        let a = h.assigned().await;
        let (status, _) = h.upload(&a, &delta(3.0, 4.0), 7).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    }
    h.wait_version(1).await;
    let ledger: Value = h.get_json("/v1/tasks/linear/privacy").await;
    assert_eq!(ledger["enabled"], true, "{ledger}");
    assert_eq!(ledger["status"], "stopped");
    assert_eq!(ledger["epsilon_spent"].as_f64(), Some(eps(1)));
    assert_eq!(ledger["ledger"].as_array().unwrap().len(), 1);
    assert_eq!(ledger["ledger"][0]["epsilon"].as_f64(), Some(eps(1)));
    assert_eq!(ledger["ledger"][0]["participants"], GOAL);
    let r = h.post("/v1/tasks/linear/checkin").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "task_stopped");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("privacy budget is spent"),
        "{body}"
    );
    let t = h.task().await;
    assert_eq!(t["status"], "stopped");
    assert_eq!(t["privacy"]["epsilon_spent"].as_f64(), Some(eps(1)));
}

/// Adaptive clipping: with updates whose norms spread evenly over 0.1..2.0, the bound starts
/// at 0.1 and follows the target quantile (the median, about 1.05) from a noised count of the
/// unclipped updates; the ledger records each round's bound and the next; the accounting is
/// that of the configured noise multiplier, the updates' own noise being the smaller share
/// `(z^-2 - (2 σ_b)^-2)^-1/2`.
#[tokio::test]
async fn adaptive_clipping_follows_the_target_quantile_of_update_norms() {
    const N: u32 = 20;
    let policy = PrivacyPolicy {
        clip: 0.1,
        noise_multiplier: 1.0,
        population: 1000,
        epsilon: 1e6,
        delta: 1e-4,
        target_quantile: Some(0.5),
        clip_learning_rate: 0.2,
        count_noise: Some(1.0),
    };
    // z = 1 and σ_b = 1: the updates get (1 - 1/4)^-1/2 = 1.1547.
    assert!((policy.update_noise_multiplier(N) - (0.75f64).powf(-0.5)).abs() < 1e-12);
    let settings = TaskSettings {
        rounds: RoundPolicy {
            goal: N,
            min: N,
            deadline_secs: 600.0,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        min_cohort: N,
        max_assignments_per_address: 1000,
        privacy: Some(policy),
        ..TaskSettings::default()
    };
    let task = spawn(settings, Store::open_memory().await.unwrap()).await;
    let mut clips = Vec::new();
    for r in 1..=60u64 {
        // Device i's update has norm (i + 1) / 10, split evenly over W and b.
        let record = round_of(&task, N, |i| {
            let v = (i as f32 + 1.0) / 10.0 / 2f32.sqrt();
            (delta(v, v), 1)
        })
        .await;
        assert_eq!(record.round, r);
        let p = record.privacy.unwrap();
        if let Some(prev) = clips.last() {
            assert_eq!(
                p.clip, *prev,
                "each round clips at the bound the last one chose"
            );
        }
        clips.push(
            p.next_clip
                .expect("adaptive clipping records the next bound"),
        );
        // r rounds composed one by one: the accountant's ε for r steps, to rounding.
        let want = privacy::epsilon(N as f64 / 1000.0, 1.0, r, 1e-4).unwrap();
        assert!(
            (p.epsilon / want - 1.0).abs() < 1e-12,
            "{} vs {want}",
            p.epsilon
        );
    }
    // From 0.1 the bound rises about 10% a round while nearly every update is clipped...
    assert!(clips[9] > 0.2, "{clips:?}");
    // ...and then hovers around the median norm, 1.05.
    let tail = &clips[40..];
    let mean = tail.iter().sum::<f64>() / tail.len() as f64;
    assert!(
        (0.8..1.3).contains(&mean),
        "bound {mean} after 40 rounds: {clips:?}"
    );
}
