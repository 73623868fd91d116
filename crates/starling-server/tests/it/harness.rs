//! What the server's tests share: a real server on 127.0.0.1:0 with its SQLite file in a
//! temporary directory and test-sized task settings, a client that checks in, uploads and
//! polls over HTTP, the demo's `linear` model's deltas and layout, and the FedAvg a round
//! of updates must commit.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use starling_core::wire::params::Layout;
use starling_core::wire::protocol::{CheckInAnswer, TOKEN_HEADER};
use starling_core::wire::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor, WeightedSum};
use std::sync::Arc;

use starling_server::engine::{Clock, TaskHandle, VirtualClock};
use starling_server::metrics::Metrics;
use starling_server::settings::{RoundPolicy, ServerSettings, TaskSettings};
use starling_server::store::Store;
use starling_server::{Running, Settings};

/// Rounds of `goal` updates that commit with `min` at the deadline, twice the goal assigned,
/// a retry after a second.
pub(crate) fn policy(goal: u32, min: u32, deadline_secs: f64) -> RoundPolicy {
    RoundPolicy {
        goal,
        min,
        deadline_secs,
        overcommit: 2.0,
        retry_secs: 1.0,
    }
}

/// The demo's task with small rounds: every request of these tests comes from 127.0.0.1,
/// and a round of one device is allowed (said explicitly, as a demo must).
pub(crate) fn small_task(rounds: RoundPolicy) -> TaskSettings {
    TaskSettings {
        rounds,
        min_cohort: 1,
        max_assignments_per_address: 1000,
        ..TaskSettings::default()
    }
}

/// A running server, a client for it, and the directory its data lives in.
pub(crate) struct Harness {
    pub(crate) server: Running,
    pub(crate) http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

/// Starts a server with the one task `task` and its data in a new temporary directory, with
/// `server` adjusted by `adjust`.
pub(crate) async fn start(task: TaskSettings, adjust: impl FnOnce(&mut ServerSettings)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.server.data_dir = dir.path().to_path_buf();
    adjust(&mut settings.server);
    settings.tasks = vec![task];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Harness {
        server: starling_server::spawn(settings, listener).await.unwrap(),
        http: reqwest::Client::new(),
        _dir: Some(dir),
    }
}

/// An assignment of a round, as the check-in answered it.
#[derive(Debug, Clone)]
pub(crate) struct Assigned {
    pub(crate) round: u64,
    pub(crate) base_version: u64,
    pub(crate) token: String,
    pub(crate) upload_url: String,
}

impl TryFrom<CheckInAnswer> for Assigned {
    /// The answer, when it is no assignment.
    type Error = CheckInAnswer;

    fn try_from(answer: CheckInAnswer) -> Result<Self, CheckInAnswer> {
        match answer {
            CheckInAnswer::Assigned {
                round,
                base_version,
                token,
                upload_url,
                ..
            } => Ok(Self {
                round,
                base_version,
                token,
                upload_url,
            }),
            other => Err(other),
        }
    }
}

impl Assigned {
    /// The body of the update `delta` of `examples` examples for this assignment, with a
    /// training loss of 0.5.
    pub(crate) fn body(&self, delta: &Parameters, examples: u64) -> Vec<u8> {
        encode(delta, self.base_version, examples, Some(0.5), &self.token)
    }
}

impl Harness {
    /// A harness around a server the test started itself (on a data directory it keeps).
    pub(crate) fn from_running(server: Running) -> Self {
        Self {
            server,
            http: reqwest::Client::new(),
            _dir: None,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// A `GET path` request, to finish and send.
    pub(crate) fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path))
    }

