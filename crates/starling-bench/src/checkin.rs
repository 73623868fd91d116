//! Thousands of devices checking in at once against a small goal: every one must get an
//! assignment or a time to come back, with no errors and no time-outs.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::server::ServerProcess;
use crate::{quantile, BenchError};

/// The outcome of a check-in storm.
#[derive(Debug, Clone, Serialize)]
pub struct CheckinRow {
    /// Devices checking in at once.
    pub devices: usize,
    /// The round's goal.
    pub goal: u32,
    /// Assignments handed out.
    pub assigned: usize,
    /// "Come back later" answers.
    pub retry: usize,
    /// Failed requests (errors, time-outs, unexpected answers).
    pub errors: usize,
    /// Smallest and largest retry time given, seconds.
    pub retry_secs_range: (f64, f64),
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Wall time of the whole storm, ms.
    pub wall_ms: f64,
}

/// Starts a server with a `goal` and fires `devices` concurrent check-ins at it.
pub async fn run(exe: &Path, devices: usize, goal: u32) -> Result<CheckinRow, BenchError> {
    let config = format!(
        // Every device of the storm is 127.0.0.1: the per-address limits would answer for it
        // instead of the round, so they are lifted; a round of one may commit.
        "[server]\nmax_connections_per_address = 100000\n\
         [[tasks]]\nname = \"linear\"\nadmission = \"open\"\nmin_cohort = 1\nmax_assignments_per_address = 100000\n\
         [tasks.rounds]\ngoal = {goal}\nmin = 1\n\
         deadline_secs = 3600\novercommit = 1.0\nretry_secs = 5\n"
    );
    let server = ServerProcess::start(exe, &config)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/v1/tasks/linear/checkin", server.url);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..devices {
        let (http, url) = (http.clone(), url.clone());
        set.spawn(async move {
            let t = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .body(format!("{{\"device\":\"storm-{i}\"}}"))
                .send()
                .await?;
            let v: Value = r.error_for_status()?.json().await?;
            Ok::<_, reqwest::Error>((t.elapsed().as_secs_f64() * 1e3, v))
        });
    }
    let (mut assigned, mut retry, mut errors) = (0, 0, 0);
    let mut latencies = Vec::with_capacity(devices);
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    while let Some(j) = set.join_next().await {
        match j {
            Ok(Ok((ms, v))) => {
                latencies.push(ms);
                match v["status"].as_str() {
                    Some("assigned") => assigned += 1,
                    Some("retry") => {
                        retry += 1;
                        let s = v["retry_after_secs"].as_f64().unwrap_or(f64::NAN);
                        lo = lo.min(s);
                        hi = hi.max(s);
                    }
                    _ => errors += 1,
                }
            }
            _ => errors += 1,
        }
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    latencies.sort_by(f64::total_cmp);
    Ok(CheckinRow {
        devices,
        goal,
        assigned,
        retry,
        errors,
        retry_secs_range: (lo, hi),
        p50_ms: quantile(&latencies, 0.5),
        p99_ms: quantile(&latencies, 0.99),
        wall_ms,
    })
}
