//! Secure aggregation's HTTP calls against a real server on 127.0.0.1:0: the check-in
//! answer of a secure round, and refusals with stable codes before anything is read or
//! changed (no token, an unknown token, a step out of turn, keys twice, a key that is not
//! 64 hex digits, a masked input of the wrong declared length or too large, refused without
//! its body being read), a client that hangs up mid-message, and a plain task's refusal of
//! secure calls. The whole round over HTTP is `starling-client`'s
//! `secure::devices_commit_a_secure_round_over_http_like_plain_fedavg`.

use std::time::Duration;

use rand::SeedableRng;
use reqwest::StatusCode;
use serde_json::{json, Value};
use starling_core::secagg::encode::FixedPoint;
use starling_core::secagg::protocol::{Client, Params};
use starling_core::wire::protocol::{
    from_hex, to_hex, CheckInAnswer, SecureAssignment, TOKEN_HEADER,
};
use starling_server::settings::{RoundPolicy, SecureAggregationPolicy, TaskSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{self, Harness};

fn task() -> TaskSettings {
    TaskSettings {
        rounds: RoundPolicy {
            goal: 3,
            min: 2,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        min_cohort: 2,
        max_assignments_per_address: 100,
        secure_aggregation: Some(SecureAggregationPolicy::default()),
        ..TaskSettings::default()
    }
}

async fn check_in(h: &Harness, device: &str) -> (u64, String, SecureAssignment) {
    let v = h.check_in_device(device).await;
    match serde_json::from_value::<CheckInAnswer>(v).unwrap() {
        CheckInAnswer::Assigned {
            round,
            token,
            secure,
            ..
        } => (round, token, secure.expect("a secure round's answer")),
        other => panic!("not assigned: {other:?}"),
    }
}

async fn code(r: reqwest::Response) -> (StatusCode, String) {
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().into(),
    )
}

fn keys_json(s: &SecureAssignment, round: u64, seed: u64) -> Value {
    let devices = s.devices as usize;
    let params = Params::new(
        round,
        devices,
        s.min_survivors as usize,
        FixedPoint::new(s.input_bits, devices).unwrap(),
        s.input_len as usize,
        from_hex(&s.graph_seed).unwrap().try_into().unwrap(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (_, k) = Client::new(s.index as usize, params, &mut rng);
    json!({"encryption": to_hex(&k.encryption), "masking": to_hex(&k.masking)})
}

#[tokio::test]
async fn secure_calls_refuse_misuse_with_stable_codes_before_reading_bodies() {
    let h = harness::start(task(), |_| {}).await;
    let (round, t0, s0) = check_in(&h, "a").await;
    let (_, t1, s1) = check_in(&h, "b").await;
    let (_, t2, s2) = check_in(&h, "c").await;
    assert_eq!(
        s0.secure_url,
        format!("/v1/tasks/linear/rounds/{round}/secagg")
    );
    assert_eq!(s0.input_len, 2 + 4, "W, b and the four extra values");
    assert_eq!((s0.index, s1.index, s2.index), (0, 1, 2));
    assert_eq!(s0.devices, 3);
    // The task says its rounds are secure.
    let t = h.task().await;
    assert_eq!(t["secure_aggregation"]["input_bits"], 16, "{t}");
    let url = |step: &str| format!("{}/{step}", s0.secure_url);
    let input_bytes = 4 * s0.input_len as usize;

    // No token; a token of no assignment.
    let r = h
        .post(&url("keys"))
        .json(&keys_json(&s0, round, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::UNAUTHORIZED, "missing_token".into())
    );
    let r = h
        .post(&url("keys"))
        .header(TOKEN_HEADER, "nobody")
        .json(&keys_json(&s0, round, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::FORBIDDEN, "invalid_token".into())
    );
    // A masked input while the round advertises keys.
    let r = h
        .post(&url("input"))
        .header(TOKEN_HEADER, &t0)
        .body(vec![0u8; input_bytes])
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::CONFLICT, "wrong_phase".into()));
    // A masked input of the wrong length, or beyond the round's size.
    let r = h
        .post(&url("input"))
        .header(TOKEN_HEADER, &t0)
        .body(vec![0u8; input_bytes - 4])
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "wrong_length".into())
    );
    let r = h
        .post(&url("input"))
        .header(TOKEN_HEADER, &t0)
        .body(vec![0u8; input_bytes + 4])
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
    // A huge declared body is refused from its headers alone: the answer comes while the
    // client has sent no byte of it.
    let mut raw = TcpStream::connect(h.addr()).await.unwrap();
    raw.write_all(
        format!(
            "POST {} HTTP/1.1\r\nhost: x\r\nx-starling-token: {t0}\r\ncontent-length: 100000000\r\n\r\n",
            url("input")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut answer))
        .await
        .expect("answered before the body")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    drop(raw);
    // A key that is not 64 hex digits.
    let r = h
        .post(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .json(&json!({"encryption": "abcd", "masking": "00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "wrong_length".into())
    );
    // Keys, then the same keys again.
    let r = h
        .post(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .json(&keys_json(&s0, round, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = h
        .post(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .json(&keys_json(&s0, round, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "duplicate_message".into())
    );
    // Asking for the neighbours' keys too early: come back later.
    let r = h
        .get(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let wait: Value = r.json().await.unwrap();
    assert_eq!(wait["status"], "wait");
    assert_eq!(wait["phase"], "advertise_keys");
    // Device c hangs up halfway through its keys: nothing of it is taken.
    let mut raw = TcpStream::connect(h.addr()).await.unwrap();
    raw.write_all(
        format!(
            "POST {} HTTP/1.1\r\nhost: x\r\nx-starling-token: {t2}\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"encryption\": \"00",
            url("keys")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    drop(raw);
    assert_eq!(h.task().await["round"]["round"], round);
    // b and c advertise: the step closes at its goal and a sees both neighbours.
    for (t, s, seed) in [(&t1, &s1, 2), (&t2, &s2, 3)] {
        let r = h
            .post(&url("keys"))
            .header(TOKEN_HEADER, t)
            .json(&keys_json(s, round, seed))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{:?}", r.text().await);
    }
    let r = h
        .get(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let keys: Value = r.json().await.unwrap();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "{keys}");
    // Keys after the step closed; shares for nobody.
    let r = h
        .post(&url("keys"))
        .header(TOKEN_HEADER, &t0)
        .json(&keys_json(&s0, round, 9))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::CONFLICT, "duplicate_message".into())
    );
    let r = h
        .post(&url("shares"))
        .header(TOKEN_HEADER, &t0)
        .json(&json!({"envelopes": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (StatusCode::BAD_REQUEST, "invalid_shares".into())
    );
    // /metrics counts the secure messages the engine answered, refusals by code.
    let metrics = h
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |step: &str, outcome: &str| -> u64 {
        let prefix =
            format!("starling_secagg_messages_total{{step=\"{step}\",outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert!(count("keys", "accepted") >= 3, "{metrics}");
    assert!(count("shares", "invalid_shares") >= 1, "{metrics}");
    assert!(
        count("keys", "duplicate_message") + count("keys", "wrong_phase") >= 1,
        "{metrics}"
    );
    h.server.stop().await.unwrap();

    // A task without secure aggregation refuses the calls.
    let plain = harness::start(harness::small_task(harness::policy(2, 1, 60.0)), |_| {}).await;
    assert!(plain.task().await["secure_aggregation"].is_null());
    let a = plain.assigned().await;
    let r = plain
        .post(&format!("/v1/tasks/linear/rounds/{}/secagg/keys", a.round))
        .header(TOKEN_HEADER, &a.token)
        .json(&json!({"encryption": "00", "masking": "00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (StatusCode::CONFLICT, "wrong_phase".into()));
    plain.server.stop().await.unwrap();
}
