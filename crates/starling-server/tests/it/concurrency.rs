//! Correctness under concurrency, against the real server on 127.0.0.1:0: check-in storms
//! and parallel uploads. (Speed is measured by `starling bench`, not here.)

use std::sync::Arc;

use starling_core::{Parameters, Tensor};
use starling_server::settings::{RoundPolicy, TaskSettings};

use crate::harness::{self, encode, expected_fold, policy, small_task, Harness};

async fn server(inputs: usize, goal: u32) -> Harness {
    let task = TaskSettings {
        max_assignments_per_address: 100_000,
        inputs,
        ..small_task(RoundPolicy {
            overcommit: 1.0,
            retry_secs: 2.0,
            ..policy(goal, goal, 600.0)
        })
    };
    harness::start(task, |s| {
        // Every client of these tests is 127.0.0.1: lift the per-address limits, which are not
        // what is tested here.
        s.max_connections_per_address = 4096;
        s.max_connections = 4096;
        s.max_uploads_in_flight = 1024;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_check_ins_all_get_an_answer() {
    let h = Arc::new(server(1, 100).await);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..2000 {
        let h = h.clone();
        set.spawn(async move { h.check_in_device(&format!("d{i}")).await });
    }
    let (mut assigned, mut retry) = (0, 0);
    let mut tokens = std::collections::HashSet::new();
    while let Some(v) = set.join_next().await {
        let v = v.unwrap();
        match v["status"].as_str().unwrap() {
            "assigned" => {
                assigned += 1;
                assert!(tokens.insert(v["token"].as_str().unwrap().to_string()));
            }
            "retry" => {
                retry += 1;
                let secs = v["retry_after_secs"].as_f64().unwrap();
                assert!(
                    (2.0..=3.0).contains(&secs),
                    "jittered retry in [2, 3]: {secs}"
                );
            }
            other => panic!("unexpected answer {other}"),
        }
    }
    assert_eq!((assigned, retry), (100, 1900));
}

/// The aggregate of a round whose uploads arrived many at a time equals the sequential
/// aggregate of the same updates (relative 1e-6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_uploads_aggregate_like_a_sequential_fold() {
    const N: usize = 48;
    const INPUTS: usize = 20_000;
    let h = Arc::new(server(INPUTS, N as u32).await);
    let deltas: Vec<(Parameters, u64)> = (0..N)
        .map(|d| {
            let w = (0..INPUTS)
                .map(|i| ((i * 31 + d * 17) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let p = Parameters::new(vec![
                ("W".into(), Tensor::new(vec![INPUTS, 1], w).unwrap()),
                (
                    "b".into(),
                    Tensor::new(vec![1], vec![d as f32 * 0.01]).unwrap(),
                ),
            ])
            .unwrap();
            (p, 1 + (d as u64 * 7) % 50)
        })
        .collect();
    let deltas = Arc::new(deltas);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..N {
        let (h, deltas) = (h.clone(), deltas.clone());
        set.spawn(async move {
            let a = h.assigned().await;
            let (d, n) = &deltas[i];
            let body = encode(d, 0, *n, None, &a.token);
            let (status, v) = h.upload_raw("1", &a.token, body).await;
            assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{v}");
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let task = &h.server.tasks[0];
    harness::wait_engine_version(task, 1).await;
    let served = task.status().model.params.clone();

    let want = expected_fold(&task.spec().init_params(0), &deltas);
    for ((name, a), (_, b)) in served.iter().zip(want.iter()) {
        for (x, y) in a.data().iter().zip(b.data()) {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "{name}: parallel {x} vs sequential {y}"
            );
        }
    }
}
