//! Helpers for tests that run the real `starling` binary as separate processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `starling` binary cargo built for these tests.
pub(crate) fn starling() -> Command {
    Command::new(env!("CARGO_BIN_EXE_starling"))
}

/// A `starling serve` child process with its output captured.
pub(crate) struct ServeProcess {
    /// The process.
    pub child: Child,
    /// Its base URL.
    pub url: String,
    /// Everything it printed on stdout and stderr so far.
    pub output: Arc<Mutex<String>>,
}

impl ServeProcess {
    /// Starts `starling serve --port 0` with a config file and a data directory, and waits
    /// for the address it prints.
    pub(crate) fn start(config: &Path, data_dir: &Path, log: &str) -> Self {
        let mut cmd = starling();
        cmd.args(["serve", "--port", "0"])
            .env_remove("PORT")
            .env_remove("STARLING_PORT");
        Self::start_with(cmd, config, data_dir, log)
    }

    /// Starts `cmd` (a `starling serve` command with its port settings) with a config file
    /// and a data directory, and waits for the address it prints.
    pub(crate) fn start_with(mut cmd: Command, config: &Path, data_dir: &Path, log: &str) -> Self {
        let mut child = cmd
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .env("STARLING_LOG", log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starling serve starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    // `http://` or, with --tls-cert, `https://`.
                    if let Some(i) = line.find("listening on http") {
                        let rest = &line[i + "listening on ".len()..];
                        let url = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(url.to_string());
                    }
                    let mut o = output.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("server did not start; output:\n{}", output.lock().unwrap())
            });
        Self { child, url, output }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub(crate) fn terminate(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert!(s.success(), "server exited with {s} after SIGTERM");
                break;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let out = self.output.lock().unwrap().clone();
        out
    }

    /// SIGKILL: no chance to clean up.
    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a settings file with one `linear` task.
pub(crate) fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("starling.toml");
    std::fs::write(&path, extra).unwrap();
    path
}

/// A blocking HTTP client.
pub(crate) fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// `GET url`, as JSON.
pub(crate) fn get_json(url: &str) -> serde_json::Value {
    http().get(url).send().unwrap().json().unwrap()
}

/// Runs `cmd`, which must fail; its standard error.
pub(crate) fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `GET /v1/tasks/{task}` until its version reaches `version`.
pub(crate) fn wait_version(url: &str, task: &str, version: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get_json(&format!("{url}/v1/tasks/{task}"));
        if v["version"].as_u64().unwrap() >= version {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "version {version} never came: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file under a directory, recursively.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}
