//! A C program (`tests/c/device.c`) compiled with the system's `cc` against the committed
//! header and linked with the static library, run against real servers in this process.
//!
//! Finding the library: cargo compiles a library target once with all of its crate types,
//! also when it builds it for an integration test, so `cargo test` (alone, or with
//! `--workspace`, on a clean checkout) leaves `libstarling_ffi.a` beside this test's binary,
//! in `<target>/<profile>/deps/` (whatever `CARGO_TARGET_DIR` or `--target` say), before this
//! test runs; `cargo build` puts it in `<target>/<profile>/`, looked at second. So the
//! library is found from `std::env::current_exe()`, with no nested `cargo build` (which
//! would wait on the build folder's lock that the outer cargo holds). The static library is
//! linked rather than the cdylib, so the program runs without `LD_LIBRARY_PATH` or an rpath.

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

/// `libstarling_ffi.a`, beside this test's binary or in the profile's folder (see the
/// module docs).
fn static_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [deps, deps.parent().unwrap()].map(|d| d.join("libstarling_ffi.a"));
    candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no libstarling_ffi.a in {candidates:?}"))
        .clone()
}

/// Compiles `tests/c/device.c` into `out` and answers the program's path.
fn compile(out: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = static_library();
    let program = out.join("device");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("tests/c/device.c"))
        .arg(&lib)
        // What Rust's standard library needs on Linux (`--print native-static-libs`).
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ])
        .arg("-o")
        .arg(&program)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc} (a C compiler is needed): {e}"));
    assert!(status.success(), "{cc} failed: {status}");
    program
}

/// Runs the program with `args` (off the runtime, so the server keeps answering) and
/// answers its stdout, failing on a non-zero exit.
async fn run(program: &Path, args: Vec<String>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(&args);
    let output = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the C program failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn a_c_program_delivers_two_rounds_resuming_from_the_folder_after_a_download() {
    let (dir, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let running = server(dir.path(), false).await;
    let program = compile(work.path());
    // y = 2x + 1 on 30 points.
    let csv = work.path().join("data.csv");
    let rows: String = (0..30)
        .map(|i| {
            let x = f64::from(i) / 15.0 - 1.0;
            format!("{x},{}\n", 2.0 * x + 1.0)
        })
        .collect();
    std::fs::write(&csv, format!("x,y\n{rows}")).unwrap();

    let state = work.path().join("state");
    let stdout = run(
        &program,
        vec![
            "rounds".into(),
            running.url(),
            state.display().to_string(),
            csv.display().to_string(),
        ],
    )
    .await;
    println!("{stdout}");
    for line in [
        "assigned round=1",
        "downloaded version=0",
        "ok the reopened session resumes at downloaded",
        "trained examples=30 loss=known",
        "delivered round=1 updates=1",
        "downloaded version=1",
        "ok submit params",
        "delivered round=2 updates=1",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // The server committed both rounds.
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
async fn errors_reach_c_as_status_codes_with_the_servers_code_name() {
    let (dir, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let running = server(dir.path(), true).await;
    let program = compile(work.path());
    let state = work.path().join("state");
    let stdout = run(
        &program,
        vec![
            "errors".into(),
            running.url(),
            state.display().to_string(),
            SECRET.into(),
        ],
    )
    .await;
    println!("{stdout}");
    for line in [
        "ok NULL server is an invalid argument",
        "message: server is NULL",
        "ok NULL session is an invalid argument",
        "ok check-in without a credential is refused",
        "code: missing_credential",
        "ok a missing CSV is a data error",
        "ok download before check-in is out of order",
        "ok a wrong secret is refused",
        "code: enrollment_refused",
        "ok an enrolled device is assigned",
    ] {
        assert!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
}
