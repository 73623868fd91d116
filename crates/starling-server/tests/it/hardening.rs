//! The server under hostile or broken clients, against a real server on 127.0.0.1:0: uploads
//! refused before their body is read, canonical round numbers, JSON for every error, the header
//! and idle timeouts, the per-address connection limit, the in-flight upload limit, and clients
//! that hang up mid-body. Raw TCP where the bytes on the wire matter (`Expect: 100-continue`,
//! trickled headers, half bodies); timeouts are fractions of a second.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use starling_core::wire::protocol::{ErrorBody, UploadReceipt};
use starling_server::settings::{RoundPolicy, ServerSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{self, delta, policy, small_task, Assigned, Harness};

/// A server with one `linear` task whose rounds need one update to commit at the deadline,
/// that hands out many assignments to 127.0.0.1, with `server` adjusted by `adjust`.
async fn start(adjust: impl FnOnce(&mut ServerSettings)) -> Harness {
    let task = small_task(RoundPolicy {
        overcommit: 4.0,
        ..policy(8, 1, 600.0)
    });
    harness::start(task, |s| {
        s.header_timeout_secs = 5.0;
        s.idle_timeout_secs = 5.0;
        s.body_timeout_secs = 5.0;
        s.shutdown_timeout_secs = 1.0;
        adjust(s);
    })
    .await
}

/// The valid update every assignment of these tests delivers, and its example count.
fn update() -> (starling_core::Parameters, u64) {
    (delta(0.5, -0.5), 10)
}

/// Checks in; the assignment and the body of its valid update.
async fn ready(h: &Harness) -> (Assigned, Vec<u8>) {
    let a = h.assigned().await;
    let (d, n) = update();
    let body = a.body(&d, n);
    (a, body)
}

/// Uploads the assignment's valid update over HTTP.
async fn deliver(h: &Harness, a: &Assigned) -> (StatusCode, Value) {
    let (d, n) = update();
    h.upload(a, &d, n).await
}

fn updates_total(outcome: &str) -> String {
    format!("starling_updates_total{{outcome=\"{outcome}\"}}")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// A connection from another loopback address (Linux routes all of 127/8 to `lo`).
async fn connect_from(local: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(local), 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// One response as read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error code of a JSON error body.
    fn code(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/json"));
        let e: ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)));
        e.error.code
    }
}

/// Reads the first response on `stream` (status line, headers, a `Content-Length` body),
/// whatever it is: a `100 Continue` would be read as such.
async fn read_response(stream: &mut TcpStream) -> Raw {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await.expect("reading a response");
            assert!(
                n > 0,
                "closed before a response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let n = stream.read(&mut chunk).await.expect("reading a body");
            assert!(n > 0, "closed mid-body");
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(length);
        Raw {
            status,
            headers,
            body,
        }
    })
    .await
    .expect("a response within 5 s")
}

/// Sends one whole request in one write (so the server holds all of it when it answers early)
/// and reads the answer.
async fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> Raw {
    let mut stream = connect(addr).await;
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.unwrap();
    read_response(&mut stream).await
}

fn upload_head(path: &str, token: Option<&str>, length: usize, expect: bool) -> String {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {length}\r\nConnection: close\r\n"
    );
    if let Some(t) = token {
        head.push_str(&format!("X-Starling-Token: {t}\r\n"));
    }
    if expect {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str("\r\n");
    head
}

