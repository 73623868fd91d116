//! TensorBoard event files of the round history (`server.tensorboard_dir`), read back with
//! TensorBoard's own reader (Python's `tensorboard` package in `target/tb-venv`, which
//! `scripts/setup.sh` installs, through `scripts/tensorboard-scalars.py`): every closed
//! round's scalars at its step equal the round records the server serves, over HTTP and
//! through the engine; each round is in the file as soon as it closes; abandoned and private
//! rounds give their tags; a restarted writer's fresh file shows each round once; and a
//! folder that cannot be written does not stop the rounds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use starling_core::wire::protocol::TOKEN_HEADER;
use starling_core::wire::update::{self, UpdateMeta};
use starling_server::engine::{Caller, CheckIn, TaskHandle, VirtualClock};
use starling_server::settings::{PrivacyPolicy, RoundPolicy, TaskSettings};
use starling_server::store::{RoundRecord, RoundStatus, Store};
use starling_server::tensorboard::Writers;

use crate::harness::{self, delta, encode, STUCK};

/// A run as TensorBoard shows it: tag -> (step, wall time in ms, value) in order.
type Run = BTreeMap<String, Vec<(u64, i64, f32)>>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What TensorBoard reads from the run folder `dir`.
async fn tensorboard_reads(dir: &Path) -> Run {
    let python = repo().join("target/tb-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh, which installs TensorBoard for these tests",
        python.display()
    );
    let script = repo().join("scripts/tensorboard-scalars.py");
    let dir = dir.to_path_buf();
    let out =
        tokio::task::spawn_blocking(move || Command::new(python).arg(script).arg(dir).output())
            .await
            .unwrap()
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // "brain.Event:2", as TensorBoard parses it.
    assert_eq!(v["file_version"], json!(2.0), "{v}");
    v["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().unwrap(),
                        (p[1].as_f64().unwrap() * 1000.0).round() as i64,
                        p[2].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

/// What TensorBoard must show for these round records, as the API serves them: step = the
/// round number, wall time = its end, and per kind of round the tags of the table in
/// `tensorboard.rs` (as TensorBoard's `float` values).
fn expected(records: &[Value]) -> Run {
    let mut run = Run::new();
    for r in records {
        let step = r["round"].as_u64().unwrap();
        let ended = r["ended_at_ms"].as_i64().unwrap();
        let mut put = |tag: &str, value: &Value| {
            if let Some(x) = value.as_f64() {
                run.entry(tag.into())
                    .or_default()
                    .push((step, ended, x as f32));
            }
        };
        match r["status"].as_str().unwrap() {
            "committed" => {
                put("train/loss", &r["mean_loss"]);
                put("train/accuracy", &r["mean_accuracy"]);
                put("round/participants", &r["participants"]);
                if r["privacy"].is_null() {
                    put("round/examples", &r["examples"]);
                }
                put("round/commit_ms", &r["commit_ms"]);
                put("privacy/epsilon", &r["privacy"]["epsilon"]);
            }
            "evaluated" => {
                put("eval/loss", &r["mean_loss"]);
                put("eval/accuracy", &r["mean_accuracy"]);
            }
            "abandoned" => put("round/abandoned", &json!(1.0)),
            other => panic!("unknown status {other}"),
        }
    }
    run
}

fn as_json(records: &[RoundRecord]) -> Vec<Value> {
    records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap())
        .collect()
}

/// The event files in a run folder.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
    }
    files
}

/// Waits on the engine until the round `round` has closed; its record.
async fn wait_closed(task: &TaskHandle, round: u64) -> RoundRecord {
    let mut rx = task.subscribe();
    let st = tokio::time::timeout(
        STUCK,
        rx.wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round >= round)),
    )
    .await
    .unwrap_or_else(|_| panic!("round {round} never closed"))
    .unwrap()
    .clone();
    st.last_round.unwrap()
}

/// Waits until the writers say round `round` of `task` is in its file.
async fn wait_written(writers: &Writers, task: &str, round: u64) {
    let mut written = writers.written(task).expect("a writer follows the task");
    tokio::time::timeout(STUCK, written.wait_for(|w| *w >= Some(round)))
        .await
        .unwrap_or_else(|_| panic!("round {round} of {task} was never written"))
        .unwrap();
}

