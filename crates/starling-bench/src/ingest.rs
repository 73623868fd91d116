//! The ingest benchmark: N devices check in and upload valid updates of P parameters over
//! HTTP on 127.0.0.1, C at a time, into one round of goal N. With [`IngestOptions::tls`] the
//! server serves HTTPS with a self-signed certificate made for the run ([`self_signed`]),
//! which the load generator trusts alone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::aggregate::update_body;
use crate::machine::peak_rss_mib;
use crate::server::ServerProcess;
use crate::{quantile, BenchError};

/// What to run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Parameters per update.
    pub params: usize,
    /// Devices, each uploading one update.
    pub devices: usize,
    /// Uploads in flight at once.
    pub concurrency: usize,
    /// Target this server instead of starting one.
    pub server: Option<String>,
    /// The task (with `server`).
    pub task: String,
    /// The `starling` binary to start as the server.
    pub exe: PathBuf,
    /// Serve HTTPS (`starling serve --tls-cert --tls-key`, a fresh self-signed certificate for
    /// 127.0.0.1) instead of plain HTTP; only for a server started here.
    pub tls: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct IngestRow {
    /// Over HTTPS (the server's own TLS), not plain HTTP.
    pub tls: bool,
    /// Parameters per update.
    pub params: usize,
    /// Devices.
    pub devices: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// Update size in MB.
    pub update_mb: f64,
    /// Accepted updates per second (first check-in to last 202).
    pub updates_per_sec: f64,
    /// Update megabytes per second.
    pub mb_per_sec: f64,
    /// Median upload latency, ms.
    pub p50_ms: f64,
    /// 99th percentile upload latency, ms.
    pub p99_ms: f64,
    /// Peak resident memory of the server process, MiB (only for a server started here).
    pub server_peak_rss_mib: Option<f64>,
    /// The server's own commit time (merge and model step), ms.
    pub commit_ms: Option<f64>,
    /// From the last 202 until the new version is served, ms (includes the database write).
    pub time_to_new_version_ms: f64,
    /// Requests that failed.
    pub errors: usize,
}