    /// A `POST path` request, to finish and send.
    pub(crate) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path))
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `GET path`, which must succeed, as JSON.
    pub(crate) async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// The `linear` task's status.
    pub(crate) async fn task(&self) -> Value {
        self.get_json("/v1/tasks/linear").await
    }

    /// Updates folded into the open round.
    pub(crate) async fn round_updates(&self) -> u64 {
        self.task().await["round"]["updates"].as_u64().unwrap()
    }

    async fn check_in_with(&self, request: reqwest::RequestBuilder) -> Value {
        let r = request.send().await.expect("every check-in is answered");
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// An anonymous check-in, answered 200.
    pub(crate) async fn check_in(&self) -> Value {
        self.check_in_with(self.post("/v1/tasks/linear/checkin"))
            .await
    }

    /// A check-in of the device `device`, answered 200.
    pub(crate) async fn check_in_device(&self, device: &str) -> Value {
        let request = self
            .post("/v1/tasks/linear/checkin")
            .json(&serde_json::json!({ "device": device }));
        self.check_in_with(request).await
    }

    /// An anonymous check-in that must be an assignment.
    pub(crate) async fn assigned(&self) -> Assigned {
        let v = self.check_in().await;
        assert_eq!(v["status"], "assigned", "{v}");
        let answer: CheckInAnswer = serde_json::from_value(v).unwrap();
        Assigned::try_from(answer)
            .unwrap_or_else(|other| panic!("expected an assignment, got {other:?}"))
    }

    pub(crate) async fn post_update(
        &self,
        path: &str,
        token: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let r = self
            .post(path)
            .header(TOKEN_HEADER, token)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Uploads `body` to the round written `round` with the token header `token`.
    pub(crate) async fn upload_raw(
        &self,
        round: &str,
        token: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let path = format!("/v1/tasks/linear/rounds/{round}/updates");
        self.post_update(&path, token, body).await
    }

    /// Uploads the update `delta` of `examples` examples for the assignment `a`, to the URL
    /// its check-in gave.
    pub(crate) async fn upload(
        &self,
        a: &Assigned,
        delta: &Parameters,
        examples: u64,
    ) -> (StatusCode, Value) {
        self.post_update(&a.upload_url, &a.token, a.body(delta, examples))
            .await
    }

    /// The served model's version (its ETag) and parameters.
    pub(crate) async fn model(&self) -> (u64, Parameters) {
        let r = self.get("/v1/tasks/linear/model").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let etag: u64 = r.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .parse()
            .unwrap();
        let body = r.bytes().await.unwrap();
        (
            etag,
            Parameters::from_safetensors_with_layout(&body, &linear_layout())
                .unwrap()
                .0,
        )
    }

    /// Polls until the task's version reaches `version`; returns the task's status then.
    pub(crate) async fn wait_version(&self, version: u64) -> Value {
        for _ in 0..200 {
            let t = self.task().await;
            if t["version"].as_u64().unwrap() >= version {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("version {version} never came");
    }

    /// The metrics page.
    pub(crate) async fn metrics(&self) -> String {
        self.get("/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the metric line that starts with `series` (0 if absent).
    pub(crate) async fn metric(&self, series: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// Waits (up to 5 s) until the metric reaches `value`.
    pub(crate) async fn metric_reaches(&self, series: &str, value: u64) {
        let start = Instant::now();
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{series} stayed at {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long a test waits for an engine before it calls the engine stuck (a regression fails
/// instead of hanging).
pub(crate) const STUCK: Duration = Duration::from_secs(30);

/// Waits on the engine itself until the task's version reaches `version`.
pub(crate) async fn wait_engine_version(task: &TaskHandle, version: u64) {
    let mut rx = task.subscribe();
    tokio::time::timeout(STUCK, rx.wait_for(|s| s.model.version >= version))
        .await
        .unwrap_or_else(|_| panic!("version {version} never came: the engine is stuck"))
        .unwrap();
}

/// The layout of the demo's `linear` model: `W` 1×1 and `b`.
pub(crate) fn linear_layout() -> Layout {
    Layout::new(vec![("W".into(), vec![1, 1]), ("b".into(), vec![1])])
}

/// A delta of the demo's `linear` model.
pub(crate) fn delta(w: f32, b: f32) -> Parameters {
    Parameters::new(vec![
        ("W".into(), Tensor::new(vec![1, 1], vec![w]).unwrap()),
        ("b".into(), Tensor::new(vec![1], vec![b]).unwrap()),
    ])
    .unwrap()
}

/// An update's body as a device encodes it.
pub(crate) fn encode(
    delta: &Parameters,
    base_version: u64,
    examples: u64,
    loss: Option<f32>,
    token: &str,
) -> Vec<u8> {
    update::encode(
        delta,
        &UpdateMeta {
            base_version,
            examples,
            loss,
            accuracy: None,
            token: token.into(),
        },
    )
}

/// The parameters FedAvg must commit on `base` for these valid `(delta, examples)` updates:
/// their sequential fold, each update checked as the wire carries it.
pub(crate) fn expected_fold(base: &Parameters, updates: &[(Parameters, u64)]) -> Parameters {
    let layout = base.layout();
    let rules = update::Rules::lenient(&layout);
    let mut agg = WeightedSum::new(&layout);
    for (d, n) in updates {
        agg.accept(&update::check(encode(d, 0, *n, None, ""), &rules).unwrap());
    }
    agg.finish(base).unwrap()
}

/// Starts a task's engine on `store` and `clock`, without HTTP.
pub(crate) async fn spawn_on(
    settings: TaskSettings,
    store: Store,
    clock: Arc<dyn Clock>,
) -> TaskHandle {
    starling_server::engine::spawn(
        settings.resolve().unwrap(),
        store,
        Arc::new(Metrics::default()),
        clock,
    )
    .await
    .unwrap()
}

/// A task's engine on an in-memory store, whose deadlines follow a clock the test moves.
pub(crate) async fn spawn_clocked(settings: TaskSettings) -> (TaskHandle, VirtualClock) {
    let clock = VirtualClock::new();
    let store = Store::open_memory().await.unwrap();
    let task = spawn_on(settings, store, Arc::new(clock.clone())).await;
    (task, clock)
}