/// How long until the server closes `stream` (reads end or fail), if within `within`; panics
/// if the server sends anything instead.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(0)) | Ok(Err(_)) => Some(start.elapsed()),
        Ok(Ok(n)) => panic!(
            "expected the connection to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

#[tokio::test]
async fn an_oversized_upload_is_refused_before_its_body_is_asked_for() {
    let h = start(|_| {}).await;
    let a = h.assigned().await;
    let limit = h.server.tasks[0].max_upload_bytes();
    let mut stream = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, Some(&a.token), limit + 1, true);
    stream.write_all(head.as_bytes()).await.unwrap();
    // Hyper sends `100 Continue` only once the handler reads the body; the first (and only)
    // answer must be the refusal.
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    assert_eq!(h.metric(&updates_total("payload_too_large")).await, 1);
    // A chunked body has no declared size: it is cut off at the limit while it is read.
    let mut chunked = format!(
        "POST {} HTTP/1.1\r\nHost: test\r\nX-Starling-Token: {}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n",
        a.upload_url,
        a.token,
        limit + 1
    )
    .into_bytes();
    chunked.extend(std::iter::repeat_n(b'x', limit + 1));
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = exchange(h.addr(), "", &chunked).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    assert_eq!(h.round_updates().await, 0);
    // The assignment is still good for a real update.
    assert_eq!(deliver(&h, &a).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn an_upload_without_a_token_is_refused_before_its_body_is_asked_for() {
    let h = start(|_| {}).await;
    let (a, body) = ready(&h).await;
    let mut stream = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, None, body.len(), true);
    stream.write_all(head.as_bytes()).await.unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.code(), "missing_token");
    assert_eq!(h.metric(&updates_total("missing_token")).await, 1);
    // A token that is not an assignment of the round is refused before the body too.
    let mut stream = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, Some("not-a-token"), body.len(), true);
    stream.write_all(head.as_bytes()).await.unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.code(), "invalid_token");
    assert_eq!(h.round_updates().await, 0);
}

#[tokio::test]
async fn round_numbers_must_be_canonical_on_the_raw_path() {
    let h = start(|_| {}).await;
    let (a, body) = ready(&h).await;
    let r = a.round;
    let percent: String = r.to_string().bytes().map(|d| format!("%{d:02X}")).collect();
    let bad = [
        format!("+{r}"),
        format!("0{r}"),
        percent,
        format!("{r}%20"),
        "+10".into(),
        "010".into(),
        "%31".into(),
        "18446744073709551616".into(),
    ];
    for round in bad {
        let path = format!("/v1/tasks/linear/rounds/{round}/updates");
        let head = upload_head(&path, Some(&a.token), body.len(), false);
        let resp = exchange(h.addr(), &head, &body).await;
        assert_eq!(resp.status, 404, "{round}: {resp:?}");
        assert_eq!(resp.code(), "unknown_round", "{round}");
    }
    assert_eq!(h.round_updates().await, 0);
    // The canonical spelling of the same round takes the same update.
    let path = format!("/v1/tasks/linear/rounds/{r}/updates");
    let head = upload_head(&path, Some(&a.token), body.len(), false);
    let resp = exchange(h.addr(), &head, &body).await;
    assert_eq!(resp.status, 202, "{resp:?}");
    let receipt: UploadReceipt = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!((receipt.round, receipt.updates_in_round), (r, 1));
}