fn config(o: &IngestOptions) -> String {
    format!(
        r#"
[server]
# All the load comes from 127.0.0.1, and the bench sets its own concurrency.
max_connections_per_address = 100000
max_uploads_in_flight = 100000
[[tasks]]
name = "{task}"
admission = "open"
model = "linear"
inputs = {inputs}
min_cohort = 1
max_assignments_per_address = 100000
max_update_norm = 1e30
[tasks.rounds]
goal = {n}
min = {n}
deadline_secs = 3600
overcommit = 1.0
retry_secs = 0.2
"#,
        task = o.task,
        inputs = o.params - 1,
        n = o.devices
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A self-signed certificate for `127.0.0.1` and `localhost` and its private key, as PEM:
/// `(certificate, key)`.
pub fn self_signed() -> Result<(String, String), BenchError> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .map_err(|e| BenchError::Server(format!("cannot make a certificate: {e}")))?;
    Ok((made.cert.pem(), made.signing_key.serialize_pem()))
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, BenchError> {
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Runs one ingest benchmark.
pub async fn run(o: &IngestOptions) -> Result<IngestRow, BenchError> {
    if o.params < 2 || o.devices == 0 || o.concurrency == 0 {
        return Err(BenchError::Usage(
            "params >= 2, devices >= 1 and concurrency >= 1".into(),
        ));
    }
    let placeholder = "X".repeat(32);
    let (_, template) = update_body(o.params, &placeholder);
    let token_at = find(&template, placeholder.as_bytes()).expect("the token is in the header");
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(120));
    // The certificate's files live until the server is gone.
    let mut _certificate = None;
    let (server, url) = match &o.server {
        Some(_) if o.tls => {
            return Err(BenchError::Usage(
                "--tls starts its own HTTPS server; it does not go with --server".into(),
            ))
        }
        Some(u) => (None, u.trim_end_matches('/').to_string()),
        None if o.tls => {
            let (cert, key) = self_signed()?;
            let dir = tempfile::tempdir()?;
            let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&cert_file, &cert)?;
            std::fs::write(&key_file, key)?;
            http = http
                .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes())?)
                .https_only(true);
            let flags = [
                "--tls-cert".as_ref(),
                cert_file.as_os_str(),
                "--tls-key".as_ref(),
                key_file.as_os_str(),
            ];
            let s = ServerProcess::start_with(&o.exe, &config(o), &flags)?;
            _certificate = Some(dir);
            let u = s.url.clone();
            (Some(s), u)
        }
        None => {
            let s = ServerProcess::start(&o.exe, &config(o))?;
            let u = s.url.clone();
            (Some(s), u)
        }
    };
    let http = http.build()?;
    let task_url = format!("{url}/v1/tasks/{}", o.task);
    let task = get_json(&http, &task_url).await?;
    let count = task["parameter_count"].as_u64().unwrap_or(0) as usize;
    if count != o.params {
        return Err(BenchError::Server(format!(
            "task `{}` has {count} parameters, not {}",
            o.task, o.params
        )));
    }
    let base_version = task["version"].as_u64().unwrap_or(0);
    let base_meta = format!("\"base_version\":\"{base_version}\"");
    let template = if base_version == 0 {
        template
    } else {
        // Re-encode with the task's version (same layout, so the template stays valid).
        let s = String::from_utf8_lossy(&template).replace("\"base_version\":\"0\"", &base_meta);
        s.into_bytes()
    };
    let template = Arc::new(template);

    let sem = Arc::new(Semaphore::new(o.concurrency));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..o.devices {
        let (http, url, task, sem, template) = (
            http.clone(),
            url.clone(),
            o.task.clone(),
            sem.clone(),
            template.clone(),
        );
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            let checkin = format!("{url}/v1/tasks/{task}/checkin");
            let device = format!("{{\"device\":\"bench-{i}\"}}");
            let a = loop {
                let a: Value = http
                    .post(&checkin)
                    .header("content-type", "application/json")
                    .body(device.clone())
                    .send()
                    .await?
                    .json()
                    .await?;
                if a["status"] == "assigned" {
                    break a;
                }
                let wait = a["retry_after_secs"].as_f64().unwrap_or(0.1);
                tokio::time::sleep(Duration::from_secs_f64(wait.min(1.0))).await;
            };
            let token = a["token"].as_str().unwrap_or_default().as_bytes().to_vec();
            let round = a["round"].as_u64().unwrap_or(0);
            let mut body = template.as_ref().clone();
            if token.len() != 32 {
                return Err(BenchError::Server(format!("unexpected token {a}")));
            }
            body[token_at..token_at + 32].copy_from_slice(&token);
            let t = Instant::now();
            let r = http
                .post(format!("{url}/v1/tasks/{task}/rounds/{round}/updates"))
                .header(
                    starling_core::wire::protocol::TOKEN_HEADER,
                    a["token"].as_str().unwrap_or_default(),
                )
                .body(body)
                .send()
                .await?;
            let status = r.status();
            if status != reqwest::StatusCode::ACCEPTED {
                let text = r.text().await.unwrap_or_default();
                return Err(BenchError::Server(format!(
                    "upload answered {status}: {text}"
                )));
            }
            Ok::<(f64, Instant), BenchError>((t.elapsed().as_secs_f64() * 1e3, Instant::now()))
        });
    }
    let mut latencies = Vec::with_capacity(o.devices);
    let mut last_done = started;
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined.map_err(|e| BenchError::Server(e.to_string()))? {
            Ok((ms, done)) => {
                latencies.push(ms);
                last_done = last_done.max(done);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{errors} upload(s) failed; the first: {e}");
    }
    let elapsed = (last_done - started).as_secs_f64();
    let accepted = latencies.len();

    // The round commits once the last update is in; wait for the new version.
    let mut new_version_ms = f64::NAN;
    let wait_from = Instant::now();
    while wait_from.elapsed() < Duration::from_secs(120) && accepted == o.devices {
        let t = get_json(&http, &task_url).await?;
        if t["version"].as_u64().unwrap_or(0) > base_version {
            new_version_ms = (Instant::now() - last_done).as_secs_f64() * 1e3;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rounds = get_json(&http, &format!("{task_url}/rounds")).await?;
    let commit_ms = rounds["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .and_then(|r| r["commit_ms"].as_f64());
    let rss = server.as_ref().and_then(|s| peak_rss_mib(s.pid()));
    latencies.sort_by(f64::total_cmp);
    let update_mb = template.len() as f64 / 1e6;
    Ok(IngestRow {
        tls: o.tls,
        params: o.params,
        devices: o.devices,
        concurrency: o.concurrency,
        update_mb,
        updates_per_sec: accepted as f64 / elapsed,
        mb_per_sec: accepted as f64 * update_mb / elapsed,
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
        server_peak_rss_mib: rss,
        commit_ms,
        time_to_new_version_ms: new_version_ms,
        errors,
    })
}
