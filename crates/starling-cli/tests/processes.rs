//! `starling serve` and `starling device` as separate processes over real HTTP on 127.0.0.1:
//! convergence, crash recovery, and the privacy invariant.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{files_under, http, starling, wait_version, write_config, ServeProcess};
use starling_core::checkpoint;
use starling_core::data::{synthetic_line, to_csv};
use starling_core::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor};

const LINEAR_TASK: &str = r#"
[[tasks]]
name = "linear"
model = "linear"
[tasks.plan]
epochs = 5
batch_size = 10
learning_rate = 0.01
[tasks.rounds]
goal = 3
min = 3
deadline_secs = 60
retry_secs = 0.2
"#;

#[test]
fn serve_and_device_processes_train_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LINEAR_TASK);
    let server = ServeProcess::start(&config, &dir.path().join("data"), "info");
    let devices: Vec<_> = (0..3)
        .map(|i| {
            let lo = -2.0 + 4.0 / 3.0 * i as f32;
            let data = synthetic_line(2.0, 1.0, (lo, lo + 4.0 / 3.0), 60, 0.1, 100 + i);
            let csv = dir.path().join(format!("device{i}.csv"));
            std::fs::write(&csv, to_csv(&data)).unwrap();
            starling()
                .args([
                    "device",
                    "--server",
                    &server.url,
                    "--rounds",
                    "30",
                    "--give-up-after",
                    "20",
                ])
                .arg("--data")
                .arg(&csv)
                .env("STARLING_LOG", "warn")
                .spawn()
                .unwrap()
        })
        .collect();
    for mut d in devices {
        assert!(d.wait().unwrap().success(), "a device failed");
    }
    let task = wait_version(&server.url, "linear", 30);
    let w = task["parameters"]["W"].as_f64().unwrap();
    let b = task["parameters"]["b"].as_f64().unwrap();
    assert!(
        (w - 2.0).abs() < 0.05 && (b - 1.0).abs() < 0.05,
        "W {w}, b {b}"
    );
    let rounds: serde_json::Value = http()
        .get(format!("{}/v1/tasks/linear/rounds", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let rounds = rounds["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 30);
    assert!(rounds
        .iter()
        .all(|r| r["participants"] == 3 && r["status"] == "committed"));
    server.terminate();
}

fn delta(w: &[f32], b: f32) -> Parameters {
    Parameters::new(vec![
        (
            "W".into(),
            Tensor::new(vec![w.len(), 1], w.to_vec()).unwrap(),
        ),
        ("b".into(), Tensor::new(vec![1], vec![b]).unwrap()),
    ])
    .unwrap()
}

/// Checks in and uploads one update; returns the round it went to.
fn contribute(url: &str, task: &str, d: &Parameters, examples: u64) -> u64 {
    let a: serde_json::Value = http()
        .post(format!("{url}/v1/tasks/{task}/checkin"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(a["status"], "assigned", "{a}");
    let round = a["round"].as_u64().unwrap();
    let body = update::encode(
        d,
        &UpdateMeta {
            base_version: a["base_version"].as_u64().unwrap(),
            examples,
            loss: Some(0.125),
            accuracy: None,
            token: a["token"].as_str().unwrap().into(),
        },
    );
    let r = http()
        .post(format!("{url}/v1/tasks/{task}/rounds/{round}/updates"))
        .body(body)
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::ACCEPTED,
        "{}",
        r.text().unwrap()
    );
    round
}

fn model_bytes(url: &str, task: &str) -> (u64, Vec<u8>) {
    let r = http()
        .get(format!("{url}/v1/tasks/{task}/model"))
        .send()
        .unwrap();
    let v = r.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap();
    (v, r.bytes().unwrap().to_vec())
}

const TWO_PER_ROUND: &str = r#"
[[tasks]]
name = "linear"
[tasks.rounds]
goal = 2
min = 2
deadline_secs = 600
"#;

#[test]
fn a_killed_server_restarts_from_the_last_committed_version() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), TWO_PER_ROUND);
    let data = dir.path().join("data");
    let server = ServeProcess::start(&config, &data, "info");
    contribute(&server.url, "linear", &delta(&[-1.0], 0.5), 10);
    contribute(&server.url, "linear", &delta(&[-2.0], 1.5), 30);
    wait_version(&server.url, "linear", 1);
    let (v1, committed) = model_bytes(&server.url, "linear");
    let committed = checkpoint::decode(&committed).unwrap();
    assert_eq!(v1, 1);
    // Round 2 is under way, one update folded in, when the server dies without warning.
    assert_eq!(
        contribute(&server.url, "linear", &delta(&[7.0], 7.0), 10),
        2
    );
    server.kill();

    let server = ServeProcess::start(&config, &data, "info");
    let (v, after) = model_bytes(&server.url, "linear");
    assert_eq!(v, 1, "the last committed version is served");
    assert_eq!(checkpoint::decode(&after).unwrap(), committed);
    // Rounds continue: a fresh round trains version 1 and commits version 2.
    let r = contribute(&server.url, "linear", &delta(&[1.0], 0.0), 10);
    assert!(r >= 3, "the lost round's number is not reused: {r}");
    contribute(&server.url, "linear", &delta(&[3.0], 0.0), 10);
    let t = wait_version(&server.url, "linear", 2);
    // W: 5 + (-1*10 - 2*30)/40 = 3.25 at version 1, then + (1 + 3)/2 = 5.25; the lost round's
    // update (7.0) left no trace.
    assert!(
        (t["parameters"]["W"].as_f64().unwrap() - 5.25).abs() < 1e-6,
        "{t}"
    );
    server.terminate();
}

