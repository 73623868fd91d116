//! The device runtime against servers on 127.0.0.1: the real server (back-off while it is
//! down, giving up, data that does not fit, partial work against the round's deadline), and
//! a scripted HTTP/1.1 server that plays a failing coordinator (5xx answers with
//! `Retry-After`, silence, refusals), to pin what the device retries, what it keeps, and when
//! it gives up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use starling_client::device::DeviceEvent;
use starling_client::{ClientError, Device, DeviceOptions, DeviceReport, ErrorCode, HttpTransport};
use starling_core::data::synthetic_line;
use starling_core::wire::protocol::{
    CheckInAnswer, ErrorBody, RoundKind, UploadReceipt, TOKEN_HEADER,
};
use starling_core::{trainer::builtin, wire::checkpoint, Plan};
use starling_server::settings::{plan_table, RoundPolicy, TaskSettings};
use starling_server::store::{RoundRecord, RoundStatus};
use starling_server::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn settings(dir: &std::path::Path, goal: u32) -> Settings {
    let mut s = Settings::default();
    s.server.data_dir = dir.to_path_buf();
    s.tasks = vec![TaskSettings {
        rounds: RoundPolicy {
            goal,
            min: goal,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        // Test rounds are tiny, and every device comes from 127.0.0.1.
        min_cohort: goal,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    }];
    s
}

fn options(rounds: u64) -> DeviceOptions {
    DeviceOptions {
        rounds: Some(rounds),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        give_up_after: Some(Duration::from_secs(20)),
        request_timeout: Duration::from_secs(5),
        ..DeviceOptions::default()
    }
}

fn line_data() -> starling_core::Dataset {
    synthetic_line(2.0, 1.0, (0.0, 1.0), 20, 0.1, 1)
}

/// Runs `device` to its end, collecting its events.
async fn run_collecting(
    device: &mut Device<HttpTransport>,
) -> (
    Result<starling_client::DeviceReport, ClientError>,
    Vec<DeviceEvent>,
) {
    let mut events = Vec::new();
    let result = device.run(|e| events.push(e.clone())).await;
    (result, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_retries_until_the_server_comes_up() {
    // A port with nobody listening yet.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let data = synthetic_line(2.0, 1.0, (0.0, 1.0), 30, 0.1, 1);
    let mut device = Device::new(
        HttpTransport::new(&format!("http://{addr}")),
        data,
        options(1),
    );
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let run = tokio::spawn(async move {
        device
            .run(move |e| seen.lock().unwrap().push(e.clone()))
            .await
    });

    tokio::time::sleep(Duration::from_millis(600)).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = starling_server::spawn(settings(dir.path(), 1), listener)
        .await
        .unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.contributions, 1);
    let events = events.lock().unwrap().clone();
    let delays: Vec<Duration> = events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Retrying { retry_in, .. } => Some(*retry_in),
            _ => None,
        })
        .collect();
    assert!(
        delays.len() >= 2,
        "the device retried while the server was down: {events:?}"
    );
    // Back-off: the delays grow.
    assert!(delays.last() > delays.first(), "{delays:?}");
    let mut st = server.tasks[0].subscribe();
    st.wait_for(|s| s.model.version == 1).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gives_up_when_the_server_never_comes() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let data = synthetic_line(2.0, 1.0, (0.0, 1.0), 10, 0.1, 1);
    let mut o = options(1);
    o.give_up_after = Some(Duration::from_millis(300));
    let mut device = Device::new(HttpTransport::new(&format!("http://{addr}")), data, o);
    let err = device.run(|_| {}).await.unwrap_err();
    assert!(matches!(err, ClientError::GaveUp { .. }), "{err}");
    assert!(err.to_string().contains("gave up"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_that_does_not_fit_the_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(dir.path(), 1), listener)
        .await
        .unwrap();
    // Two feature columns for a model with one input.
    let data = starling_core::Dataset::new(vec![1.0, 2.0, 3.0, 4.0], vec![1.0, 2.0], 2, 1).unwrap();
    let mut device = Device::new(HttpTransport::new(&server.url()), data, options(1));
    let err = device.run(|_| {}).await.unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    assert_eq!(server.tasks[0].status().round.updates, 0);
    server.stop().await.unwrap();
}

/// A server with one linear task whose plan trains one example per step for one epoch,
/// with FedProx's `mu` and partial work as given, and whose round (of one update) has a
/// 60-second deadline.
fn partial_work_settings(dir: &std::path::Path, partial_work: bool) -> Settings {
    let mut s = settings(dir, 1);
    s.tasks[0].plan = Some(plan_table(&Plan {
        epochs: 1,
        batch_size: 1,
        learning_rate: 0.01,
        mu: 0.1,
        partial_work,
        ..Plan::default()
    }));
    s
}

/// Runs one device of 100 examples that plays a slow machine, each training step taking one
/// second on its clock (nothing sleeps): the 100 steps would end 40 s past the round's
/// 60-second deadline. Returns the device's `Contributed` event and the round's record.
async fn slow_device_round(partial_work: bool) -> (DeviceEvent, RoundRecord, DeviceReport) {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(partial_work_settings(dir.path(), partial_work), listener)
        .await
        .unwrap();
    let data = synthetic_line(2.0, 1.0, (-1.0, 1.0), 100, 0.1, 3);
    let mut o = options(1);
    o.extra_step_time = Duration::from_secs(1);
    let mut device = Device::new(HttpTransport::new(&server.url()), data, o);
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!((report.contributions, report.skipped), (1, 0), "{events:?}");
    let contributed = events
        .iter()
        .find(|e| matches!(e, DeviceEvent::Contributed { .. }))
        .cloned()
        .unwrap_or_else(|| panic!("no contribution in {events:?}"));
    let mut st = server.tasks[0].subscribe();
    let record = st
        .wait_for(|s| s.last_round.is_some())
        .await
        .unwrap()
        .last_round
        .clone()
        .unwrap();
    server.stop().await.unwrap();
    (contributed, record, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_partial_work_a_device_short_of_time_sends_the_steps_it_ran() {
    let (contributed, record, report) = slow_device_round(true).await;
    let DeviceEvent::Contributed {
        round,
        examples,
        steps,
        planned_steps,
        ..
    } = contributed
    else {
        unreachable!()
    };
    assert_eq!((round, planned_steps), (1, 100));
    // The budget is the deadline (a little under 60 s at check-in) less a tenth of it for the
    // upload: about 54 one-second steps, fewer if check-in, download and training took real
    // time too.
    assert!((40..=54).contains(&steps), "{steps} steps");
    // Within the first epoch, one example a step: the update counts what it trained on.
    assert_eq!(examples, steps);
    assert_eq!(report.partial, 1);
    // The server took it, weighted by its real example count.
    assert_eq!(record.status, RoundStatus::Committed, "{record:?}");
    assert_eq!(record.participants, 1);
    assert_eq!(record.examples, examples as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_partial_work_a_slow_device_runs_every_step() {
    let (contributed, record, report) = slow_device_round(false).await;
    let DeviceEvent::Contributed {
        examples,
        steps,
        planned_steps,
        ..
    } = contributed
    else {
        unreachable!()
    };
    // The same device and deadline: its clock says it is 40 s late, yet it trains on.
    assert_eq!((steps, planned_steps, examples), (100, 100, 100));
    assert_eq!(report.partial, 0);
    assert_eq!(record.status, RoundStatus::Committed, "{record:?}");
    assert_eq!(record.examples, 100);
}

/// A task with an evaluation round after every training round: the device trains round 1,
/// scores version 1 on its data in round 2 (reporting only the count, loss and accuracy the
/// core's `Model::evaluate` gives on that data), and trains round 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_answers_an_evaluation_round_with_its_score_and_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 1);
    s.tasks[0].evaluate_every = 1;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(s, listener).await.unwrap();
    let data = line_data();
    let mut device = Device::new(HttpTransport::new(&server.url()), data.clone(), options(2));
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!(
        (report.contributions, report.evaluations, report.skipped),
        (2, 1, 0),
        "{events:?}"
    );
    let Some(DeviceEvent::Evaluated {
        round,
        examples,
        loss,
        accuracy,
    }) = events
        .iter()
        .find(|e| matches!(e, DeviceEvent::Evaluated { .. }))
        .cloned()
    else {
        panic!("no evaluation in {events:?}")
    };
    assert_eq!((round, examples, accuracy), (2, 20, None));
    // Round 3's step follows the device's last receipt.
    let mut st = server.tasks[0].subscribe();
    st.wait_for(|s| s.model.version >= 2).await.unwrap();
    let history: serde_json::Value =
        reqwest::get(format!("{}/v1/tasks/linear/rounds", server.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let rounds = history["rounds"].as_array().unwrap();
    let eval = &rounds[1];
    assert_eq!(
        (&eval["kind"], &eval["status"], &eval["base_version"]),
        (
            &serde_json::json!("evaluation"),
            &serde_json::json!("evaluated"),
            &serde_json::json!(1)
        ),
        "{history}"
    );
    assert_eq!(eval["examples"], 20);
    assert_eq!(eval["mean_loss"].as_f64(), Some(f64::from(loss)));
    let body = reqwest::get(format!("{}/v1/tasks/linear/model", server.url()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let v3 = checkpoint::decode(&body).unwrap();
    assert_eq!(
        v3.version, 2,
        "rounds 1 and 3 trained; round 2 moved nothing"
    );
    assert_eq!(rounds[2]["version"], 2);
    assert!(loss.is_finite() && loss > 0.0);
    server.stop().await.unwrap();
}

/// Local differential privacy: the device clips and noises its updates itself, sends no
/// loss, accuracy or example count, and counts the ε of the updates it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_under_local_dp_sends_noised_updates_that_say_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(dir.path(), 1), listener)
        .await
        .unwrap();
    let ldp = starling_core::privacy::LocalDp {
        clip: 0.5,
        noise_multiplier: 2.0,
    };
    let mut o = options(2);
    o.local_dp = Some(ldp);
    o.local_dp_delta = 1e-5;
    let mut device = Device::new(HttpTransport::new(&server.url()), line_data(), o);
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!(report.contributions, 2, "{events:?}");
    assert_eq!(report.local_epsilon, Some(ldp.epsilon(2, 1e-5).unwrap()));
    let mut st = server.tasks[0].subscribe();
    st.wait_for(|s| s.model.version >= 2).await.unwrap();
    let history: serde_json::Value =
        reqwest::get(format!("{}/v1/tasks/linear/rounds", server.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let trained: Vec<&serde_json::Value> = history["rounds"].as_array().unwrap().iter().collect();
    assert_eq!(trained.len(), 2, "{history}");
    for r in trained {
        assert_eq!(r["examples"], 1, "the data's size stays on the device: {r}");
        assert_eq!(r["mean_loss"], serde_json::Value::Null, "{r}");
    }
    server.stop().await.unwrap();
}

// ---- a scripted server ------------------------------------------------------------------

/// The requests the scripted server distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    CheckIn,
    Model,
    Upload,
    Other,
}

/// One request as the scripted server read it.
#[derive(Debug, Clone)]
struct Seen {
    kind: Kind,
    path: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When its head had arrived.
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the scripted server does with a request.
enum Reply {
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// Keeps the connection open and never answers.
    Hang,
}

/// The script: the request, and how many requests of its kind came before it.
type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

/// A hand-rolled HTTP/1.1 server on 127.0.0.1:0 that answers every request from a script
/// (one request per connection) and records what it was sent.
struct Scripted {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let log = seen.clone();
        let accept = tokio::spawn(async move {
            // Dropped (aborting every connection) when the accept loop is aborted.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                connections.spawn(serve(stream, script.clone(), log.clone()));
            }
        });
        Self { url, seen, accept }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn of(&self, kind: Kind) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.kind == kind).collect()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(mut stream: TcpStream, script: Arc<Script>, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let at = Instant::now();
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let kind = if path.ends_with("/checkin") {
        Kind::CheckIn
    } else if path.ends_with("/model") {
        Kind::Model
    } else if path.ends_with("/updates") {
        Kind::Upload
    } else {
        Kind::Other
    };
    let seen = Seen {
        kind,
        path,
        headers,
        body,
        at,
    };
    let earlier = {
        let mut log = log.lock().unwrap();
        let n = log.iter().filter(|s| s.kind == kind).count();
        log.push(seen.clone());
        n
    };
    match script(&seen, earlier) {
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        }
        Reply::Answer {
            status,
            headers,
            body,
        } => {
            let mut out = format!(
                "HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\nconnection: close\r\n",
                body.len()
            );
            for (n, v) in headers {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
    }
}

fn json(status: u16, value: &impl serde::Serialize) -> Reply {
    Reply::Answer {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: serde_json::to_vec(value).unwrap(),
    }
}

/// An assignment to `round` of the linear task's version 0.
fn assigned(round: u64, token: &str, deadline_secs: f64) -> Reply {
    json(
        200,
        &CheckInAnswer::Assigned {
            round,
            kind: RoundKind::Training,
            base_version: 0,
            token: token.into(),
            deadline_secs,
            plan: builtin::default_plan("linear"),
            model_url: "/v1/tasks/linear/model".into(),
            upload_url: format!("/v1/tasks/linear/rounds/{round}/updates"),
            secure: None,
        },
    )
}

/// The linear task's version 0.
fn model() -> Reply {
    let spec = builtin::linear(1, 1);
    Reply::Answer {
        status: 200,
        headers: vec![
            ("content-type", "application/octet-stream".into()),
            ("etag", "\"0\"".into()),
        ],
        body: checkpoint::encode("linear", 0, &spec, &spec.init_params(0)),
    }
}

fn accepted(round: u64) -> Reply {
    json(
        202,
        &UploadReceipt {
            status: "accepted".into(),
            round,
            updates_in_round: 1,
        },
    )
}

/// An error answer with the code's own status, and `Retry-After` when given.
fn error(code: ErrorCode, retry_after: Option<u32>) -> Reply {
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(secs) = retry_after {
        headers.push(("retry-after", secs.to_string()));
    }
    Reply::Answer {
        status: code.status(),
        headers,
        body: serde_json::to_vec(&ErrorBody::new(code, format!("scripted {code}"))).unwrap(),
    }
}

/// The path of `round`'s uploads.
fn upload_path(round: u64) -> String {
    format!("/v1/tasks/linear/rounds/{round}/updates")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_with_retry_after_keeps_the_update_and_uploads_the_same_bytes_again() {
    let server = Scripted::start(|req, n| match req.kind {
        Kind::CheckIn => assigned(1, "token-1", 60.0),
        Kind::Model => model(),
        Kind::Upload if n < 2 => error(ErrorCode::Unavailable, Some(1)),
        Kind::Upload => accepted(1),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), options(1));
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!((report.contributions, report.skipped), (1, 0), "{events:?}");

    // One check-in: the device kept its update instead of training another.
    assert_eq!(server.of(Kind::CheckIn).len(), 1);
    let uploads = server.of(Kind::Upload);
    assert_eq!(uploads.len(), 3, "two 503s, then the accepted upload");
    for u in &uploads {
        assert_eq!(u.path, upload_path(1));
        assert_eq!(u.body, uploads[0].body, "every try sends the same update");
        assert_eq!(u.header(TOKEN_HEADER), Some("token-1"));
        assert_eq!(
            u.header("content-type"),
            Some("application/octet-stream"),
            "{:?}",
            u.headers
        );
    }
    assert!(!uploads[0].body.is_empty());
    // `Retry-After: 1` is the least wait between tries.
    for pair in uploads.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(990), "waited only {gap:?}");
    }
    let retries = events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Retrying { .. }))
        .count();
    assert_eq!(retries, 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_at_check_in_are_retried_not_fatal() {
    let server = Scripted::start(|req, n| match req.kind {
        Kind::CheckIn if n < 2 => error(ErrorCode::Internal, None),
        Kind::CheckIn => assigned(1, "token-1", 60.0),
        Kind::Model => model(),
        Kind::Upload => accepted(1),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), options(1));
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!(report.contributions, 1, "{events:?}");
    assert_eq!(server.of(Kind::CheckIn).len(), 3);
    assert_eq!(server.of(Kind::Upload).len(), 1);
    let errors: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Retrying { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 2, "{events:?}");
    assert!(errors.iter().all(|e| e.contains("internal")), "{errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_given_up_on_at_the_deadline() {
    let server = Scripted::start(|_, _| Reply::Hang).await;
    let mut o = options(1);
    o.give_up_after = Some(Duration::from_millis(1500));
    o.request_timeout = Duration::from_millis(500);
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), o);
    let started = Instant::now();
    let (result, events) = run_collecting(&mut device).await;
    let took = started.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, ClientError::GaveUp { .. }), "{err}");
    // The deadline is counted from the first silent request, and no request outlives the
    // request timeout: given up after 1.5 s, and well before 3 s.
    assert!(
        took >= Duration::from_millis(1400),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "gave up after {took:?}");
    // Each silent request timed out and was sent again.
    let check_ins = server.of(Kind::CheckIn).len();
    assert!((2..=4).contains(&check_ins), "{check_ins} check-ins");
    assert!(
        events
            .iter()
            .all(|e| matches!(e, DeviceEvent::Retrying { .. })),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_never_outlasts_the_give_up_deadline() {
    let server = Scripted::start(|_, _| error(ErrorCode::Busy, Some(30))).await;
    let mut o = options(1);
    o.give_up_after = Some(Duration::from_millis(800));
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), o);
    let started = Instant::now();
    let (result, events) = run_collecting(&mut device).await;
    let took = started.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, ClientError::GaveUp { .. }), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(took < Duration::from_millis(1600), "gave up after {took:?}");
    for e in &events {
        if let DeviceEvent::Retrying { retry_in, .. } = e {
            assert!(*retry_in <= Duration::from_millis(800), "{events:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_is_dropped_and_the_device_checks_in_again() {
    let server = Scripted::start(|req, n| match req.kind {
        Kind::CheckIn => assigned(n as u64 + 1, &format!("token-{}", n + 1), 60.0),
        Kind::Model => model(),
        Kind::Upload if n == 0 => error(ErrorCode::RoundClosed, None),
        Kind::Upload => accepted(2),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), options(1));
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!((report.contributions, report.skipped), (1, 1), "{events:?}");
    assert!(events.iter().any(
        |e| matches!(e, DeviceEvent::Skipped { round: 1, reason } if reason.contains("scripted"))
    ));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Retrying { .. })),
        "a refusal is not retried: {events:?}"
    );

    let kinds: Vec<Kind> = server.seen().iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::CheckIn,
            Kind::Model,
            Kind::Upload,
            Kind::CheckIn,
            Kind::Upload
        ],
        "the refused update was sent once; the model was downloaded once"
    );
    let uploads = server.of(Kind::Upload);
    assert_eq!(uploads[0].path, upload_path(1));
    assert_eq!(uploads[0].header(TOKEN_HEADER), Some("token-1"));
    assert_eq!(uploads[1].path, upload_path(2));
    assert_eq!(uploads[1].header(TOKEN_HEADER), Some("token-2"));
    assert_ne!(uploads[0].body, uploads[1].body, "trained anew for round 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_retried_only_while_its_round_is_open() {
    let server = Scripted::start(|req, n| match req.kind {
        Kind::CheckIn => assigned(n as u64 + 1, &format!("token-{}", n + 1), 0.8),
        Kind::Model => model(),
        Kind::Upload if req.path == upload_path(1) => error(ErrorCode::Internal, None),
        Kind::Upload => accepted(2),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), options(1));
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!((report.contributions, report.skipped), (1, 1), "{events:?}");

    let check_ins = server.of(Kind::CheckIn);
    assert_eq!(check_ins.len(), 2);
    let round_1: Vec<Seen> = server
        .of(Kind::Upload)
        .into_iter()
        .filter(|u| u.path == upload_path(1))
        .collect();
    assert!(round_1.len() >= 2, "the update was sent again");
    assert!(round_1.iter().all(|u| u.body == round_1[0].body));
    // The device counts the deadline from the answer it read, a little after the server
    // wrote it: hence the margin.
    let deadline = check_ins[0].at + Duration::from_millis(800 + 100);
    assert!(
        round_1.iter().all(|u| u.at < deadline),
        "no try after the round's deadline"
    );
    assert!(check_ins[1].at >= round_1.last().unwrap().at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_after_a_lost_answer_counts_as_contributed() {
    let server = Scripted::start(|req, n| match req.kind {
        Kind::CheckIn => assigned(1, "token-1", 60.0),
        Kind::Model => model(),
        // The first upload arrives but its answer never does.
        Kind::Upload if n == 0 => Reply::Hang,
        Kind::Upload => error(ErrorCode::DuplicateUpdate, None),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut o = options(1);
    o.request_timeout = Duration::from_millis(300);
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), o);
    let (result, events) = run_collecting(&mut device).await;
    let report = result.unwrap();
    assert_eq!((report.contributions, report.skipped), (1, 0), "{events:?}");
    assert_eq!(server.of(Kind::CheckIn).len(), 1);
    let uploads = server.of(Kind::Upload);
    assert_eq!(uploads.len(), 2);
    assert_eq!(uploads[0].body, uploads[1].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_refusals_are_errors_with_their_code() {
    let server = Scripted::start(|req, _| match req.kind {
        Kind::CheckIn => assigned(1, "token-1", 60.0),
        Kind::Model => model(),
        Kind::Upload => error(ErrorCode::NormTooLarge, None),
        Kind::Other => error(ErrorCode::NotFound, None),
    })
    .await;
    let mut device = Device::new(HttpTransport::new(&server.url), line_data(), options(1));
    let err = device.run(|_| {}).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NormTooLarge), "{err}");
    assert!(matches!(
        err,
        ClientError::Refused {
            status: 422,
            code: Some(ErrorCode::NormTooLarge),
            ..
        }
    ));
    assert_eq!(server.of(Kind::Upload).len(), 1, "not retried");
}
