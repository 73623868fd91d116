//! The Python SDK with a real Python: each test starts a real server in this process and runs
//! a Python test script from `tests/python/` against its URL, in the virtual environment that
//! `scripts/python-venv.sh` makes (`<target>/py-venv`, with pinned maturin and NumPy; the
//! script also builds and installs the package from this source, incrementally, so the
//! scripts test the code as it is now). The Rust side checks the committed models too.
//!
//! - `test_device.py`: three devices train the `linear` task with NumPy toward W = 2, b = 1;
//!   an enrolled task's refusals and `enroll`; bad weights refused before sending; errors.
//! - `test_external.py`: bring your own model (`model = "external"`): a 2-layer network in
//!   NumPy, trained by three devices to a small held-out error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use starling_core::{Parameters, Tensor};
use starling_server::settings::{Admission, RoundPolicy, Secret, TaskSettings};
use starling_server::{Running, Settings};

const SECRET: &str = "python-enrollment-secret-0123";
const LINEAR_ROUNDS: u64 = 5;
const EXTERNAL_ROUNDS: u64 = 8;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's Python, with the package freshly built from this source and installed.
fn python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            // CARGO_TARGET_TMPDIR is <target>/tmp: the venv is beside it.
            let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .expect("the target dir")
                .to_path_buf();
            let python = target.join("py-venv/bin/python");
            if !python.exists() {
                return Err(format!(
                    "no Python environment at {}: run scripts/setup.sh (or \
                     scripts/python-venv.sh) first",
                    python.display()
                ));
            }
            let status = Command::new("bash")
                .arg(repo().join("scripts/python-venv.sh"))
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .map_err(|e| format!("cannot run scripts/python-venv.sh: {e}"))?;
            if !status.success() {
                return Err(format!("scripts/python-venv.sh failed: {status}"));
            }
            Ok(python)
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `tests/python/<script>` against `url`; panics with its output when it fails.
async fn run_python(script: &str, url: String, env: Vec<(&'static str, String)>) {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(&script)
            .env("STARLING_SERVER", url)
            .envs(env)
            // unittest's report, unbuffered, in the failure message below; the panic test's
            // message without a backtrace.
            .env("PYTHONUNBUFFERED", "1")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stderr}");
    assert!(
        output.status.success(),
        "the Python tests failed ({}):\n{}\n{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
}

/// Rounds of `goal` updates, all from this machine's one address.
fn task(name: &str, goal: u32) -> TaskSettings {
    TaskSettings {
        name: name.into(),
        rounds: RoundPolicy {
            goal,
            min: goal,
            deadline_secs: 120.0,
            overcommit: 1.0,
            retry_secs: 0.05,
        },
        // Rounds of one device in the enrolled task: a test.
        min_cohort: 1,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    }
}

async fn server(dir: &Path, tasks: Vec<TaskSettings>) -> Running {
    let mut s = Settings::default();
    s.server.data_dir = dir.join("data");
    s.tasks = tasks;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    starling_server::spawn(s, listener).await.unwrap()
}

fn value(params: &Parameters, name: &str) -> f32 {
    params.get(name).unwrap().data()[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_devices_train_the_linear_task_and_meet_the_errors() {
    let dir = tempfile::tempdir().unwrap();
    let enrolled = TaskSettings {
        admission: Some(Admission::Enrolled),
        enrollment_secret: Some(Secret::new(SECRET)),
        ..task("enrolled", 1)
    };
    let running = server(dir.path(), vec![task("linear", 3), enrolled]).await;
    run_python(
        "test_device.py",
        running.url(),
        vec![
            ("STARLING_SECRET", SECRET.into()),
            ("STARLING_ROUNDS", LINEAR_ROUNDS.to_string()),
        ],
    )
    .await;

    // The server's own view of what the Python devices trained.
    let model = running.tasks[0].status().model;
    assert_eq!(model.version, LINEAR_ROUNDS);
    let (w, b) = (value(&model.params, "W"), value(&model.params, "b"));
    assert!(
        (w - 2.0).abs() < 0.05 && (b - 1.0).abs() < 0.05,
        "W {w}, b {b}"
    );
    // The enrolled device's one update (from the built-in trainer) committed.
    assert_eq!(running.tasks[1].status().model.version, 1);
}

/// Version 0 of the external task: a 2-8-1 network's tensors in PyTorch's names and layout,
/// with small seeded values.
fn initial_network() -> Parameters {
    let mut seed: u64 = 12345;
    let mut tensor = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::new(shape, data).unwrap()
    };
    Parameters::new(vec![
        ("dense1.weight".into(), tensor(vec![8, 2])),
        ("dense1.bias".into(), tensor(vec![8])),
        ("dense2.weight".into(), tensor(vec![1, 8])),
        ("dense2.bias".into(), tensor(vec![1])),
    ])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_devices_train_an_external_model_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let initial = initial_network();
    let file = dir.path().join("network.safetensors");
    std::fs::write(&file, initial.to_safetensors(None)).unwrap();
    let external = TaskSettings {
        model: "external".into(),
        initial_model: Some(file),
        ..task("external", 3)
    };
    let running = server(dir.path(), vec![external]).await;
    run_python(
        "test_external.py",
        running.url(),
        vec![("STARLING_ROUNDS", EXTERNAL_ROUNDS.to_string())],
    )
    .await;

    let model = running.tasks[0].status().model;
    assert_eq!(model.version, EXTERNAL_ROUNDS);
    assert_ne!(*model.params, initial, "the network was trained");
}