/// f32 values as the little-endian bytes a file would hold them in.
fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nothing_a_device_uploaded_is_stored_or_logged() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[[tasks]]
name = "wide"
model = "linear"
inputs = 16
[tasks.rounds]
goal = 3
min = 3
"#,
    );
    let data = dir.path().join("data");
    // The most verbose logging there is.
    let server = ServeProcess::start(&config, &data, "trace");
    let uploads: Vec<(Vec<f32>, f32)> = (0..3)
        .map(|d| {
            // Offsets 0, 111, 444: no device's update equals the average of the three.
            let off = 111.0 * (d * d) as f32;
            let w: Vec<f32> = (0..16).map(|i| 1234.5678 + off + 0.37 * i as f32).collect();
            (w, -8765.432 - 9.0 * off)
        })
        .collect();
    for (w, b) in &uploads {
        contribute(&server.url, "wide", &delta(w, *b), 17);
    }
    wait_version(&server.url, "wide", 1);
    let logs = server.terminate();
    assert!(
        logs.contains("round committed"),
        "the logs are captured:\n{logs}"
    );

    let mut haystacks: Vec<(String, Vec<u8>)> = files_under(&data)
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(haystacks.iter().any(|(p, _)| p.ends_with("starling.db")));
    haystacks.push(("server logs".into(), logs.into_bytes()));
    let base = 5.0f32;
    for (w, b) in &uploads {
        // The update itself, and the device's trained parameters (base + update).
        let trained: Vec<f32> = w.iter().map(|v| base + v).collect();
        let needles = [
            le_bytes(w),
            le_bytes(&trained),
            le_bytes(&w[..2]),
            le_bytes(&[*b]),
            le_bytes(&[3.0 + b]),
            format!("{}", w[0]).into_bytes(),
            format!("{}", b).into_bytes(),
        ];
        for (name, hay) in &haystacks {
            for (i, n) in needles.iter().enumerate() {
                assert!(
                    !contains(hay, n),
                    "an individual update's values (needle {i}: {n:?}) are in {name}"
                );
            }
        }
    }
    // The committed average is stored, as it must be: the scan would see it.
    let mean_w0 = base + uploads.iter().map(|(w, _)| w[0]).sum::<f32>() / 3.0;
    assert!(
        haystacks
            .iter()
            .any(|(_, h)| contains(h, &le_bytes(&[mean_w0]))),
        "the scan finds the committed model"
    );
}

/// Cloud platforms (Heroku) tell the server its port in `PORT`.
#[test]
fn serve_listens_on_the_port_in_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = starling();
    cmd.arg("serve")
        .env("PORT", port.to_string())
        .env("STARLING_HOST", "127.0.0.1")
        .env_remove("STARLING_PORT");
    let server = ServeProcess::start_with(cmd, &config, &dir.path().join("data"), "info");
    assert_eq!(server.url, format!("http://127.0.0.1:{port}"));
    let health: serde_json::Value = http()
        .get(format!("{}/v1/health", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["status"], "ok");
    server.terminate();
}

#[test]
fn serve_reports_bad_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[server]\nprot = 3\n");
    let out = starling()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prot"), "{err}");
    let missing = starling()
        .args(["serve", "--config"])
        .arg(Path::new("/nonexistent/starling.toml"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/starling.toml"));
    let _ = Duration::ZERO;
}
