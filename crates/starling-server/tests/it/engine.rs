//! The round engine through its handle, without HTTP: the batched calls an in-memory
//! transport (the simulator) uses, and the faults a hostile or vanishing client can cause.
//! Deadlines run on a virtual clock that the test moves, not on real sleeps.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use starling_core::aggregate::{StrategyConfig, WeightedSum};
use starling_core::wire::update::{check, Rules};
use starling_server::engine::round::AbandonReason;
use starling_server::engine::{Caller, CheckIn, EngineError, SystemClock, TaskHandle, Upload};
use starling_server::settings::{Retention, RoundPolicy, TaskSettings, Weighting};
use starling_server::store::{RoundStatus, Store};

use crate::harness::{
    self, delta, encode, spawn_clocked, spawn_on, wait_engine_version as wait_version, STUCK,
};

/// The body of an update that moves every parameter by `v`.
fn body(v: f32, token: &str, examples: u64, base_version: u64) -> Vec<u8> {
    encode(&delta(v, v), base_version, examples, Some(0.5), token)
}

/// Rounds of `goal` updates, each assigned once, that commit with `min` at the deadline.
fn policy(goal: u32, min: u32, deadline_secs: f64) -> RoundPolicy {
    RoundPolicy {
        overcommit: 1.0,
        ..harness::policy(goal, min, deadline_secs)
    }
}

/// The demo's task with rounds of `goal`, and a cohort of `min_cohort` allowed.
fn cohort_task(goal: u32, min: u32, deadline_secs: f64, min_cohort: u32) -> TaskSettings {
    TaskSettings {
        rounds: policy(goal, min, deadline_secs),
        min_cohort,
        ..TaskSettings::default()
    }
}

/// The demo's task with small rounds, a round of one device allowed (as a demo says so).
fn small(goal: u32, min: u32) -> TaskSettings {
    cohort_task(goal, min, 600.0, 1)
}

async fn spawn(settings: TaskSettings, store: Store) -> TaskHandle {
    spawn_on(settings, store, SystemClock::new()).await
}

