//! The operator's whole day through `starling admin` and `starling device` against a real
//! `starling serve`: a task created at run time from a settings file and a safetensors model,
//! enrolled devices training it with credentials they keep in files, the devices listed, one
//! revoked, the task rolled back; and no secret (admin token, enrollment secret, credential)
//! in any log line, even at `trace`.

use std::path::Path;
use std::process::Output;

use starling_core::data::synthetic_line;
use starling_core::wire::checkpoint;
use starling_core::{Parameters, Tensor};

use crate::common::{starling, wait_version, write_config, ServeProcess};

const ADMIN: &str = "operator-token-5d2e8a0c7f";
const SECRET: &str = "lab-devices-enroll-9b41";

const TASK: &str = r#"
name = "line"
model = "linear"
admission = "enrolled"
enrollment_secret = "lab-devices-enroll-9b41"
# Three devices, all on 127.0.0.1: a test-sized round, said explicitly.
min_cohort = 3
max_assignments_per_address = 10
[plan]
epochs = 5
batch_size = 10
learning_rate = 0.05
[rounds]
goal = 3
min = 3
deadline_secs = 60
retry_secs = 0.2
"#;

fn admin(server: &str, args: &[&str]) -> Output {
    starling()
        .arg("admin")
        .args(args)
        .args(["--server", server])
        .env("STARLING_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `starling device` that enrolls (or reuses `credentials`) and contributes `rounds`.
fn device(dir: &Path, url: &str, i: u64, rounds: u64) -> std::process::Command {
    let lo = -2.0 + 4.0 / 3.0 * i as f32;
    let data = synthetic_line(2.0, 1.0, (lo, lo + 4.0 / 3.0), 60, 0.1, 40 + i);
    let csv = dir.join(format!("device{i}.csv"));
    std::fs::write(&csv, starling_core::data::to_csv(&data)).unwrap();
    let mut cmd = starling();
    cmd.args(["device", "--server", url, "--task", "line"])
        .args(["--rounds", &rounds.to_string(), "--give-up-after", "20"])
        .arg("--data")
        .arg(&csv)
        .arg("--credential-file")
        .arg(dir.join(format!("device{i}.credential")))
        .args(["--label", &format!("bench {i}")])
        .env("STARLING_ENROLLMENT_SECRET", SECRET)
        .env("STARLING_LOG", "trace");
    cmd
}

#[test]
fn an_operator_creates_an_enrolled_task_from_a_model_file_and_rolls_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut cmd = starling();
    cmd.args(["serve", "--port", "0"])
        .env_remove("PORT")
        .env_remove("STARLING_PORT")
        .env("STARLING_ADMIN_TOKEN", ADMIN);
    let server = ServeProcess::start_with(cmd, &config, &dir.path().join("data"), "trace");
    let url = server.url.clone();

    // The task and its initial model (W = 0, b = 0, not the built-in W = 5, b = 3).
    let settings = dir.path().join("line.toml");
    std::fs::write(&settings, TASK).unwrap();
    let initial = Parameters::new(vec![
        ("W".into(), Tensor::new(vec![1, 1], vec![0.0]).unwrap()),
        ("b".into(), Tensor::new(vec![1], vec![0.0]).unwrap()),
    ])
    .unwrap();
    let model = dir.path().join("initial.safetensors");
    std::fs::write(&model, initial.to_safetensors(None)).unwrap();
    let out = ok(&admin(
        &url,
        &[
            "create",
            "--settings",
            settings.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ],
    ));
    assert!(
        out.contains("created task `line`: training, version 1"),
        "{out}"
    );

    // A device without the secret or a credential is refused, and says why.
    let refused = starling()
        .args(["device", "--server", &url, "--task", "line", "--data"])
        .arg(dir.path().join("none.csv"))
        .output()
        .unwrap();
    assert!(!refused.status.success());

    // Three enrolled devices train two rounds; their credentials are kept, owner-only.
    let mut devices: Vec<_> = (0..3)
        .map(|i| device(dir.path(), &url, i, 2).spawn().unwrap())
        .collect();
    let task = wait_version(&url, "line", 3);
    for d in &mut devices {
        assert!(d.wait().unwrap().success());
    }
    assert_eq!(task["admission"], "enrolled");
    let credentials: Vec<String> = (0..3)
        .map(|i| {
            let path = dir.path().join(format!("device{i}.credential"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "the credential file is owner-only");
            }
            std::fs::read_to_string(path).unwrap().trim().to_string()
        })
        .collect();

    // The operator sees the three devices, and revokes one: its next run is refused.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&admin(&url, &["devices", "--task", "line", "--json"]))).unwrap();
    let ids: Vec<&str> = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{listed}");
    let table = ok(&admin(&url, &["devices", "--task", "line"]));
    assert!(
        table.contains("bench 0") && table.contains("active"),
        "{table}"
    );
    // Device 0's id: the one labelled "bench 0".
    let zero = listed["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["label"] == "bench 0")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&admin(
        &url,
        &["revoke", "--task", "line", "--device", &zero],
    ));
    let again = device(dir.path(), &url, 0, 1).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("revoked"), "{err}");

    // Rolled back to the operator's model: version 4 holds W = 0, b = 0 again.
    let out = ok(&admin(
        &url,
        &["rollback", "--task", "line", "--version", "1"],
    ));
    assert!(out.contains("now version 4"), "{out}");
    let body = crate::common::http()
        .get(format!("{url}/v1/tasks/line/model"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let served = checkpoint::decode(&body).unwrap();
    assert_eq!(served.version, 4);
    assert_eq!(served.params, initial);
    let rounds = ok(&admin(&url, &["rounds", "--task", "line"]));
    assert!(rounds.contains("rolled_back"), "{rounds}");

    // No secret reached a log line.
    let logs = server.terminate();
    assert!(logs.contains("device enrolled"), "{logs}");
    for secret in [ADMIN, SECRET]
        .into_iter()
        .chain(credentials.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "a secret is in the server's logs");
        assert!(!err.contains(secret), "a secret is in the device's logs");
    }
}

