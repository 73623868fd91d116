//! Enrolled tasks over HTTP: enrollment with the task's secret, a credential on every request,
//! one assignment per credential per round, upload tokens bound to their credential,
//! revocation, and credentials kept only as digests that survive a restart. Every refusal
//! leaves the round as it was.

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use starling_core::wire::protocol::{ADMIN_TOKEN_HEADER, TOKEN_HEADER};
use starling_server::settings::{Admission, Secret, TaskSettings};

use crate::harness::{delta, policy, small_task, start, Assigned, Harness};

const SECRET: &str = "enroll-me-please-0123";
const ADMIN: &str = "admin-token-0123456789";

fn enrolled_task() -> TaskSettings {
    TaskSettings {
        admission: Some(Admission::Enrolled),
        enrollment_secret: Some(Secret::new(SECRET)),
        ..small_task(policy(3, 1, 3600.0))
    }
}

async fn enrolled_server() -> Harness {
    start(enrolled_task(), |s| {
        s.admin_token = Some(Secret::new(ADMIN))
    })
    .await
}

/// Enrolls with `secret`; the status and the answer.
async fn enroll(h: &Harness, secret: &str) -> (StatusCode, Value) {
    let r = h
        .post("/v1/tasks/linear/enroll")
        .json(&json!({"secret": secret, "label": "test device"}))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// Enrolls a device; its id and credential.
async fn new_device(h: &Harness) -> (String, String) {
    let (status, v) = enroll(h, SECRET).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    (
        v["device"].as_str().unwrap().to_string(),
        v["credential"].as_str().unwrap().to_string(),
    )
}

/// A check-in presenting `credential` (if any) and naming itself `name`.
async fn check_in(h: &Harness, credential: Option<&str>, name: &str) -> (StatusCode, Value) {
    let mut req = h
        .post("/v1/tasks/linear/checkin")
        .json(&json!({"device": name}));
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap())
}

async fn assigned(h: &Harness, credential: &str) -> Assigned {
    let (status, v) = check_in(h, Some(credential), "any").await;
    assert_eq!(status, StatusCode::OK);
    Assigned::try_from(
        serde_json::from_value::<starling_core::wire::protocol::CheckInAnswer>(v).unwrap(),
    )
    .unwrap_or_else(|other| panic!("expected an assignment, got {other:?}"))
}

async fn upload(h: &Harness, a: &Assigned, credential: Option<&str>) -> (StatusCode, Value) {
    let mut req = h
        .post(&a.upload_url)
        .header(TOKEN_HEADER, &a.token)
        .body(a.body(&delta(0.5, 0.5), 10));
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn an_enrolled_task_admits_only_devices_with_a_credential() {
    let h = enrolled_server().await;
    assert_eq!(h.task().await["admission"], "enrolled");

    // No credential, a forged one, a wrong secret: refused, and nothing assigned.
    let (status, v) = check_in(&h, None, "phone").await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::UNAUTHORIZED, "missing_credential")
    );
    let forged = format!("stc_{}", "ab".repeat(32));
    let (status, v) = check_in(&h, Some(&forged), "phone").await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::UNAUTHORIZED, "invalid_credential")
    );
    let (status, v) = enroll(&h, "not-the-secret-at-all").await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::FORBIDDEN, "enrollment_refused")
    );
    assert_eq!(h.task().await["round"]["assigned"], 0);

    // Enrolled: one assignment per credential per round, whatever id the body claims.
    let (id, credential) = new_device(&h).await;
    assert!(id.starts_with("d-"), "{id}");
    assert!(
        credential.starts_with("stc_") && credential.len() == 68,
        "{credential}"
    );
    let a = assigned(&h, &credential).await;
    let (status, v) = check_in(&h, Some(&credential), "another-name").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["status"], "retry", "{v}");
    assert_eq!(h.task().await["round"]["assigned"], 1);

    // An upload needs the credential too, checked before the body is read.
    let (status, v) = upload(&h, &a, None).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::UNAUTHORIZED, "missing_credential")
    );
    let (status, v) = upload(&h, &a, Some(&credential)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(h.round_updates().await, 1);
}

