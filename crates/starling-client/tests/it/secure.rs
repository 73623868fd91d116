//! `starling device` in secure rounds (`[tasks.secure_aggregation]`): several real devices
//! against a real server on 127.0.0.1 go through the four steps over HTTP and the round
//! commits the model plain FedAvg of their updates makes, within the quantisation error; with
//! `[tasks.privacy]` too (distributed DP) the devices add the noise and the ledger records it.

use std::ops::ControlFlow;
use std::time::Duration;

use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::synthetic_line;
use starling_core::trainer::builtin;
use starling_core::trainer::train::{self, Progress};
use starling_core::wire::update;
use starling_core::{Model, Parameters};
use starling_server::settings::{
    PrivacyPolicy, RoundPolicy, SecureAggregationPolicy, TaskSettings,
};
use starling_server::store::RoundStatus;
use starling_server::Settings;
use tokio::net::TcpListener;

const DEVICES: usize = 5;
const CAP: u64 = 40;

fn settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.server.data_dir = dir.to_path_buf();
    s.tasks = vec![TaskSettings {
        rounds: RoundPolicy {
            goal: DEVICES as u32,
            min: DEVICES as u32,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        min_cohort: DEVICES as u32,
        max_assignments_per_address: 100,
        max_examples_per_update: CAP,
        secure_aggregation: Some(SecureAggregationPolicy {
            clip: 10.0,
            ..SecureAggregationPolicy::default()
        }),
        ..TaskSettings::default()
    }];
    s
}

fn data(i: usize) -> starling_core::Dataset {
    synthetic_line(2.0, 1.0, (0.0, 1.0), 20 + 5 * i, 0.1, i as u64 + 1)
}

/// What plain FedAvg of the devices' updates (trained here exactly as the devices train)
/// makes of `base`.
fn plain_fedavg(base: &Parameters) -> Vec<f64> {
    let spec = builtin::linear(1, 1);
    let model = Model::new(spec.clone()).unwrap();
    let plan = builtin::default_plan(&spec.name);
    let layout = spec.layout();
    let mut sum = vec![0.0f64; layout.numel()];
    let mut weight = 0.0;
    for i in 0..DEVICES {
        let (body, _) = train::local_update(
            &model,
            base,
            &data(i),
            &plan,
            0,
            String::new(),
            |_: Progress| ControlFlow::<()>::Continue(()),
        )
        .unwrap();
        let view = update::decode(&body, &layout, None).unwrap();
        let w = view.meta.examples.min(CAP) as f64;
        weight += w;
        let values = view
            .tensors
            .iter()
            .flat_map(|t| starling_core::wire::params::f32s_from_le(t));
        for (s, v) in sum.iter_mut().zip(values) {
            *s += w * f64::from(v);
        }
    }
    base.iter()
        .flat_map(|(_, t)| t.data().iter().map(|&v| f64::from(v)))
        .zip(&sum)
        .map(|(b, s)| b + s / weight)
        .collect()
}

/// Every device contributes once (as `starling device --rounds 1` does); returns the task's
/// status once the round has committed version 1.
async fn one_round(
    server: &starling_server::Running,
    url: &str,
) -> starling_server::engine::TaskStatus {
    let runs: Vec<_> = (0..DEVICES)
        .map(|i| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut device = Device::new(
                    HttpTransport::new(&url),
                    data(i),
                    DeviceOptions {
                        rounds: Some(1),
                        give_up_after: Some(Duration::from_secs(20)),
                        request_timeout: Duration::from_secs(5),
                        ..DeviceOptions::default()
                    },
                );
                device.run(|_| {}).await
            })
        })
        .collect();
    for r in runs {
        assert_eq!(r.await.unwrap().unwrap().contributions, 1);
    }
    let mut st = server.tasks[0].subscribe();
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        st.wait_for(|s| s.model.version == 1),
    )
    .await
    .expect("the secure round committed")
    .unwrap()
    .clone();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_commit_a_secure_round_over_http_like_plain_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(dir.path()), listener)
        .await
        .unwrap();
    let base = server.tasks[0].status().model.params.clone();
    let url = server.url();
    let status = one_round(&server, &url).await;
    let record = status.last_round.unwrap();
    assert_eq!(record.status, RoundStatus::Committed);
    assert_eq!(record.participants, DEVICES as u64);
    let expected = plain_fedavg(&base);
    let got: Vec<f64> = status
        .model
        .params
        .iter()
        .flat_map(|(_, t)| t.data().iter().map(|&v| f64::from(v)))
        .collect();
    // Each device's values within one level of clip / (2^15 - 1), its weight within one
    // level of 1: the mean moves by at most a few such levels.
    let level = 10.0 / 32767.0;
    for (e, g) in expected.iter().zip(&got) {
        assert!((e - g).abs() < 4.0 * level, "{e} vs {g}");
    }
    assert!(
        (got[0] - 5.0).abs() > 100.0 * level,
        "the model moved: {got:?}"
    );
    server.stop().await.unwrap();
}

/// Distributed DP over HTTP: the check-in's assignment carries the Skellam noise, the native
/// devices add it, the round commits with a model off plain FedAvg by about the noise, and
/// `GET /v1/tasks/{task}/privacy` reports the Skellam mechanism, its ledger entry and ε.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_add_the_distributed_noise_and_the_ledger_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.tasks[0].privacy = Some(PrivacyPolicy {
        clip: 10.0,
        noise_multiplier: 1.0,
        population: 100,
        epsilon: 50.0,
        delta: 1e-5,
        target_quantile: None,
        clip_learning_rate: 0.2,
        count_noise: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(s, listener).await.unwrap();
    let url = server.url();
    let status = one_round(&server, &url).await;
    let record = status.last_round.unwrap();
    assert_eq!(record.status, RoundStatus::Committed);
    assert_eq!(record.mean_loss, None, "no un-noised loss is published");
    let name = server.tasks[0].name().to_string();
    let ledger: serde_json::Value = reqwest::get(format!("{url}/v1/tasks/{name}/privacy"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ledger["mechanism"], "skellam", "{ledger}");
    let entry = &ledger["ledger"][0];
    assert_eq!(entry["mechanism"], "skellam", "{ledger}");
    assert!((entry["noise_multiplier"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    let spent = ledger["epsilon_spent"].as_f64().unwrap();
    assert!(spent > 0.0 && spent <= 50.0, "{ledger}");
    assert!((entry["epsilon"].as_f64().unwrap() - spent).abs() < 1e-12);
    server.stop().await.unwrap();
}
