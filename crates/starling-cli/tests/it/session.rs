//! `starling device --state-dir` as separate processes against a real `starling serve`: a
//! device stopped after every step (one process per step: check in, download, train,
//! upload) delivers the update an uninterrupted device delivers; a device that is not
//! charging sends no check-in to a task that requires charging.

use std::path::Path;

use starling_core::data::{synthetic_line, to_csv};
use starling_core::wire::checkpoint;

use crate::common::{get_json, http, starling, wait_version, write_config, ServeProcess};

const TASK: &str = r#"
[[tasks]]
name = "linear"
admission = "open"
# Rounds of one device: a test, said explicitly.
min_cohort = 1
max_assignments_per_address = 100
[tasks.plan]
epochs = 3
batch_size = 5
learning_rate = 0.05
seed = 11
[tasks.rounds]
goal = 1
min = 1
"#;

fn serve(dir: &Path, settings: &str) -> ServeProcess {
    std::fs::create_dir_all(dir).unwrap();
    let config = write_config(dir, settings);
    ServeProcess::start(&config, &dir.join("data"), "info")
}

fn device(url: &str, csv: &Path, state: &Path) -> std::process::Command {
    let mut cmd = starling();
    cmd.args(["device", "--server", url, "--data"])
        .arg(csv)
        .arg("--state-dir")
        .arg(state)
        .env("STARLING_LOG", "warn");
    cmd
}

/// One `--step` process; its outcome.
fn step(url: &str, csv: &Path, state: &Path, extra: &[&str]) -> serde_json::Value {
    let out = device(url, csv, state)
        .arg("--step")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn committed(url: &str) -> starling_core::Parameters {
    let body = http()
        .get(format!("{url}/v1/tasks/linear/model"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    checkpoint::decode(&body).unwrap().params
}

#[test]
fn a_device_stopped_after_every_step_resumes_in_new_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("points.csv");
    std::fs::write(
        &csv,
        to_csv(&synthetic_line(2.0, 1.0, (-1.0, 1.0), 30, 0.1, 5)),
    )
    .unwrap();

    // Uninterrupted.
    let a = serve(&tmp.path().join("a"), TASK);
    let status = device(&a.url, &csv, &tmp.path().join("state-a"))
        .args(["--rounds", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    wait_version(&a.url, "linear", 1);

    // One process per step.
    let b = serve(&tmp.path().join("b"), TASK);
    let state = tmp.path().join("state-b");
    let outcomes: Vec<String> = (0..4)
        .map(|_| {
            step(&b.url, &csv, &state, &[])["outcome"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(outcomes, ["assigned", "downloaded", "trained", "delivered"]);
    wait_version(&b.url, "linear", 1);
    assert_eq!(committed(&a.url), committed(&b.url), "the same update");
    let session: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("session.json")).unwrap()).unwrap();
    assert_eq!(session["step"]["step"], "idle", "{session}");
}

#[test]
fn a_device_that_is_not_charging_does_not_check_in_to_a_task_that_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("points.csv");
    std::fs::write(
        &csv,
        to_csv(&synthetic_line(2.0, 1.0, (-1.0, 1.0), 10, 0.1, 5)),
    )
    .unwrap();
    let settings = format!("{TASK}[tasks.plan.requires]\ncharging = true\n");
    let server = serve(tmp.path(), &settings);
    let state = tmp.path().join("state");
    let out = step(&server.url, &csv, &state, &["--charging", "false"]);
    assert_eq!(out["outcome"], "not_eligible", "{out}");
    assert!(
        out["reason"].as_str().unwrap().contains("charging"),
        "{out}"
    );
    let task = get_json(&format!("{}/v1/tasks/linear", server.url));
    assert_eq!(task["round"]["assigned"], 0, "{task}");
    assert_eq!(task["plan"]["requires"]["charging"], true, "{task}");
    // Plugged in, it checks in.
    let out = step(&server.url, &csv, &state, &["--charging", "true"]);
    assert_eq!(out["outcome"], "assigned", "{out}");
}

/// The examples each committed round was trained on, oldest round first.
fn round_examples(url: &str) -> Vec<u64> {
    let rounds = get_json(&format!("{url}/v1/tasks/linear/rounds"));
    let mut list: Vec<(u64, u64)> = rounds["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "committed")
        .map(|r| {
            (
                r["round"].as_u64().unwrap(),
                r["examples"].as_u64().unwrap(),
            )
        })
        .collect();
    list.sort_unstable();
    list.into_iter().map(|(_, e)| e).collect()
}

#[test]
fn a_storage_budget_keeps_the_newest_examples_and_training_uses_them() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(&tmp.path().join("server"), TASK);
    let state = tmp.path().join("state");
    // The linear task's examples are 1 feature and 1 target: 8 bytes each, after a 16-byte
    // header. Room for 40.
    let budget = (16 + 8 * 40).to_string();
    let first = tmp.path().join("first.csv");
    std::fs::write(
        &first,
        to_csv(&synthetic_line(2.0, 1.0, (-1.0, 1.0), 30, 0.1, 5)),
    )
    .unwrap();
    // One process per step, each given the same file: it is stored once.
    let outcomes: Vec<String> = (0..4)
        .map(|_| {
            step(&server.url, &first, &state, &["--storage-budget", &budget])["outcome"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(outcomes, ["assigned", "downloaded", "trained", "delivered"]);
    wait_version(&server.url, "linear", 1);
    assert_eq!(round_examples(&server.url), [30]);

    // Twenty new examples: the ten oldest make room, and the next update counts forty.
    let second = tmp.path().join("second.csv");
    std::fs::write(
        &second,
        to_csv(&synthetic_line(2.0, 1.0, (1.0, 2.0), 20, 0.1, 6)),
    )
    .unwrap();
    let status = device(&server.url, &second, &state)
        .args(["--rounds", "1", "--storage-budget", &budget])
        .status()
        .unwrap();
    assert!(status.success());
    wait_version(&server.url, "linear", 2);
    assert_eq!(round_examples(&server.url), [30, 40]);
    let stored = std::fs::metadata(state.join("examples.bin")).unwrap().len();
    assert_eq!(stored, 16 + 8 * 40);

    // A budget too small for one example is refused with a message.
    let out = device(&server.url, &second, &tmp.path().join("tiny"))
        .args(["--step", "--storage-budget", "20"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("cannot hold one example"), "{message}");
}
