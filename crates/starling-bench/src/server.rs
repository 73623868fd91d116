//! A `starling serve` child process, so that the server's memory is measured apart from the
//! load generator's.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::BenchError;

/// A running server process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// Its base URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `exe serve` on a free port with `config` (TOML) and a temporary data directory.
    pub fn start(exe: &Path, config: &str) -> Result<Self, BenchError> {
        Self::start_with(exe, config, &[] as &[&OsStr])
    }

    /// [`ServerProcess::start`] with further `serve` flags (`--tls-cert FILE`, ...); its URL
    /// is the one the server prints (`https://` for TLS).
    pub fn start_with(
        exe: &Path,
        config: &str,
        flags: &[impl AsRef<OsStr>],
    ) -> Result<Self, BenchError> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("bench.toml");
        std::fs::write(&cfg, config)?;
        let mut child = Command::new(exe)
            .args(["serve", "--port", "0", "--host", "127.0.0.1", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(flags)
            .env("STARLING_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on ") {
                    let url = line[i + "listening on ".len()..].split_whitespace().next();
                    let _ = tx.send(url.unwrap_or_default().to_string());
                } else if line.contains("ERROR") {
                    eprintln!("server: {line}");
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| BenchError::Server("the server did not start within 30 s".into()))?;
        Ok(Self {
            child,
            url,
            _dir: dir,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
