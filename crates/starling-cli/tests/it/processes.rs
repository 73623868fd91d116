//! `starling serve` and `starling device` as separate processes over real HTTP on 127.0.0.1:
//! convergence, crash recovery, and the privacy invariant.

use std::path::Path;
use std::time::Duration;

use crate::common::{
    fails, files_under, get_json, http, starling, wait_version, write_config, ServeProcess,
};
use starling_core::data::{synthetic_line, to_csv};
use starling_core::wire::checkpoint;
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor};

const LINEAR_TASK: &str = r#"
[[tasks]]
name = "linear"
admission = "open"
model = "linear"
# Three devices, all on 127.0.0.1: a test-sized round, said explicitly.
min_cohort = 3
max_assignments_per_address = 100
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

/// Three `starling device` processes against `url`, each contributing `rounds` updates from
/// its own third of the line y = 2x + 1 on [-2, 2] (60 noisy points, seeds from `seed`).
fn spawn_devices(dir: &Path, url: &str, rounds: u64, seed: u64) -> Vec<std::process::Child> {
    (0..3)
        .map(|i| {
            let lo = -2.0 + 4.0 / 3.0 * i as f32;
            let data = synthetic_line(2.0, 1.0, (lo, lo + 4.0 / 3.0), 60, 0.1, seed + i);
            let csv = dir.join(format!("device{i}.csv"));
            std::fs::write(&csv, to_csv(&data)).unwrap();
            starling()
                .args(["device", "--server", url, "--rounds", &rounds.to_string()])
                .args(["--give-up-after", "20", "--data"])
                .arg(&csv)
                .env("STARLING_LOG", "warn")
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn serve_and_device_processes_train_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LINEAR_TASK);
    let server = ServeProcess::start(&config, &dir.path().join("data"), "info");
    let devices = spawn_devices(dir.path(), &server.url, 30, 100);
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
    let rounds = get_json(&format!("{}/v1/tasks/linear/rounds", server.url));
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
    let token = a["token"].as_str().unwrap();
    let body = update::encode(
        d,
        &UpdateMeta {
            base_version: a["base_version"].as_u64().unwrap(),
            examples,
            loss: Some(0.125),
            accuracy: None,
            token: token.into(),
        },
    );
    let r = http()
        .post(format!("{url}/v1/tasks/{task}/rounds/{round}/updates"))
        .header("x-starling-token", token)
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
admission = "open"
min_cohort = 2
max_assignments_per_address = 100
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

/// A task of a 16-input linear model whose rounds take three devices.
const WIDE_TASK: &str = r#"
[[tasks]]
name = "wide"
admission = "open"
model = "linear"
inputs = 16
# Distinctive values far from anything else in memory, so larger than the default bound.
max_update_norm = 1e6
min_cohort = 3
max_assignments_per_address = 100
[tasks.rounds]
goal = 3
min = 3
"#;

/// Serves the `wide` task from `dir` (data in `dir/data`, logging at `log`), and has three
/// devices contribute the updates `(W, b)` of `examples` examples each to its first round,
/// which commits.
fn serve_a_wide_round(
    dir: &Path,
    log: &str,
    uploads: &[(Vec<f32>, f32)],
    examples: u64,
) -> ServeProcess {
    let config = write_config(dir, WIDE_TASK);
    let server = ServeProcess::start(&config, &dir.join("data"), log);
    for (w, b) in uploads {
        contribute(&server.url, "wide", &delta(w, *b), examples);
    }
    wait_version(&server.url, "wide", 1);
    server
}

#[test]
fn nothing_a_device_uploaded_is_stored_or_logged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let uploads: Vec<(Vec<f32>, f32)> = (0..3)
        .map(|d| {
            // Offsets 0, 111, 444: no device's update equals the average of the three.
            let off = 111.0 * (d * d) as f32;
            let w: Vec<f32> = (0..16).map(|i| 1234.5678 + off + 0.37 * i as f32).collect();
            (w, -8765.432 - 9.0 * off)
        })
        .collect();
    // The most verbose logging there is.
    let server = serve_a_wide_round(dir.path(), "trace", &uploads, 17);
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
    let health = get_json(&format!("{}/v1/health", server.url));
    assert_eq!(health["status"], "ok");
    server.terminate();
}

#[test]
fn serve_reports_bad_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[server]\nprot = 3\n");
    let err = fails(starling().args(["serve", "--config"]).arg(&config));
    assert!(err.contains("prot"), "{err}");
    let missing = fails(
        starling()
            .args(["serve", "--config"])
            .arg(Path::new("/nonexistent/starling.toml")),
    );
    assert!(missing.contains("/nonexistent/starling.toml"), "{missing}");
    let _ = Duration::ZERO;
}