/// A task of the operator's own model through `starling admin create`: the safetensors file
/// defines it (its tensors are the layout, its values version 0); without the file the CLI
/// says what is missing and nothing is created.
#[test]
fn an_operator_creates_a_task_of_their_own_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut cmd = starling();
    cmd.args(["serve", "--port", "0"])
        .env_remove("PORT")
        .env_remove("STARLING_PORT")
        .env("STARLING_ADMIN_TOKEN", ADMIN);
    let server = ServeProcess::start_with(cmd, &config, &dir.path().join("data"), "info");
    let url = server.url.clone();

    let settings = dir.path().join("own.toml");
    std::fs::write(
        &settings,
        "name = \"own\"\nmodel = \"external\"\nadmission = \"enrolled\"\n\
         enrollment_secret = \"lab-devices-enroll-9b41\"\n",
    )
    .unwrap();
    let without = admin(&url, &["create", "--settings", settings.to_str().unwrap()]);
    assert!(!without.status.success());
    let message = String::from_utf8_lossy(&without.stderr);
    assert!(message.contains("--model"), "{message}");
    assert!(crate::common::http()
        .get(format!("{url}/v1/tasks/own"))
        .send()
        .unwrap()
        .status()
        .is_client_error());

    let own = Parameters::new(vec![
        ("head.b".into(), Tensor::new(vec![4], vec![0.5; 4]).unwrap()),
        (
            "head.w".into(),
            Tensor::new(vec![8, 4], vec![0.25; 32]).unwrap(),
        ),
    ])
    .unwrap();
    let model = dir.path().join("own.safetensors");
    std::fs::write(&model, own.to_safetensors(None)).unwrap();
    let out = ok(&admin(
        &url,
        &[
            "create",
            "--settings",
            settings.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ],
    ));
    assert!(
        out.contains("created task `own`: training, version 0"),
        "{out}"
    );
    let task = crate::common::get_json(&format!("{url}/v1/tasks/own"));
    assert_eq!(task["spec"]["name"], "external", "{task}");
    assert_eq!(task["parameter_count"], 36, "{task}");
    let served = crate::common::http()
        .get(format!("{url}/v1/tasks/own/model"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(Parameters::from_safetensors(&served).unwrap().0, own);
    server.terminate();
}