/// The open round of `task` with `n` devices, each uploading an update with training loss
/// `loss`; returns the round's number (it closes once all have uploaded, at its goal).
async fn upload_round(task: &TaskHandle, n: usize, loss: f32) -> u64 {
    let round = task.status().round.round;
    let version = task.status().model.version;
    let answers = task
        .check_in_many(
            (0..n)
                .map(|i| Caller::device(format!("r{round}d{i}")))
                .collect(),
        )
        .await
        .unwrap();
    let uploads = answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| match a {
            CheckIn::Assigned(a) => {
                let x = 0.25 * (i as f32 + 1.0);
                encode(&delta(x, -x), version, 3 + i as u64, Some(loss), &a.token).into()
            }
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect();
    for r in task.upload_many(round, uploads).await {
        r.unwrap();
    }
    round
}

/// A plain task named `name`: rounds of two (both needed), a 60-second deadline.
fn plain_task(name: &str) -> TaskSettings {
    TaskSettings {
        name: name.into(),
        ..harness::small_task(RoundPolicy {
            overcommit: 1.0,
            ..harness::policy(2, 2, 60.0)
        })
    }
}

/// A task under differential privacy with rounds of three and a budget that is not spent
/// in these tests.
fn private_task(name: &str) -> TaskSettings {
    TaskSettings {
        name: name.into(),
        rounds: harness::policy(3, 3, 600.0),
        min_cohort: 3,
        max_assignments_per_address: 100,
        privacy: Some(PrivacyPolicy {
            clip: 1.0,
            noise_multiplier: 1.0,
            population: 30,
            epsilon: 50.0,
            delta: 1e-3,
            target_quantile: None,
            clip_learning_rate: 0.2,
            count_noise: None,
        }),
        ..TaskSettings::default()
    }
}

/// `starling serve --tensorboard DIR` end to end: a real server commits training rounds and
/// records an evaluation round over HTTP; after it stops, TensorBoard reads from
/// `DIR/linear/` exactly the round history `GET /v1/tasks/linear/rounds` served.
#[tokio::test]
async fn the_event_file_holds_the_rounds_the_api_serves() {
    let tb = tempfile::tempdir().unwrap();
    let tb_dir = tb.path().to_path_buf();
    let task = TaskSettings {
        evaluate_every: 1,
        ..harness::small_task(harness::policy(2, 2, 600.0))
    };
    let h = harness::start(task, move |s| s.tensorboard_dir = Some(tb_dir)).await;
    let engine = h.server.tasks[0].clone();

    let train = |loss: f32, accuracy: f32| {
        let h = &h;
        async move {
            let mut round = 0;
            for examples in [4, 6] {
                let a = h.assigned().await;
                round = a.round;
                let body = update::encode(
                    &delta(0.5, 0.25),
                    &UpdateMeta {
                        base_version: a.base_version,
                        examples,
                        loss: Some(loss + examples as f32),
                        accuracy: Some(accuracy),
                        token: a.token.clone(),
                    },
                );
                let r = h
                    .post(&a.upload_url)
                    .header(TOKEN_HEADER, &a.token)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
            }
            round
        }
    };
    let evaluate = |loss: f64| {
        let h = &h;
        async move {
            let mut round = 0;
            for (device, examples) in [("e1", 12), ("e2", 4)] {
                let answer = h.check_in_device(device).await;
                assert_eq!(answer["kind"], "evaluation", "{answer}");
                round = answer["round"].as_u64().unwrap();
                let r = h
                    .post(answer["upload_url"].as_str().unwrap())
                    .header(TOKEN_HEADER, answer["token"].as_str().unwrap())
                    .json(&json!({
                        "base_version": answer["base_version"],
                        "examples": examples,
                        "loss": loss,
                        "accuracy": 0.5,
                    }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
            }
            round
        }
    };
    let r1 = train(1.5, 0.25).await;
    wait_closed(&engine, r1).await;
    let r2 = evaluate(0.75).await;
    wait_closed(&engine, r2).await;
    let r3 = train(0.5, 0.75).await;
    wait_closed(&engine, r3).await;
    assert_eq!((r1, r2, r3), (1, 2, 3));

    let history = h.get_json("/v1/tasks/linear/rounds").await;
    let records = history["rounds"].as_array().unwrap().clone();
    assert_eq!(records.len(), 3, "{history}");
    h.server.stop().await.unwrap();

    let run_dir = tb.path().join("linear");
    assert_eq!(event_files(&run_dir).len(), 1);
    let run = tensorboard_reads(&run_dir).await;
    assert_eq!(run, expected(&records));
    // The table's tags are all there, at the rounds they belong to.
    let steps = |tag: &str| -> Vec<u64> { run[tag].iter().map(|p| p.0).collect() };
    for tag in [
        "train/loss",
        "train/accuracy",
        "round/participants",
        "round/examples",
        "round/commit_ms",
    ] {
        assert_eq!(steps(tag), [1, 3], "{tag}");
    }
    assert_eq!(steps("eval/loss"), [2]);
    assert_eq!(
        run["eval/accuracy"],
        [(2, records[1]["ended_at_ms"].as_i64().unwrap(), 0.5)]
    );
    assert_eq!(run["round/participants"][0].2, 2.0);
    assert_eq!(run["round/examples"][0].2, 10.0);
}

/// Through the engine on a virtual clock: each round is in the file (flushed) as soon as it
/// closes, with the server still running; an abandoned round gives `round/abandoned`, a
/// private one `privacy/epsilon` and no device statistics; and writers started again (a
/// restarted server) write the whole history into a fresh file, which TensorBoard reads
/// with the old one as each round once.
#[tokio::test]
async fn rounds_are_written_as_they_close_and_a_restart_rewrites_the_history() {
    let store = Store::open_memory().await.unwrap();
    let clock = VirtualClock::new();
    let plain =
        harness::spawn_on(plain_task("plain"), store.clone(), Arc::new(clock.clone())).await;
    let private = harness::spawn_on(
        private_task("private"),
        store.clone(),
        Arc::new(clock.clone()),
    )
    .await;
    let tb = tempfile::tempdir().unwrap();
    let tasks = [plain.clone(), private.clone()];
    let writers = Writers::spawn(Some(tb.path()), &tasks, &store);
    let records = |task: &'static str| {
        let store = store.clone();
        async move { as_json(&store.rounds(task).await.unwrap()) }
    };

    // A committed round is readable while the server runs.
    let r1 = upload_round(&plain, 2, 0.75).await;
    wait_closed(&plain, r1).await;
    wait_written(&writers, "plain", r1).await;
    let run = tensorboard_reads(&tb.path().join("plain")).await;
    assert_eq!(run, expected(&records("plain").await));
    assert_eq!(run["train/loss"].len(), 1);

    // One update of the two needed: the deadline passes on the engine's clock.
    let round = plain.status().round.round;
    let answers = plain
        .check_in_many(vec![Caller::device("late")])
        .await
        .unwrap();
    let CheckIn::Assigned(a) = &answers[0] else {
        panic!("not assigned: {answers:?}");
    };
    plain
        .upload(
            round,
            encode(&delta(1.0, 1.0), 1, 3, Some(0.5), &a.token).into(),
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(61));
    let abandoned = wait_closed(&plain, round).await;
    assert_eq!(abandoned.status, RoundStatus::Abandoned);
    let r3 = upload_round(&plain, 2, 0.25).await;
    wait_closed(&plain, r3).await;
    for _ in 0..2 {
        let r = upload_round(&private, 3, 0.5).await;
        wait_closed(&private, r).await;
    }
    writers.stop().await;

    let run = tensorboard_reads(&tb.path().join("plain")).await;
    assert_eq!(run, expected(&records("plain").await));
    assert_eq!(
        run["round/abandoned"],
        [(2, abandoned.ended_at_ms, 1.0)],
        "{run:?}"
    );
    let private_run = tensorboard_reads(&tb.path().join("private")).await;
    assert_eq!(private_run, expected(&records("private").await));
    assert_eq!(private_run["privacy/epsilon"].len(), 2);
    assert!(private_run["privacy/epsilon"][1].2 > private_run["privacy/epsilon"][0].2);
    for hidden in ["train/loss", "round/examples"] {
        assert!(
            !private_run.contains_key(hidden),
            "{hidden}: {private_run:?}"
        );
    }

    // A round closes while no writer runs; writers started again write everything anew.
    let r4 = upload_round(&plain, 2, 0.125).await;
    wait_closed(&plain, r4).await;
    let writers = Writers::spawn(Some(tb.path()), &tasks, &store);
    wait_written(&writers, "plain", r4).await;
    writers.stop().await;
    assert_eq!(event_files(&tb.path().join("plain")).len(), 2);
    let run = tensorboard_reads(&tb.path().join("plain")).await;
    let all = records("plain").await;
    assert_eq!(all.len(), 4);
    assert_eq!(run, expected(&all));
    assert_eq!(run["train/loss"].len(), 3, "each round once: {run:?}");
}

/// A folder that cannot be written (here a file stands where it should be) costs the event
/// file, not the server: rounds still close and commit, and stopping the writers returns.
#[tokio::test]
async fn a_folder_that_cannot_be_written_does_not_stop_the_rounds() {
    let store = Store::open_memory().await.unwrap();
    let clock = VirtualClock::new();
    let task = harness::spawn_on(plain_task("plain"), store.clone(), Arc::new(clock)).await;
    let tmp = tempfile::tempdir().unwrap();
    let not_a_folder = tmp.path().join("file");
    std::fs::write(&not_a_folder, b"").unwrap();
    let writers = Writers::spawn(Some(&not_a_folder), std::slice::from_ref(&task), &store);
    for _ in 0..2 {
        let r = upload_round(&task, 2, 0.5).await;
        let record = wait_closed(&task, r).await;
        assert_eq!(record.status, RoundStatus::Committed);
    }
    let written = writers.written("plain").unwrap();
    writers.stop().await;
    assert_eq!(*written.borrow(), None, "nothing could be written");
    assert_eq!(task.status().model.version, 2);
}