/// Every readable region of a process's memory, read through `/proc/<pid>/mem` (the test
/// runs as the server's parent, which may read it).
fn process_memory(pid: u32) -> Vec<(String, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut regions = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next().unwrap(), fields.next().unwrap());
        let name = fields.nth(3).unwrap_or("[anon]").to_string();
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_ok() && mem.read_exact(&mut buf).is_ok() {
            regions.push((line.to_string(), buf));
        }
    }
    regions
}

/// Issue point 10: once a round committed and the devices' connections closed, the bytes of
/// their updates are nowhere in the server's memory (freed or not), while the committed
/// model is: the scan sees what is there.
#[test]
fn no_individual_update_lingers_in_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let uploads: Vec<(Vec<f32>, f32)> = (0..3)
        .map(|d| {
            let w: Vec<f32> = (0..16)
                .map(|i| 2345.678 + 1000.0 * d as f32 + 0.73 * i as f32)
                .collect();
            let b = -4321.0 - d_of(&w);
            (w, b)
        })
        .collect();
    let server = serve_a_wide_round(dir.path(), "info", &uploads, 11);
    let pid = server.child.id();
    let base = 5.0f32;
    // As the server computes it: the mean step in f64, added to the base, rounded once.
    let committed_at = |i: usize| {
        (f64::from(base) + uploads.iter().map(|(w, _)| f64::from(w[i])).sum::<f64>() / 3.0) as f32
    };
    let committed = le_bytes(&[committed_at(0), committed_at(1)]);
    // The server closes the test's connections (each request used its own client) a moment
    // after they hang up; give it that moment.
    let mut found = Vec::new();
    for _ in 0..50 {
        let memory = process_memory(pid);
        assert!(
            memory
                .iter()
                .any(|(_, m)| memchr::memmem::find(m, &committed).is_some()),
            "the scan finds the committed model in memory"
        );
        found = uploads
            .iter()
            .enumerate()
            .flat_map(|(d, (w, _))| {
                let needle = le_bytes(w);
                memory
                    .iter()
                    .filter(|(_, m)| memchr::memmem::find(m, &needle).is_some())
                    .map(|(region, _)| format!("device {d} in {region}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        if found.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server.terminate();
    assert!(
        found.is_empty(),
        "update bytes remain in server memory: {found:?}"
    );
}

/// The bias of a test upload, distinct per device.
fn d_of(w: &[f32]) -> f32 {
    w[0] / 1000.0
}

/// The operator's rollback through `starling admin` against a real `starling serve`: the
/// task goes back to an earlier version, a wrong token is refused, and the admin token
/// appears in no log line, even at `trace`.
#[test]
fn an_operator_rolls_back_with_starling_admin_and_the_token_is_never_logged() {
    const TOKEN: &str = "operator-token-7f3a9c1e5b";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[[tasks]]\nname = \"linear\"\nadmission = \"open\"\nmin_cohort = 1\n[tasks.rounds]\ngoal = 1\nmin = 1\n",
    );
    let mut cmd = starling();
    cmd.args(["serve", "--port", "0"])
        .env_remove("PORT")
        .env_remove("STARLING_PORT")
        .env("STARLING_ADMIN_TOKEN", TOKEN);
    let server = ServeProcess::start_with(cmd, &config, &dir.path().join("data"), "trace");
    for v in 1..=2u64 {
        contribute(&server.url, "linear", &delta(&[-1.0], 0.0), 1);
        wait_version(&server.url, "linear", v);
    }
    let admin = |token: &str| {
        starling()
            .args(["admin", "rollback", "--server", &server.url])
            .args(["--task", "linear", "--version", "1"])
            .env("STARLING_ADMIN_TOKEN", token)
            .output()
            .unwrap()
    };
    let wrong = admin("not-the-operator-token");
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("unauthorized"), "{err}");
    let ok = admin(TOKEN);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains("now version 3"), "{out}");
    let (version, body) = model_bytes(&server.url, "linear");
    assert_eq!(version, 3);
    let params = checkpoint::decode(&body).unwrap().params;
    assert_eq!(params.get("W").unwrap().data(), &[4.0], "version 1's W");
    let logs = server.terminate();
    assert!(logs.contains("rolled back"), "{logs}");
    assert!(!logs.contains(TOKEN), "the admin token is in the logs");
}

const BUFFERED_TASK: &str = r#"
[[tasks]]
name = "linear"
admission = "open"
model = "linear"
# Buffers of three devices, all on 127.0.0.1: test-sized, said explicitly.
min_cohort = 3
max_assignments_per_address = 100
[tasks.plan]
epochs = 5
batch_size = 10
learning_rate = 0.01
[tasks.rounds]
retry_secs = 0.2
[tasks.buffered]
buffer = 3
concurrency = 10
max_staleness = 2
"#;

/// Buffered asynchronous mode over real HTTP: `starling serve` with `[tasks.buffered]` and
/// three `starling device` processes that check in whenever they are ready. Every three
/// accepted updates make a version; an update built on a version more than `max_staleness`
/// behind is refused with `too_stale`, and the model does not move.
#[test]
fn serve_in_buffered_mode_steps_every_k_updates_and_refuses_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), BUFFERED_TASK);
    let server = ServeProcess::start(&config, &dir.path().join("data"), "info");
    // A laggard checks in on version 0 and comes back only at the end.
    let laggard: serde_json::Value = http()
        .post(format!("{}/v1/tasks/linear/checkin", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(laggard["status"], "assigned", "{laggard}");
    assert_eq!(laggard["base_version"], 0);
    let devices = spawn_devices(dir.path(), &server.url, 4, 200);
    for mut d in devices {
        assert!(d.wait().unwrap().success(), "a device failed");
    }
    // Twelve updates, buffers of three: four versions, each from three updates.
    let task = wait_version(&server.url, "linear", 4);
    assert_eq!(task["version"], 4, "{task}");
    assert_eq!(task["mode"], "buffered");
    assert_eq!(task["buffered"]["buffer"], 3);
    let rounds = get_json(&format!("{}/v1/tasks/linear/rounds", server.url));
    let rounds = rounds["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4, "{rounds:?}");
    assert!(
        rounds
            .iter()
            .all(|r| r["participants"] == 3 && r["status"] == "committed"),
        "{rounds:?}"
    );
    let mut versions: Vec<u64> = rounds
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, [1, 2, 3, 4]);

    // The laggard's update, built on version 0, is four versions behind.
    let token = laggard["token"].as_str().unwrap();
    let body = update::encode(
        &delta(&[0.5], 0.5),
        &UpdateMeta {
            base_version: 0,
            examples: 10,
            loss: None,
            accuracy: None,
            token: token.into(),
        },
    );
    let r = http()
        .post(format!(
            "{}/v1/tasks/linear/rounds/{}/updates",
            server.url, laggard["round"]
        ))
        .header("x-starling-token", token)
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    let e: serde_json::Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "too_stale", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("version 0, 4 versions behind the current version 4 (at most 2"),
        "{message}"
    );
    let after = get_json(&format!("{}/v1/tasks/linear", server.url));
    assert_eq!(after["version"], 4);
    assert_eq!(
        after["parameters"], task["parameters"],
        "the model did not move"
    );
    server.terminate();
}
