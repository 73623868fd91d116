//! `--tensorboard DIR` of `starling simulate` and `starling serve`, read back with
//! TensorBoard's own reader (Python's `tensorboard` package in `target/tb-venv`, which
//! `scripts/setup.sh` installs, through `scripts/tensorboard-scalars.py`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::{starling, write_config, ServeProcess};

/// A run as TensorBoard shows it: tag -> (step, wall time in seconds, value) in order.
type Run = BTreeMap<String, Vec<(u64, f64, f32)>>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What TensorBoard reads from the run folder `dir`.
fn tensorboard_reads(dir: &Path) -> Run {
    let python = repo().join("target/tb-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh, which installs TensorBoard for these tests",
        python.display()
    );
    let out = Command::new(python)
        .arg(repo().join("scripts/tensorboard-scalars.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["file_version"], 2.0, "{v}");
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
                        p[1].as_f64().unwrap(),
                        p[2].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

/// Tags and (step, value) pairs, wall times left out.
fn points(run: &Run) -> BTreeMap<String, Vec<(u64, f32)>> {
    run.iter()
        .map(|(tag, p)| (tag.clone(), p.iter().map(|&(s, _, v)| (s, v)).collect()))
        .collect()
}

/// Two classes in 4 dimensions, the class in the last column: `n` rows from a fixed
/// sequence.
fn csv(n: usize, offset: usize) -> String {
    let mut out = String::new();
    for i in offset..offset + n {
        let class = i % 2;
        let x = |j: usize| ((i * 7 + j * 13) % 10) as f32 / 10.0 + class as f32;
        writeln!(out, "{},{},{},{},{class}", x(0), x(1), x(2), x(3)).unwrap();
    }
    out
}

/// `starling simulate --tensorboard DIR`: TensorBoard reads from DIR the rounds
/// `results.json` reports, under the server's tags (the test set's evaluation as `eval/*`),
/// stamped with the time they ran.
#[test]
fn simulate_writes_the_rounds_results_json_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, test) = (tmp.path().join("train.csv"), tmp.path().join("test.csv"));
    std::fs::write(&train, csv(200, 0)).unwrap();
    std::fs::write(&test, csv(50, 1000)).unwrap();
    let (tb, out) = (tmp.path().join("runs/fedavg"), tmp.path().join("out"));
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let run = starling()
        .args(["simulate", "--dataset", "csv", "--train"])
        .arg(&train)
        .arg("--test")
        .arg(&test)
        .args([
            "--model",
            "logistic",
            "--devices",
            "5",
            "--per-round",
            "5",
            "--rounds",
            "3",
            "--eval-every",
            "2",
            "--json",
            "--tensorboard",
        ])
        .arg(&tb)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let results: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rounds = results["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let mut expected: BTreeMap<String, Vec<(u64, f32)>> = BTreeMap::new();
    for r in rounds {
        let step = r["round"].as_u64().unwrap();
        let mut put = |tag: &str, v: &Value| {
            if let Some(x) = v.as_f64() {
                expected
                    .entry(tag.into())
                    .or_default()
                    .push((step, x as f32));
            }
        };
        if r["committed"].as_bool().unwrap() {
            put("train/loss", &r["train_loss"]);
            put("train/accuracy", &r["train_accuracy"]);
            put("round/participants", &r["reported"]);
            put("round/examples", &r["examples"]);
        } else {
            put("round/abandoned", &1.0.into());
        }
        put("eval/loss", &r["test_loss"]);
        put("eval/accuracy", &r["test_accuracy"]);
        put("sim/virtual_secs", &r["virtual_secs"]);
    }
    let files: Vec<_> = std::fs::read_dir(&tb).unwrap().collect();
    assert_eq!(files.len(), 1, "one event file in the run folder");
    let seen = tensorboard_reads(&tb);
    assert_eq!(points(&seen), expected);
    let steps = |tag: &str| -> Vec<u64> { expected[tag].iter().map(|p| p.0).collect() };
    assert_eq!(steps("train/loss"), [1, 2, 3]);
    assert_eq!(
        steps("eval/accuracy"),
        [2, 3],
        "every 2nd round and the last"
    );
    for (_, wall, _) in seen.values().flatten() {
        assert!(
            (before - 1.0..=after + 1.0).contains(wall),
            "{wall} not in {before}..{after}"
        );
    }
}

/// `starling serve --tensorboard DIR` writes each task's history into `DIR/<task>/` from
/// the start (none closed yet: no scalars), a task created through the admin API included.
#[test]
fn serve_writes_an_event_file_per_task() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "[[tasks]]\nname = \"alpha\"\nadmission = \"open\"\n\n[[tasks]]\nname = \"beta\"\nadmission = \"open\"\n",
    );
    let tb = tmp.path().join("tb");
    let mut cmd = starling();
    cmd.args(["serve", "--port", "0", "--tensorboard"])
        .arg(&tb)
        .env_remove("PORT")
        .env_remove("STARLING_PORT")
        .env_remove("STARLING_TENSORBOARD_DIR");
    cmd.env("STARLING_ADMIN_TOKEN", "tensorboard-admin-token-01");
    let server = ServeProcess::start_with(cmd, &config, &tmp.path().join("data"), "info");
    // A task created at run time is followed too.
    let created = crate::common::http()
        .post(format!("{}/v1/admin/tasks", server.url))
        .header("x-starling-admin-token", "tensorboard-admin-token-01")
        .body("name = \"gamma\"\nadmission = \"open\"\n")
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let log = server.terminate();
    for task in ["alpha", "beta", "gamma"] {
        let files: Vec<_> = std::fs::read_dir(tb.join(task)).unwrap().collect();
        assert_eq!(files.len(), 1, "{task}: {log}");
        assert!(tensorboard_reads(&tb.join(task)).is_empty());
    }
    assert!(log.contains("TensorBoard events"), "{log}");
}
