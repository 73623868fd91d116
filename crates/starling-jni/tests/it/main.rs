//! The Java API through JNI on this machine's JVM: `javac` compiles `java/` and
//! `tests/java/dev/starling/DeviceTest.java`, and `java -Djava.library.path=...` runs it
//! against a real server in this process: two rounds (resuming from the folder after a
//! download), and, against an enrolled task, a refusal, bad arguments and a Rust panic
//! arriving as `StarlingException`s, and an enrolled device's credential that works.
//!
//! Finding the library: cargo compiles the library target with all of its crate types also
//! when it builds it for this test, so `libstarling_jni.so` is beside this test's binary
//! (`<target>/<profile>/deps/`; after `cargo build`, in `<target>/<profile>/`), found from
//! `std::env::current_exe()` without a nested cargo. A JDK (`javac`, `java`) must be on
//! `PATH`, or `JAVA_HOME` set; scripts/setup.sh installs one.

use std::path::{Path, PathBuf};
use std::process::Command;

use starling_core::Plan;
use starling_server::settings::{plan_table, Admission, RoundPolicy, Secret, TaskSettings};
use starling_server::{Running, Settings};

const SECRET: &str = "sixteen-chars-or-more-secret";

/// A server whose `linear` task commits every update (rounds of one device).
async fn server(dir: &Path, enrolled: bool) -> Running {
    let mut s = Settings::default();
    s.server.data_dir = dir.to_path_buf();
    s.tasks = vec![TaskSettings {
        plan: Some(plan_table(&Plan {
            epochs: 2,
            batch_size: 5,
            learning_rate: 0.05,
            seed: 7,
            ..Plan::default()
        })),
        rounds: RoundPolicy {
            goal: 1,
            min: 1,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        // Rounds of one device, said explicitly: a test.
        min_cohort: 1,
        max_assignments_per_address: 100,
        admission: Some(if enrolled {
            Admission::Enrolled
        } else {
            Admission::Open
        }),
        enrollment_secret: enrolled.then(|| Secret::new(SECRET)),
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    starling_server::spawn(s, listener).await.unwrap()
}

/// A JDK tool: from `JAVA_HOME` when set, else from `PATH`.
fn jdk(tool: &str) -> PathBuf {
    match std::env::var_os("JAVA_HOME") {
        Some(home) => Path::new(&home).join("bin").join(tool),
        None => PathBuf::from(tool),
    }
}

/// The folder holding `libstarling_jni.so` (see the module docs).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let profile = deps.parent().unwrap().to_path_buf();
    [deps, profile]
        .into_iter()
        .find(|d| d.join("libstarling_jni.so").exists())
        .expect("libstarling_jni.so beside the test binary or in the profile's folder")
}

/// Compiles the Java API and `DeviceTest` into `out`.
fn compile(out: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    for dir in ["java/dev/starling", "tests/java/dev/starling"] {
        for entry in std::fs::read_dir(crate_dir.join(dir)).unwrap() {
            sources.push(entry.unwrap().path());
        }
    }
    let javac = jdk("javac");
    let status = Command::new(&javac)
        .args(["-Xlint:all", "-Werror", "-d"])
        .arg(out)
        .args(&sources)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} (a JDK is needed): {e}", javac.display()));
    assert!(status.success(), "javac failed: {status}");
}

/// Runs `DeviceTest` with `args` (off the runtime, so the server keeps answering),
/// answering its stdout and failing on a non-zero exit.
async fn run(args: Vec<String>) -> String {
    let classes = tempfile::tempdir().unwrap();
    compile(classes.path());
    let mut cmd = Command::new(jdk("java"));
    cmd.arg(format!("-Djava.library.path={}", library_dir().display()))
        .arg("-cp")
        .arg(classes.path())
        .arg("dev.starling.DeviceTest")
        .args(&args);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "DeviceTest failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    stdout
}

#[tokio::test]
async fn a_java_device_delivers_two_rounds_through_jni() {
    let (dir, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let running = server(dir.path(), false).await;
    let csv = work.path().join("data.csv");
    let rows: String = (0..30)
        .map(|i| {
            let x = f64::from(i) / 15.0 - 1.0;
            format!("{x},{}\n", 2.0 * x + 1.0)
        })
        .collect();
    std::fs::write(&csv, format!("x,y\n{rows}")).unwrap();
    let state = work.path().join("state");
    let stdout = run(vec![
        "rounds".into(),
        running.url(),
        state.display().to_string(),
        csv.display().to_string(),
    ])
    .await;
    for line in [
        "assigned round=1",
        "downloaded version=0",
        "ok the reopened device resumes at downloaded",
        "trained examples=30",
        "delivered round=1 updates=1",
        "downloaded version=1",
        "ok submit params",
        "delivered round=2 updates=1",
        "ok a closed device throws",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    let mut rx = running.tasks[0].subscribe();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        rx.wait_for(|st| st.model.version == 2),
    )
    .await
    .expect("the model reaches version 2")
    .unwrap();
}

#[tokio::test]
async fn refusals_bad_arguments_and_panics_arrive_as_starling_exceptions_and_enrolling_works() {
    let (dir, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let running = server(dir.path(), true).await;
    let state = work.path().join("state");
    let stdout = run(vec![
        "errors".into(),
        running.url(),
        state.display().to_string(),
        SECRET.into(),
    ])
    .await;
    for line in [
        "code: missing_credential status: 2",
        "ok check-in without a credential is refused",
        "ok a missing CSV is a data error",
        "ok a null path is an invalid argument",
        "ok a panic is an exception",
        "code: enrollment_refused status: 2",
        "ok an enrolled device is assigned",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
}