#[tokio::test]
async fn an_oversized_check_in_is_refused_as_payload_too_large() {
    let h = start(|s| s.max_body_bytes = 1024).await;
    let device = "d".repeat(2000);
    let body = format!("{{\"device\": \"{device}\"}}");
    let head = format!(
        "POST /v1/tasks/linear/checkin HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let r = exchange(h.addr(), &head, body.as_bytes()).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    // Chunked: counted while read.
    let head = "POST /v1/tasks/linear/checkin HTTP/1.1\r\nHost: test\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let r = exchange(h.addr(), head, chunked.as_bytes()).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.code(), "payload_too_large");
    // Under the limit, a device id over 128 characters is a bad request, and a good one works.
    let r = h
        .post("/v1/tasks/linear/checkin")
        .body(format!("{{\"device\": \"{}\"}}", "d".repeat(129)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = h
        .post("/v1/tasks/linear/checkin")
        .body(r#"{"device": "phone-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_error_answer_is_json() {
    let h = start(|_| {}).await;
    let long = format!("/v1/health?pad={}", "x".repeat(9000));
    let cases: [(reqwest::Method, String, u16, &str); 6] = [
        (
            reqwest::Method::DELETE,
            "/v1/health".into(),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            "/v1/tasks/linear/checkin".into(),
            405,
            "method_not_allowed",
        ),
        (reqwest::Method::GET, long, 414, "uri_too_long"),
        (
            reqwest::Method::GET,
            "/no/such/thing".into(),
            404,
            "not_found",
        ),
        (
            reqwest::Method::GET,
            "/v1/tasks/nope".into(),
            404,
            "unknown_task",
        ),
        // Not UTF-8 once decoded: axum's path extractor refuses it.
        (
            reqwest::Method::GET,
            "/v1/tasks/%FF".into(),
            400,
            "bad_request",
        ),
    ];
    for (method, path, status, code) in cases {
        let r = h
            .http
            .request(method.clone(), h.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "{method} {}",
            &path[..path.len().min(40)]
        );
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        if status == 405 {
            assert!(
                r.headers().contains_key("allow"),
                "405 keeps its Allow header"
            );
        }
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.error.code, code);
        assert!(!e.error.message.is_empty());
    }
    let r = h
        .post("/v1/tasks/linear/checkin")
        .body(r#"{"photo": "x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<ErrorBody>().await.unwrap().error.code,
        "bad_request"
    );
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_after_the_header_timeout() {
    let h = start(|s| s.header_timeout_secs = 0.4).await;
    // Bytes keep coming, but the request's headers never end.
    let stream = connect(h.addr()).await;
    let start = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let _ = writer
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n")
        .await;
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => start.elapsed(),
            Ok(n) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
        }
    });
    while !closed.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(4), "never cut off");
        let _ = writer.write_all(b"X-Slow: a\r\n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = closed.await.unwrap();
    assert!(
        after >= Duration::from_millis(350),
        "cut off too early: {after:?}"
    );
    // A connection that sends nothing at all gets the same time.
    let mut silent = connect(h.addr()).await;
    let after = closed_within(&mut silent, Duration::from_secs(4))
        .await
        .expect("a silent connection is closed");
    assert!(after >= Duration::from_millis(350), "{after:?}");
    // Meanwhile the server answers others.
    let r = h.get("/v1/health").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let h = start(|s| s.idle_timeout_secs = 0.8).await;
    let mut stream = connect(h.addr()).await;
    // Requests closer together than the idle timeout keep the connection.
    for _ in 0..3 {
        stream
            .write_all(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = closed_within(&mut stream, Duration::from_secs(4))
        .await
        .expect("an idle connection is closed");
    // 200 ms of the idle time passed in the loop's last sleep.
    assert!(
        after >= Duration::from_millis(500),
        "closed too early: {after:?}"
    );
}

#[tokio::test]
async fn a_flood_from_one_address_does_not_lock_out_others() {
    let h = start(|s| {
        s.max_connections = 16;
        s.max_connections_per_address = 4;
        s.header_timeout_secs = 30.0;
    })
    .await;
    let flooder = Ipv4Addr::new(127, 0, 0, 2);
    let mut flood = Vec::new();
    for _ in 0..24 {
        flood.push(connect_from(flooder, h.addr()).await);
    }
    let outcomes = futures_util::future::join_all(
        flood
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(1))),
    )
    .await;
    let closed = outcomes.iter().filter(|o| o.is_some()).count();
    assert_eq!(
        closed, 20,
        "all but max_connections_per_address are closed at once"
    );
    assert_eq!(h.metric("starling_connections_refused_total").await, 20);
    // The four idle connections the flooder holds do not keep 127.0.0.1 out.
    let r = tokio::time::timeout(Duration::from_secs(2), h.get("/v1/health").send())
        .await
        .expect("health answers during the flood")
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(h.metric("starling_connections_open").await >= 4);
    drop(flood);
}

#[tokio::test]
async fn uploads_beyond_the_in_flight_limit_are_told_to_come_back() {
    let h = start(|s| s.max_uploads_in_flight = 2).await;
    let slow = [ready(&h).await, ready(&h).await];
    let (third, third_body) = ready(&h).await;
    // Two uploads send their headers and a few bytes, then stall: both hold a slot.
    let mut stalled = Vec::new();
    for (a, body) in &slow {
        let mut stream = connect(h.addr()).await;
        let head = upload_head(&a.upload_url, Some(&a.token), body.len(), false);
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..16]).await.unwrap();
        stalled.push(stream);
    }
    h.metric_reaches("starling_uploads_in_flight", 2).await;
    let head = upload_head(
        &third.upload_url,
        Some(&third.token),
        third_body.len(),
        false,
    );
    let r = exchange(h.addr(), &head, &third_body).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.code(), "busy");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(h.metric(&updates_total("busy")).await, 1);
    // The stalled clients give up; their slots come back, and the third upload goes in.
    drop(stalled);
    h.metric_reaches("starling_uploads_in_flight", 0).await;
    h.metric_reaches(&updates_total("client_disconnected"), 2)
        .await;
    assert_eq!(deliver(&h, &third).await.0, StatusCode::ACCEPTED);
    assert_eq!(h.round_updates().await, 1);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_body_is_counted_and_changes_nothing() {
    let h = start(|_| {}).await;
    let (a, body) = ready(&h).await;
    let mut stream = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, Some(&a.token), body.len(), false);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    drop(stream);
    h.metric_reaches(&updates_total("client_disconnected"), 1)
        .await;
    assert_eq!(h.metric(&updates_total("malformed_update")).await, 0);
    assert_eq!(h.metric("starling_uploads_in_flight").await, 0);
    assert_eq!(h.round_updates().await, 0);
    // Nothing was reserved: the assignment still delivers its update.
    let (status, v) = deliver(&h, &a).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let receipt: UploadReceipt = serde_json::from_value(v).unwrap();
    assert_eq!(receipt.updates_in_round, 1);
}

