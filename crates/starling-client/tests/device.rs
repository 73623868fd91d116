//! The device runtime against the real server on 127.0.0.1.

use std::time::Duration;

use starling_client::device::DeviceEvent;
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::synthetic_line;
use starling_server::settings::{RoundPolicy, TaskSettings};
use starling_server::Settings;

fn settings(dir: &std::path::Path, goal: u32) -> Settings {
    let mut s = Settings::default();
    s.server.data_dir = dir.to_path_buf();
    s.tasks = vec![TaskSettings {
        rounds: RoundPolicy {
            goal,
            min: goal,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        ..TaskSettings::default()
    }];
    s
}

fn options(rounds: u64) -> DeviceOptions {
    DeviceOptions {
        rounds: Some(rounds),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        give_up_after: Some(Duration::from_secs(20)),
        ..DeviceOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_retries_until_the_server_comes_up() {
    // A port with nobody listening yet.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let data = synthetic_line(2.0, 1.0, (0.0, 1.0), 30, 0.1, 1);
    let mut device = Device::new(
        HttpTransport::new(&format!("http://{addr}")),
        data,
        options(1),
    );
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    let run = tokio::spawn(async move {
        device
            .run(move |e| seen.lock().unwrap().push(e.clone()))
            .await
    });

    tokio::time::sleep(Duration::from_millis(600)).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let server = starling_server::spawn(settings(dir.path(), 1), listener)
        .await
        .unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.contributions, 1);
    let events = events.lock().unwrap().clone();
    let unreachable = events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Unreachable { .. }))
        .count();
    assert!(
        unreachable >= 2,
        "the device retried while the server was down: {events:?}"
    );
    // Back-off: the delays grow.
    let delays: Vec<Duration> = events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Unreachable { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .collect();
    assert!(delays.last() > delays.first(), "{delays:?}");
    let mut st = server.tasks[0].subscribe();
    st.wait_for(|s| s.model.version == 1).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gives_up_when_the_server_never_comes() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let data = synthetic_line(2.0, 1.0, (0.0, 1.0), 10, 0.1, 1);
    let mut o = options(1);
    o.give_up_after = Some(Duration::from_millis(300));
    let mut device = Device::new(HttpTransport::new(&format!("http://{addr}")), data, o);
    let err = device.run(|_| {}).await.unwrap_err();
    assert!(err.to_string().contains("gave up"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_that_does_not_fit_the_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(dir.path(), 1), listener)
        .await
        .unwrap();
    // Two feature columns for a model with one input.
    let data = starling_core::Dataset::new(vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 2.0], 2, 1).unwrap();
    let mut device = Device::new(HttpTransport::new(&server.url()), data, options(1));
    let err = device.run(|_| {}).await.unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert_eq!(server.tasks[0].status().round.updates, 0);
    server.stop().await.unwrap();
}