async fn tokens(task: &TaskHandle, n: usize) -> Vec<String> {
    let answers = task
        .check_in_many((0..n).map(|i| Caller::device(format!("d{i}"))).collect())
        .await
        .unwrap();
    answers
        .into_iter()
        .map(|a| match a {
            CheckIn::Assigned(a) => a.token,
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect()
}

async fn wait_round(task: &TaskHandle, round: u64) -> starling_server::store::RoundRecord {
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

#[tokio::test]
async fn batched_check_ins_and_uploads_answer_each_item_in_order() {
    let task = spawn(small(3, 1), Store::open_memory().await.unwrap()).await;
    let answers = task
        .check_in_many(vec![
            Caller::device("a"),
            Caller::device("a"),
            Caller::default(),
            Caller::default(),
            Caller::default(),
        ])
        .await
        .unwrap();
    let tokens: Vec<String> = answers
        .iter()
        .filter_map(|a| match a {
            CheckIn::Assigned(a) => Some(a.token.clone()),
            CheckIn::Retry { .. } => None,
        })
        .collect();
    // "a" twice gets one assignment; the goal of 3 caps the rest.
    assert!(matches!(answers[1], CheckIn::Retry { .. }));
    assert!(matches!(answers[4], CheckIn::Retry { .. }));
    assert_eq!(tokens.len(), 3);
    let results = task
        .upload_many(
            1,
            vec![
                body(1.0, &tokens[0], 10, 0).into(),
                body(f32::NAN, &tokens[1], 10, 0).into(),
                body(3.0, &tokens[2], 10, 0).into(),
            ],
        )
        .await;
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(EngineError::Update(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap().updates_in_round, 2);
    // The refused assignment can still deliver, which completes the round.
    let last = task
        .upload_many(1, vec![body(2.0, &tokens[1], 10, 0).into()])
        .await;
    assert!(last[0].is_ok());
    wait_version(&task, 1).await;
    let w = task.status().model.params.get("W").unwrap().data()[0];
    assert!((w - 7.0).abs() < 1e-6, "5 + mean(1, 3, 2) = 7, got {w}");
}

/// A receipt's count is what the task's status shows as soon as the receipt is out: a device
/// (or the fuzz test over HTTP) that reads the status after its 202 sees its update counted.
/// The status used to catch up a moment later, when the actor got round to the fold's
/// report; on a multi-threaded runtime a read in between saw one update fewer than the
/// receipt (the HTTP fuzz test hit it under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_an_update_before_its_receipt_is_out() {
    const N: usize = 200;
    let task = spawn(small(N as u32 + 1, 1), Store::open_memory().await.unwrap()).await;
    let tokens = tokens(&task, N).await;
    for (i, token) in tokens.iter().enumerate() {
        let receipt = task
            .upload_many(1, vec![body(1.0, token, 10, 0).into()])
            .await
            .remove(0)
            .expect("accepted");
        assert_eq!(receipt.updates_in_round, i as u64 + 1);
        assert_eq!(
            task.status().round.updates,
            receipt.updates_in_round,
            "the status right after receipt {i}"
        );
    }
}

/// Issue point 1: a client that goes away while its upload is between check, reservation,
/// fold and report (here: the caller's future is dropped after any number of steps) never
/// strands its reservation. Either the update folded (a retry is a duplicate) or the
/// assignment is free again; the round always completes.
#[tokio::test]
async fn an_upload_whose_caller_vanishes_at_any_point_folds_or_releases() {
    const N: usize = 24;
    let task = spawn(
        small(N as u32, N as u32),
        Store::open_memory().await.unwrap(),
    )
    .await;
    let tokens = tokens(&task, N).await;
    for (i, t) in tokens.iter().enumerate() {
        let (task, body) = (task.clone(), body(1.0, t, 10, 0));
        let upload =
            tokio::spawn(async move { task.upload(1, Upload { token: None, body }).await });
        // Give the upload a different number of scheduler turns before it is dropped, so
        // the drop lands in every window: before the check, while reserving, while folding.
        for _ in 0..i % 12 {
            tokio::task::yield_now().await;
        }
        upload.abort();
    }
    let mut folded_before = 0;
    for t in &tokens {
        match task.upload(1, body(1.0, t, 10, 0).into()).await {
            Ok(_) => {}
            Err(EngineError::Duplicate) => folded_before += 1,
            Err(EngineError::RoundClosed(1)) => folded_before += 1,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    // The round commits with every assignment's update, once each.
    let record = wait_round(&task, 1).await;
    assert_eq!(record.status, RoundStatus::Committed, "{record:?}");
    assert_eq!(record.participants, N as u64);
    assert_eq!(task.status().model.params.get("W").unwrap().data()[0], 6.0);
    eprintln!("{folded_before} of {N} aborted uploads had folded before the retry");
}

/// Issue point 2: finite but huge updates. With the default bound they are refused; with a
/// bound large enough to let them in, the commit that would overflow to infinity is
/// abandoned with its reason, the model stays finite, and honest updates still fold.
#[tokio::test]
async fn a_commit_that_would_make_the_model_non_finite_is_abandoned() {
    let store = Store::open_memory().await.unwrap();
    let task = spawn(small(1, 1), store.clone()).await;
    let t = tokens(&task, 1).await;
    let err = task
        .upload(1, body(f32::MAX, &t[0], 10, 0).into())
        .await
        .unwrap_err();
    assert_eq!(err.code().as_str(), "norm_too_large", "{err}");
    drop(task);

    let store = Store::open_memory().await.unwrap();
    let loose = TaskSettings {
        max_update_norm: 1e39,
        ..small(1, 1)
    };
    let task = spawn(loose, store.clone()).await;
    let t = tokens(&task, 1).await;
    task.upload(1, body(3.0e38, &t[0], 10, 0).into())
        .await
        .unwrap();
    wait_version(&task, 1).await;
    let w = task.status().model.params.get("W").unwrap().data()[0];
    assert!(w.is_finite() && w > 1e38, "{w}");
    // 3e38 + 3e38 overflows f32: refused at commit, not published.
    let t = tokens(&task, 1).await;
    task.upload(2, body(3.0e38, &t[0], 10, 1).into())
        .await
        .unwrap();
    let record = wait_round(&task, 2).await;
    assert_eq!(record.status, RoundStatus::Abandoned);
    assert_eq!(record.reason, Some(AbandonReason::NonFiniteModel));
    assert_eq!(record.mean_loss, None, "nothing published about it");
    let st = task.status();
    assert_eq!(st.model.version, 1);
    assert!(st
        .model
        .params
        .iter()
        .all(|(_, t)| t.data().iter().all(|v| v.is_finite())));
    // The stored history says why, and the next round takes honest updates.
    let rounds = store.rounds("linear").await.unwrap();
    assert_eq!(rounds[1].reason, Some(AbandonReason::NonFiniteModel));
    let t = tokens(&task, 1).await;
    task.upload(3, body(-3.0e38, &t[0], 10, 1).into())
        .await
        .unwrap();
    wait_version(&task, 2).await;
}

/// Issue point 3: a device that claims a billion examples weighs no more than the task's cap
/// (or the same as everyone under uniform weighting).
#[tokio::test]
async fn one_update_cannot_own_the_average() {
    for (weighting, cap, attacker_share) in [
        (Weighting::Examples, 100, 100.0 / 200.0),
        (Weighting::Uniform, 10_000, 1.0 / 3.0),
    ] {
        let task = spawn(
            TaskSettings {
                weighting,
                max_examples_per_update: cap,
                ..small(3, 3)
            },
            Store::open_memory().await.unwrap(),
        )
        .await;
        let t = tokens(&task, 3).await;
        let results = task
            .upload_many(
                1,
                vec![
                    body(100.0, &t[0], 1_000_000_000, 0).into(),
                    body(-1.0, &t[1], 50, 0).into(),
                    body(0.0, &t[2], 50, 0).into(),
                ],
            )
            .await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        wait_version(&task, 1).await;
        let w = task.status().model.params.get("W").unwrap().data()[0];
        let honest = (1.0 - attacker_share) * -0.5;
        let want = 5.0 + attacker_share * 100.0 + honest;
        assert!(
            (f64::from(w) - want).abs() < 1e-4,
            "{weighting:?}: W = {w}, want {want} (uncapped it would be ~105)"
        );
    }
}

/// Issue point 5: a round below the minimum cohort publishes nothing, and the settings refuse
/// a minimum below the cohort unless the task lowers `min_cohort` itself.
#[tokio::test]
async fn nothing_is_published_about_fewer_devices_than_the_minimum_cohort() {
    let err = TaskSettings {
        rounds: policy(1, 1, 600.0),
        ..TaskSettings::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(err.contains("below min_cohort (10)"), "{err}");

    let (task, clock) = spawn_clocked(cohort_task(5, 3, 30.0, 3)).await;
    let t = tokens(&task, 2).await;
    for (i, t) in t.iter().enumerate() {
        task.upload(1, body(i as f32, t, 10, 0).into())
            .await
            .unwrap();
    }
    // The deadline passes on the engine's clock: two of three needed, so no version.
    clock.advance(Duration::from_secs(31));
    let record = wait_round(&task, 1).await;
    assert_eq!(record.status, RoundStatus::Abandoned);
    assert_eq!(record.reason, Some(AbandonReason::BelowMinimum));
    assert_eq!(record.version, None);
    assert_eq!(
        (record.examples, record.mean_loss, record.mean_accuracy),
        (0, None, None),
        "no statistics about two devices"
    );
    assert_eq!(task.status().model.version, 0);
}

/// Issue point 6: one client address cannot take every assignment of a round under many
/// device ids.
#[tokio::test]
async fn one_address_cannot_hoard_a_round() {
    let task = spawn(
        TaskSettings {
            max_assignments_per_address: 3,
            ..small(13, 1)
        },
        Store::open_memory().await.unwrap(),
    )
    .await;
    let attacker = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let answers = task
        .check_in_many(
            (0..13)
                .map(|i| Caller {
                    device: Some(format!("sybil-{i}")),
                    address: Some(attacker),
                })
                .collect(),
        )
        .await
        .unwrap();
    let assigned = answers
        .iter()
        .filter(|a| matches!(a, CheckIn::Assigned(_)))
        .count();
    assert_eq!(assigned, 3);
    assert!(matches!(
        answers[3],
        CheckIn::Retry { reason, .. } if reason.contains("address")
    ));
    // Other addresses still find room.
    let honest = task
        .check_in(Caller {
            device: Some("phone".into()),
            address: Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1))),
        })
        .await
        .unwrap();
    assert!(matches!(honest, CheckIn::Assigned(_)));
    assert_eq!(task.status().round.assigned, 4);
}

/// Issue point 7 and the rollback: only the newest `keep_last` versions and every
/// `keep_every`-th stay on disk; an operator rolls back to a kept version, which becomes a
/// new version; and a restarted engine resumes from it.
#[tokio::test]
async fn old_versions_are_pruned_and_a_task_rolls_back_to_a_kept_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    let settings = TaskSettings {
        retention: Retention {
            keep_last: 3,
            keep_every: 10,
        },
        ..small(1, 1)
    };
    let task = spawn(settings.clone(), store.clone()).await;
    for round in 1..=25u64 {
        let t = tokens(&task, 1).await;
        task.upload(round, body(1.0, &t[0], 1, round - 1).into())
            .await
            .unwrap();
        wait_version(&task, round).await;
    }
    assert_eq!(
        store.versions("linear").await.unwrap(),
        vec![0, 10, 20, 23, 24, 25]
    );
    // W was 5 + version after each commit of +1.
    assert!(matches!(
        task.rollback(15).await,
        Err(EngineError::UnknownVersion(15))
    ));
    let new_version = task.rollback(10).await.unwrap();
    assert_eq!(new_version, 26);
    let st = task.status();
    assert_eq!(st.model.version, 26);
    assert_eq!(st.model.params.get("W").unwrap().data()[0], 15.0);
    assert_eq!(st.round.base_version, 26);
    drop(task);

    let again = spawn(settings, store.clone()).await;
    let st = again.status();
    assert_eq!(st.model.version, 26);
    assert_eq!(st.model.params.get("W").unwrap().data()[0], 15.0);
    let rounds = store.rounds("linear").await.unwrap();
    assert_eq!(
        rounds.last().unwrap().reason,
        Some(AbandonReason::RolledBack)
    );
}

/// The deadline comes from the clock the engine was given: it passes exactly when the test
/// moves that clock, and not before.
#[tokio::test]
async fn the_deadline_follows_the_engine_clock() {
    let (task, clock) = spawn_clocked(cohort_task(3, 1, 60.0, 1)).await;
    let t = tokens(&task, 1).await;
    task.upload(1, body(1.0, &t[0], 5, 0).into()).await.unwrap();
    clock.advance(Duration::from_secs(59));
    // A check-in is answered after the actor saw the clock move: the round is still open.
    let late = task.check_in(Caller::device("late")).await.unwrap();
    assert!(matches!(late, CheckIn::Assigned(_)));
    assert_eq!(task.status().round.round, 1);
    clock.advance(Duration::from_secs(2));
    let record = wait_round(&task, 1).await;
    assert_eq!(record.status, RoundStatus::Committed);
}

/// One round of one update moving every parameter by `v`, on the open round (a restarted
/// engine opens a new round number), awaited until it commits `version`.
async fn one_update_round(task: &TaskHandle, version: u64, v: f32) {
    let t = tokens(task, 1).await;
    let round = task.status().round.round;
    task.upload(round, body(v, &t[0], 10, version - 1).into())
        .await
        .unwrap();
    wait_version(task, version).await;
}

/// Issue 8: a task's server optimiser keeps its state in each committed version, so an
/// engine stopped after round 2 and started again on the same database file takes round 3's
/// step exactly as an uninterrupted run does (FedAdam's moments, bit for bit), and a restart
/// that had lost the moments would have stepped differently.
#[tokio::test]
async fn a_restarted_engine_resumes_the_strategy_state_exactly() {
    let settings = TaskSettings {
        strategy: StrategyConfig::FedAdam {
            server_lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ..small(1, 1)
    };
    let deltas = [1.0f32, -0.5, 2.0];
    let dir = tempfile::tempdir().unwrap();
    let bits = |task: &TaskHandle| -> Vec<u32> {
        let st = task.status();
        st.model
            .params
            .iter()
            .flat_map(|(_, t)| t.data().iter().map(|x| x.to_bits()).collect::<Vec<_>>())
            .collect()
    };

    // Uninterrupted: three rounds on one engine.
    let store = Store::open(&dir.path().join("straight.db")).await.unwrap();
    let task = spawn(settings.clone(), store).await;
    one_update_round(&task, 1, deltas[0]).await;
    // FedAdam's first step by hand: m = 0.1, v = 0.99e-6 + 0.01, step = 0.1 m / (sqrt v +
    // 1e-3) = 0.0990050 (FedAvg would have moved W to 6).
    let w1 = task.status().model.params.get("W").unwrap().data()[0];
    assert!((f64::from(w1) - 5.099005).abs() < 1e-5, "{w1}");
    one_update_round(&task, 2, deltas[1]).await;
    one_update_round(&task, 3, deltas[2]).await;
    let straight = bits(&task);
    drop(task);

    // Interrupted: two rounds, the engine stopped, a new engine on the same file.
    let path = dir.path().join("restarted.db");
    let store = Store::open(&path).await.unwrap();
    let task = spawn(settings.clone(), store.clone()).await;
    one_update_round(&task, 1, deltas[0]).await;
    one_update_round(&task, 2, deltas[1]).await;
    drop(task);
    let spec = settings.resolve().unwrap().spec;
    let v2 = store.version("linear", &spec, 2).await.unwrap().unwrap();
    assert!(
        !v2.strategy_state.is_empty(),
        "version 2 carries the moments"
    );
    drop(store);
    let store = Store::open(&path).await.unwrap();
    let task = spawn(settings.clone(), store).await;
    assert_eq!(task.status().model.version, 2);
    one_update_round(&task, 3, deltas[2]).await;
    assert_eq!(
        bits(&task),
        straight,
        "the resumed run equals the uninterrupted one"
    );

    // Without the stored moments (a fresh FedAdam on version 2), round 3 would differ.
    let layout = spec.layout();
    let mut sum = WeightedSum::new(&layout);
    sum.accept(&check(body(deltas[2], "t", 10, 2), &Rules::lenient(&layout)).unwrap());
    let fresh = settings
        .strategy
        .build(&layout)
        .next_params(&v2.params, &sum)
        .unwrap();
    let fresh_bits: Vec<u32> = fresh
        .iter()
        .flat_map(|(_, t)| t.data().iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        .collect();
    assert_ne!(fresh_bits, straight);
}