#[tokio::test]
async fn a_body_that_arrives_too_slowly_is_refused_with_408() {
    let h = start(|s| s.body_timeout_secs = 0.3).await;
    let (a, body) = ready(&h).await;
    let mut stream = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, Some(&a.token), body.len(), false);
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..16]).await.unwrap();
    let r = read_response(&mut stream).await;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.code(), "request_timeout");
    assert_eq!(h.metric(&updates_total("request_timeout")).await, 1);
    assert_eq!(h.round_updates().await, 0);
    assert_eq!(deliver(&h, &a).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_and_lets_requests_in_flight_finish() {
    let h = start(|s| {
        s.body_timeout_secs = 1.5;
        s.shutdown_timeout_secs = 10.0;
    })
    .await;
    let (a, body) = ready(&h).await;
    // A kept-alive connection, idle.
    let mut idle = connect(h.addr()).await;
    idle.write_all(b"GET /v1/health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.status, 200);
    // An upload in flight whose body stalls: its handler answers 408 after the body timeout.
    let mut stalled = connect(h.addr()).await;
    let head = upload_head(&a.upload_url, Some(&a.token), body.len(), false);
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&body[..16]).await.unwrap();
    h.metric_reaches("starling_uploads_in_flight", 1).await;
    let start = Instant::now();
    let addr = h.addr();
    let stopping = tokio::spawn(h.server.stop());
    let closed = closed_within(&mut idle, Duration::from_secs(2)).await;
    assert!(
        closed.is_some_and(|t| t < Duration::from_secs(1)),
        "the idle connection is closed at once: {closed:?}"
    );
    let r = read_response(&mut stalled).await;
    assert_eq!(r.status, 408, "the request in flight is answered: {r:?}");
    stopping.await.unwrap().unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "stopping waited for the request in flight, not the whole grace: {took:?}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
