//! Correctness under concurrency, against the real server on 127.0.0.1:0: check-in storms
//! and parallel uploads. (Speed is measured by `starling bench`, not here.)

use std::sync::Arc;

use serde_json::Value;
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor, WeightedSum};
use starling_server::settings::{RoundPolicy, TaskSettings};
use starling_server::Settings;

async fn server(inputs: usize, goal: u32) -> (starling_server::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.data_dir = dir.path().to_path_buf();
    // Every client of these tests is 127.0.0.1: lift the per-address limits, which are not
    // what is tested here.
    settings.server.max_connections_per_address = 4096;
    settings.server.max_connections = 4096;
    settings.server.max_uploads_in_flight = 1024;
    settings.tasks = vec![TaskSettings {
        min_cohort: 1,
        max_assignments_per_address: 100_000,
        inputs,
        rounds: RoundPolicy {
            goal,
            min: goal,
            deadline_secs: 600.0,
            overcommit: 1.0,
            retry_secs: 2.0,
        },
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (
        starling_server::spawn(settings, listener).await.unwrap(),
        dir,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_check_ins_all_get_an_answer() {
    let (s, _dir) = server(1, 100).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tasks/linear/checkin", s.url());
    let mut set = tokio::task::JoinSet::new();
    for i in 0..2000 {
        let (http, url) = (http.clone(), url.clone());
        set.spawn(async move {
            let r = http
                .post(&url)
                .json(&serde_json::json!({"device": format!("d{i}")}))
                .send()
                .await
                .expect("every request is answered");
            assert_eq!(r.status(), reqwest::StatusCode::OK);
            r.json::<Value>().await.unwrap()
        });
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
    let (s, _dir) = server(INPUTS, N as u32).await;
    let http = reqwest::Client::new();
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
        let (http, url, deltas) = (http.clone(), s.url(), deltas.clone());
        set.spawn(async move {
            let a: Value = http
                .post(format!("{url}/v1/tasks/linear/checkin"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(a["status"], "assigned", "{a}");
            let (d, n) = &deltas[i];
            let token = a["token"].as_str().unwrap();
            let body = update::encode(
                d,
                &UpdateMeta {
                    base_version: 0,
                    examples: *n,
                    loss: None,
                    accuracy: None,
                    token: token.into(),
                },
            );
            let r = http
                .post(format!("{url}/v1/tasks/linear/rounds/1/updates"))
                .header("x-starling-token", token)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let mut st = s.tasks[0].subscribe();
    st.wait_for(|s| s.model.version == 1).await.unwrap();
    let served = s.tasks[0].status().model.params.clone();

    let spec = s.tasks[0].spec().clone();
    let layout = spec.layout();
    let mut seq = WeightedSum::new(&layout);
    for (d, n) in deltas.iter() {
        let body = update::encode(
            d,
            &UpdateMeta {
                base_version: 0,
                examples: *n,
                loss: None,
                accuracy: None,
                token: String::new(),
            },
        );
        seq.accept(&update::check(body, &update::Rules::lenient(&layout)).unwrap());
    }
    let want = seq.finish(&spec.init_params(0)).unwrap();
    for ((name, a), (_, b)) in served.iter().zip(want.iter()) {
        for (x, y) in a.data().iter().zip(b.data()) {
            assert!(
                (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                "{name}: parallel {x} vs sequential {y}"
            );
        }
    }
}