#[tokio::test]
async fn an_upload_token_works_only_with_the_credential_it_was_handed_to() {
    let h = enrolled_server().await;
    let (_, alice) = new_device(&h).await;
    let (_, bob) = new_device(&h).await;
    let bobs = assigned(&h, &bob).await;

    // Alice, with her own valid credential, tries Bob's token: refused, nothing folded.
    let (status, v) = upload(&h, &bobs, Some(&alice)).await;
    assert_eq!((status, code(&v)), (StatusCode::FORBIDDEN, "invalid_token"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another device"),
        "{v}"
    );
    assert_eq!(h.round_updates().await, 0);
    // The same for an evaluation report.
    let r = h
        .post(&format!(
            "/v1/tasks/linear/rounds/{}/evaluations",
            bobs.round
        ))
        .header(TOKEN_HEADER, &bobs.token)
        .bearer_auth(&alice)
        .json(&json!({"base_version": 0, "examples": 3, "loss": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Bob's own upload still goes through.
    let (status, v) = upload(&h, &bobs, Some(&bob)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(h.round_updates().await, 1);
}

#[tokio::test]
async fn a_revoked_credential_is_refused_and_listed_as_revoked() {
    let h = enrolled_server().await;
    let (id, credential) = new_device(&h).await;
    let (_, other) = new_device(&h).await;
    let a = assigned(&h, &credential).await;

    // Revoking needs the admin token.
    let revoke = format!("/v1/admin/tasks/linear/devices/{id}/revoke");
    let r = h.post(&revoke).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = h
        .post(&revoke)
        .header(ADMIN_TOKEN_HEADER, "wrong-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = h
        .post(&revoke)
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // From the next request on: its check-in and its pending upload are refused.
    let (status, v) = check_in(&h, Some(&credential), "x").await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::FORBIDDEN, "revoked_credential")
    );
    let (status, v) = upload(&h, &a, Some(&credential)).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::FORBIDDEN, "revoked_credential")
    );
    assert_eq!(h.round_updates().await, 0);
    // Others go on.
    assert_eq!(
        check_in(&h, Some(&other), "y").await.1["status"],
        "assigned"
    );

    // The operator's lists: the device revoked, its check-ins counted, and the credential's
    // digest prefix matching the credential (how a leaked one is traced).
    let devices = h
        .get("/v1/admin/tasks/linear/devices")
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let list = devices["devices"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mine = list.iter().find(|d| d["id"] == id.as_str()).unwrap();
    assert!(mine["revoked_at_ms"].is_i64(), "{mine}");
    assert_eq!(mine["check_ins"], 1);
    assert_eq!(mine["label"], "test device");
    let creds = h
        .get("/v1/admin/tasks/linear/credentials")
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let c = creds["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["device"] == id.as_str())
        .unwrap();
    let digest = Sha256::digest(credential.as_bytes());
    let prefix: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(c["sha256_prefix"], prefix.as_str());
    assert_eq!(c["status"], "revoked");
    // An unknown device cannot be revoked.
    let r = h
        .post("/v1/admin/tasks/linear/devices/d-nobody/revoke")
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn credentials_are_stored_as_digests_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let settings = || {
        let mut s = starling_server::Settings::default();
        s.server.data_dir = dir.path().to_path_buf();
        s.tasks = vec![enrolled_task()];
        s
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(), listener).await.unwrap();
    let http = reqwest::Client::new();
    let answer: Value = http
        .post(format!("{}/v1/tasks/linear/enroll", server.url()))
        .json(&json!({"secret": SECRET}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credential = answer["credential"].as_str().unwrap().to_string();
    server.stop().await.unwrap();

    // Neither the credential nor the enrollment secret is anywhere in the data directory.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for secret in [credential.as_str(), SECRET] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is stored in the clear"
            );
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = starling_server::spawn(settings(), listener).await.unwrap();
    let v: Value = http
        .post(format!("{}/v1/tasks/linear/checkin", server.url()))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "assigned", "{v}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_open_task_takes_no_enrollment_and_ignores_credentials() {
    let h = start(small_task(policy(3, 1, 3600.0)), |_| {}).await;
    let (status, v) = enroll(&h, SECRET).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::FORBIDDEN, "enrollment_refused")
    );
    assert_eq!(h.task().await["admission"], "open");
    let (status, v) = check_in(&h, Some("stc_whatever"), "phone").await;
    assert_eq!(
        (status, v["status"].as_str()),
        (StatusCode::OK, Some("assigned"))
    );
}

#[tokio::test]
async fn a_flooding_address_or_credential_is_told_when_to_come_back() {
    // Per address: the sixth check-in in a minute is refused before anything is assigned.
    let h = start(small_task(policy(100, 1, 3600.0)), |s| {
        s.rate_limit_per_address = 5;
    })
    .await;
    for i in 0..5 {
        assert_eq!(check_in(&h, None, &format!("d{i}")).await.0, StatusCode::OK);
    }
    let r = h
        .post("/v1/tasks/linear/checkin")
        .json(&json!({"device": "d5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "rate_limited");
    assert_eq!(h.task().await["round"]["assigned"], 5);
    assert_eq!(
        h.metric("starling_rate_limited_total{scope=\"address\"}")
            .await,
        1
    );

    // Per credential: one device's flood does not stop another's.
    let h = start(enrolled_task(), |s| s.rate_limit_per_credential = 3).await;
    let (_, noisy) = new_device(&h).await;
    let (_, quiet) = new_device(&h).await;
    for _ in 0..3 {
        assert_eq!(check_in(&h, Some(&noisy), "x").await.0, StatusCode::OK);
    }
    let (status, v) = check_in(&h, Some(&noisy), "x").await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert_eq!(check_in(&h, Some(&quiet), "y").await.0, StatusCode::OK);
    assert_eq!(
        h.metric("starling_rate_limited_total{scope=\"credential\"}")
            .await,
        1
    );
}

/// Enrolls with `secret` from `address` (named in the proxy's header); the status, the
/// `Retry-After` and the answer.
async fn enroll_from(h: &Harness, address: &str, secret: &str) -> (StatusCode, Option<u64>, Value) {
    let r = h
        .post("/v1/tasks/linear/enroll")
        .header("x-real-ip", address)
        .json(&json!({"secret": secret}))
        .send()
        .await
        .unwrap();
    let wait = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (r.status(), wait, r.json().await.unwrap())
}

#[tokio::test]
async fn an_address_guessing_the_enrollment_secret_is_stopped_before_the_secret_is_compared() {
    let h = start(enrolled_task(), |s| {
        s.enrollment_failures_per_address = 3;
        s.client_address_header = Some("x-real-ip".into());
        s.admin_token = Some(Secret::new(ADMIN));
    })
    .await;
    let guesser = "203.0.113.7";
    for guess in ["guess-one-000000", "guess-two-000000", "guess-three-0000"] {
        let (status, _, v) = enroll_from(&h, guesser, guess).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::FORBIDDEN, "enrollment_refused")
        );
    }
    // Past its failures, even the right secret is refused: nothing is compared this minute.
    let (status, wait, v) = enroll_from(&h, guesser, SECRET).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{v}"
    );
    assert!(wait.is_some_and(|w| (1..=60).contains(&w)), "{wait:?}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("wrong enrollment secrets"));
    // Another address (a phone behind the same carrier, say) enrolls as usual, and correct
    // enrollments never count against an address.
    for _ in 0..5 {
        let (status, _, v) = enroll_from(&h, "198.51.100.2", SECRET).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    assert_eq!(
        h.metric("starling_rate_limited_total{scope=\"enrollment\"}")
            .await,
        1
    );
    let devices: Value = h
        .get("/v1/admin/tasks/linear/devices")
        .header(ADMIN_TOKEN_HEADER, ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        devices["devices"].as_array().map(Vec::len),
        Some(5),
        "{devices}"
    );
}
