//! Buffered asynchronous mode (FedBuff) through the engine's handle: versions step every K
//! updates, each update discounted by its staleness, too-stale updates refused, the
//! concurrency bounded, uploads that find the buffer full carried into the next, and the mode
//! composed with a server optimiser. Assignment lifetimes run on a virtual clock.

use std::time::Duration;

use starling_core::aggregate::StrategyConfig;
use starling_core::wire::protocol::ErrorCode;
use starling_server::engine::{self, Caller, CheckIn, EngineError, TaskHandle};
use starling_server::settings::{BufferedPolicy, TaskSettings};
use starling_server::store::RoundStatus;

use crate::harness::{delta, encode, spawn_clocked, wait_engine_version, STUCK};

/// The demo's linear task (W = 5, b = 3) in buffered mode with buffers of `k`.
fn buffered(k: u32, concurrency: u32, max_staleness: u64) -> TaskSettings {
    TaskSettings {
        min_cohort: k,
        buffered: Some(BufferedPolicy {
            buffer: k,
            concurrency,
            max_staleness,
            staleness_exponent: 0.5,
            assignment_secs: 60.0,
        }),
        ..TaskSettings::default()
    }
}

/// Check-ins of devices `names`: `(round, base_version, token)` of each assignment.
async fn assign(task: &TaskHandle, names: &[&str]) -> Vec<(u64, u64, String)> {
    task.check_in_many(names.iter().map(|n| Caller::device(*n)).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|a| match a {
            CheckIn::Assigned(a) => (a.round, a.base_version, a.token),
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect()
}

fn w_and_b(task: &TaskHandle) -> (f32, f32) {
    let st = task.status();
    (
        st.model.params.get("W").unwrap().data()[0],
        st.model.params.get("b").unwrap().data()[0],
    )
}

/// An update moving W and b by `v`, built on `base` with `examples` examples.
fn upload(v: f32, examples: u64, base: u64, token: &str) -> engine::Upload {
    engine::Upload::from(encode(&delta(v, v), base, examples, None, token))
}

#[tokio::test]
async fn versions_step_every_k_updates_and_stale_ones_count_less() {
    let (task, _clock) = spawn_clocked(buffered(2, 10, 5)).await;
    let a = assign(&task, &["a", "b", "c"]).await;
    assert!(a.iter().all(|(round, base, _)| (*round, *base) == (1, 0)));
    // Buffer 1: +1 (1 example) and +4 (3 examples): W = 5 + (1 + 12) / 4.
    let r = task.upload(1, upload(1.0, 1, 0, &a[0].2)).await.unwrap();
    assert_eq!((r.round, r.updates_in_round), (1, 1));
    assert_eq!(task.status().model.version, 0, "one update does not step");
    task.upload(1, upload(4.0, 3, 0, &a[1].2)).await.unwrap();
    wait_engine_version(&task, 1).await;
    assert_eq!(w_and_b(&task), (5.0 + 13.0 / 4.0, 3.0 + 13.0 / 4.0));

    // Buffer 2: "c" trained version 0 (one version stale: values scaled by 1/sqrt 2, weight
    // kept), "d" trained version 1. W = v1 + (2 * 2/sqrt2 + 1 * -1) / 3.
    let d = assign(&task, &["d"]).await;
    assert_eq!((d[0].0, d[0].1), (2, 1));
    let r = task.upload(1, upload(2.0, 2, 0, &a[2].2)).await.unwrap();
    assert_eq!(
        r.round, 2,
        "a round-1 assignment folds into the buffer of the day"
    );
    task.upload(2, upload(-1.0, 1, 1, &d[0].2)).await.unwrap();
    wait_engine_version(&task, 2).await;
    let step = (2.0 * 2.0 / 2f64.sqrt() - 1.0) / 3.0;
    let want = (f64::from(5.0f32 + 13.0 / 4.0) + step) as f32;
    assert_eq!(w_and_b(&task).0, want);
    let record = task.status().last_round.unwrap();
    assert_eq!(
        (
            record.round,
            record.status,
            record.participants,
            record.examples
        ),
        (2, RoundStatus::Committed, 2, 3)
    );
    assert_eq!(task.status().round.round, 3);
}

#[tokio::test]
async fn an_update_staler_than_the_bound_is_refused_and_frees_its_place() {
    let (task, _clock) = spawn_clocked(buffered(2, 3, 1)).await;
    let old = assign(&task, &["old", "x", "y"]).await;
    // Full: three outstanding.
    let more = task.check_in(Caller::device("z")).await.unwrap();
    assert!(matches!(more, CheckIn::Retry { .. }), "{more:?}");
    // Two versions pass (x, y, then two fresh devices).
    task.upload(1, upload(0.1, 1, 0, &old[1].2)).await.unwrap();
    task.upload(1, upload(0.1, 1, 0, &old[2].2)).await.unwrap();
    wait_engine_version(&task, 1).await;
    let fresh = assign(&task, &["p", "q"]).await;
    task.upload(2, upload(0.1, 1, 1, &fresh[0].2))
        .await
        .unwrap();
    task.upload(2, upload(0.1, 1, 1, &fresh[1].2))
        .await
        .unwrap();
    wait_engine_version(&task, 2).await;
    let before = task.status();
    let e = task
        .upload(1, upload(9.0, 1, 0, &old[0].2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::TooStale {
                got: 0,
                current: 2,
                max: 1
            }
        ),
        "{e}"
    );
    assert_eq!(e.code(), ErrorCode::TooStale);
    assert_eq!(e.code().status(), 409);
    assert!(e.to_string().contains("2 versions behind"), "{e}");
    let after = task.status();
    assert_eq!(after.round.updates, before.round.updates, "nothing folded");
    assert_eq!(after.model.version, 2);
    // Its assignment is over: the token is spent and the place is free again.
    let again = task.upload(1, upload(0.1, 1, 0, &old[0].2)).await;
    assert_eq!(
        again.unwrap_err().code(),
        ErrorCode::InvalidToken,
        "a refused stale token does not come back"
    );
    assert_eq!(task.status().round.assigned, 0);
    assert_eq!(assign(&task, &["r", "s", "t"]).await.len(), 3);
}

#[tokio::test]
async fn outstanding_assignments_never_exceed_the_concurrency_and_lapse_on_the_clock() {
    let (task, clock) = spawn_clocked(buffered(2, 4, 5)).await;
    let answers = task
        .check_in_many((0..10).map(|i| Caller::device(format!("d{i}"))).collect())
        .await
        .unwrap();
    let assigned = answers
        .iter()
        .filter(|a| matches!(a, CheckIn::Assigned(_)))
        .count();
    assert_eq!(assigned, 4);
    assert_eq!(task.status().round.assigned, 4);
    let CheckIn::Assigned(first) = &answers[0] else {
        unreachable!()
    };
    assert_eq!(first.deadline_in, Duration::from_secs(60));
    // A minute later the silent four have lapsed: four new devices get their places, and a
    // lapsed token's upload is refused before its body is read.
    clock.advance(Duration::from_secs(60));
    let later = assign(&task, &["n0", "n1", "n2", "n3"]).await;
    assert_eq!(later.len(), 4);
    let e = task.admit_upload(1, &first.token, None).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidToken);
    // The replaced device checking in again gets a fresh token, not a second place.
    let again = assign(&task, &["n0"]).await;
    assert_ne!(again[0].2, later[0].2);
    assert_eq!(task.status().round.assigned, 4);
}

#[tokio::test]
async fn a_batch_larger_than_the_buffer_spills_into_the_next_buffers_in_order() {
    let (task, _clock) = spawn_clocked(buffered(2, 10, 5)).await;
    let a = assign(&task, &["a", "b", "c", "d", "e"]).await;
    let uploads = a
        .iter()
        .enumerate()
        .map(|(i, (_, _, t))| upload(i as f32, 1, 0, t))
        .collect();
    let receipts: Vec<u64> = tokio::time::timeout(STUCK, task.upload_many(1, uploads))
        .await
        .expect("a full buffer never stalls the upload")
        .into_iter()
        .map(|r| r.unwrap().round)
        .collect();
    assert_eq!(receipts, [1, 1, 2, 2, 3]);
    wait_engine_version(&task, 2).await;
    // Version 1 = 5 + (0 + 1)/2; version 2 = v1 + (2 + 3)/2/sqrt(2) (one version stale).
    let v1 = (5.0f64 + 0.5) as f32;
    let v2 = (f64::from(v1) + 2.5 / 2f64.sqrt()) as f32;
    assert_eq!(w_and_b(&task).0, v2);
    assert_eq!(
        task.status().round.updates,
        1,
        "the fifth waits in buffer 3"
    );
}

#[tokio::test]
async fn buffered_mode_composes_with_a_server_optimiser() {
    let settings = TaskSettings {
        strategy: StrategyConfig::FedAvgM {
            server_lr: 0.5,
            momentum: 0.9,
        },
        ..buffered(2, 10, 5)
    };
    let (task, _clock) = spawn_clocked(settings).await;
    let a = assign(&task, &["a", "b", "c", "d"]).await;
    // Buffer 1: Δ = 1; v = 1; W = 5 + 0.5. Buffer 2: both one version stale, Δ = 2/sqrt2;
    // v = 0.9 + sqrt2; W += 0.5 v.
    for t in &a[..2] {
        task.upload(1, upload(1.0, 1, 0, &t.2)).await.unwrap();
    }
    wait_engine_version(&task, 1).await;
    assert_eq!(w_and_b(&task).0, 5.5);
    for t in &a[2..] {
        task.upload(1, upload(2.0, 1, 0, &t.2)).await.unwrap();
    }
    wait_engine_version(&task, 2).await;
    let v = 0.9 + 2.0 / 2f64.sqrt();
    let want = (5.5f64 + 0.5 * v) as f32;
    assert!(
        (w_and_b(&task).0 - want).abs() < 1e-6,
        "{:?}",
        w_and_b(&task)
    );
}

#[test]
fn a_buffer_smaller_than_the_minimum_cohort_is_refused() {
    let mut settings = buffered(5, 10, 5);
    settings.min_cohort = 10;
    let e = settings.resolve().unwrap_err().to_string();
    assert!(
        e.contains("buffered.buffer (5) is below min_cohort (10)"),
        "{e}"
    );
    let mut settings = buffered(10, 0, 5);
    settings.min_cohort = 10;
    assert!(settings
        .resolve()
        .unwrap_err()
        .to_string()
        .contains("concurrency"));
}
