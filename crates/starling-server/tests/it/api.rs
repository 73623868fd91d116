//! The HTTP API against a real server on 127.0.0.1:0 with a real SQLite file.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use starling_core::{Parameters, Tensor};
use starling_server::settings::{RoundPolicy, Secret, TaskSettings};

use crate::harness::{self, delta, encode, expected_fold, policy, small_task, Assigned, Harness};

/// A server with the task `task`, whose uploads may be `max_body_bytes` long.
async fn start_task(task: TaskSettings, max_body_bytes: usize) -> Harness {
    harness::start(task, |s| s.max_body_bytes = max_body_bytes).await
}

async fn start_with(policy: RoundPolicy, max_body_bytes: usize) -> Harness {
    start_task(small_task(policy), max_body_bytes).await
}

async fn start(goal: u32) -> Harness {
    start_with(policy(goal, 1, 60.0), 1 << 20).await
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// The parameters FedAvg must commit for these valid updates on the demo's initial model.
fn expected_after(updates: &[(Parameters, u64)]) -> Parameters {
    let base = starling_core::trainer::builtin::linear(1, 1).init_params(0);
    expected_fold(&base, updates)
}

#[tokio::test]
async fn health_tasks_and_model_download_with_etag() {
    let h = start(2).await;
    assert_eq!(h.get_json("/v1/health").await["status"], "ok");
    let tasks = h.get_json("/v1/tasks").await;
    assert_eq!(tasks[0]["name"], "linear");
    assert_eq!(tasks[0]["version"], 0);
    assert_eq!(tasks[0]["parameters"]["W"], 5.0);
    assert_eq!(tasks[0]["parameters"]["b"], 3.0);
    let (v, p) = h.model().await;
    assert_eq!(v, 0);
    assert_eq!(p.get("W").unwrap().data(), &[5.0]);
    let r = h
        .get("/v1/tasks/linear/model")
        .header("if-none-match", "\"0\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let spec: Value = h.get_json("/v1/openapi.json").await;
    assert!(spec["paths"]["/v1/tasks/{task}/checkin"].is_object());
    assert!(h
        .metrics()
        .await
        .contains("starling_model_version{task=\"linear\"} 0"));
}

#[tokio::test]
async fn a_round_commits_at_its_goal_with_the_weighted_average() {
    let h = start(2).await;
    let a = h.assigned().await;
    let b = h.assigned().await;
    assert_eq!((a.round, a.base_version), (1, 0));
    assert_ne!(a.token, b.token);
    let (s, v) = h.upload(&a, &delta(-1.0, -0.5), 30).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["updates_in_round"], 1);
    let (s, _) = h.upload(&b, &delta(-2.0, 0.5), 10).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let t = h.wait_version(1).await;
    assert_eq!(t["round"]["round"], 2);
    let (v, p) = h.model().await;
    assert_eq!(v, 1);
    assert_eq!(
        p,
        expected_after(&[(delta(-1.0, -0.5), 30), (delta(-2.0, 0.5), 10)])
    );
    // W = 5 + (30 * -1 + 10 * -2) / 40 = 3.75
    assert!((p.get("W").unwrap().data()[0] - 3.75).abs() < 1e-6);
    let hist = h.get_json("/v1/tasks/linear/rounds").await;
    let r1 = &hist["rounds"][0];
    assert_eq!(r1["status"], "committed");
    assert_eq!(r1["participants"], 2);
    assert_eq!(r1["examples"], 40);
    assert_eq!(r1["version"], 1);
}

#[tokio::test]
async fn devices_beyond_the_goal_are_told_when_to_come_back() {
    let h = start_with(
        RoundPolicy {
            overcommit: 1.0,
            ..policy(2, 1, 60.0)
        },
        1 << 20,
    )
    .await;
    h.assigned().await;
    h.assigned().await;
    let r = h.post("/v1/tasks/linear/checkin").send().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "retry");
    let secs = v["retry_after_secs"].as_f64().unwrap();
    assert!((1.0..=1.5).contains(&secs), "{secs}");
}

/// Every refusal: a JSON error with a 4xx status, and the round's aggregate unchanged — the
/// round finally commits exactly what the valid updates alone give.
#[tokio::test]
async fn bad_updates_are_refused_and_leave_the_aggregate_unchanged() {
    let h = start_with(policy(3, 1, 60.0), 4096).await;
    let a = h.assigned().await;
    let good = delta(-1.0, 0.25);
    let (s, _) = h.upload(&a, &good, 20).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let b = h.assigned().await;
    let round = b.round.to_string();

    let meta = |examples: i64, base: u64| {
        HashMap::from([
            ("base_version".to_string(), base.to_string()),
            ("examples".to_string(), examples.to_string()),
            ("token".to_string(), b.token.clone()),
        ])
    };
    let wrong_name = Parameters::new(vec![
        ("W".into(), Tensor::full(vec![1, 1], 1.0)),
        ("c".into(), Tensor::full(vec![1], 1.0)),
    ])
    .unwrap();
    let wrong_shape = Parameters::new(vec![
        ("W".into(), Tensor::full(vec![2, 1], 1.0)),
        ("b".into(), Tensor::full(vec![1], 1.0)),
    ])
    .unwrap();
    // (what, round, header token, body, status, code)
    type Case<'a> = (&'a str, String, &'a str, Vec<u8>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed body",
            round.clone(),
            &b.token,
            b"not safetensors".to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_update",
        ),
        (
            "empty body",
            round.clone(),
            &b.token,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "malformed_update",
        ),
        (
            "unknown round",
            "999".into(),
            &b.token,
            delta(1.0, 1.0).to_safetensors(Some(meta(5, 0))),
            StatusCode::NOT_FOUND,
            "unknown_round",
        ),
        (
            "non-numeric round",
            "abc".into(),
            &b.token,
            delta(1.0, 1.0).to_safetensors(Some(meta(5, 0))),
            StatusCode::NOT_FOUND,
            "unknown_round",
        ),
        (
            "wrong tensor names",
            round.clone(),
            &b.token,
            wrong_name.to_safetensors(Some(meta(5, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_tensors",
        ),
        (
            "wrong shape",
            round.clone(),
            &b.token,
            wrong_shape.to_safetensors(Some(meta(5, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "wrong_tensors",
        ),
        (
            "NaN",
            round.clone(),
            &b.token,
            delta(f32::NAN, 1.0).to_safetensors(Some(meta(5, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_finite",
        ),
        (
            "infinity",
            round.clone(),
            &b.token,
            delta(1.0, f32::NEG_INFINITY).to_safetensors(Some(meta(5, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_finite",
        ),
        (
            "zero examples",
            round.clone(),
            &b.token,
            delta(1.0, 1.0).to_safetensors(Some(meta(0, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_examples",
        ),
        (
            "negative examples",
            round.clone(),
            &b.token,
            delta(1.0, 1.0).to_safetensors(Some(meta(-3, 0))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_examples",
        ),
        (
            "wrong base version",
            round.clone(),
            &b.token,
            delta(1.0, 1.0).to_safetensors(Some(meta(5, 4))),
            StatusCode::CONFLICT,
            "stale_version",
        ),
        (
            "unknown token",
            round.clone(),
            "forged",
            encode(&delta(1.0, 1.0), 0, 5, None, "forged"),
            StatusCode::FORBIDDEN,
            "invalid_token",
        ),
        (
            "oversized body",
            round.clone(),
            &b.token,
            vec![0u8; 8192],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "second update of an assignment",
            a.round.to_string(),
            &a.token,
            encode(&good, 0, 20, None, &a.token),
            StatusCode::CONFLICT,
            "duplicate_update",
        ),
    ];
    let mut unknown_task = h
        .post("/v1/tasks/nope/rounds/1/updates")
        .header("x-starling-token", &b.token)
        .body(encode(&good, 0, 1, None, &b.token))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_task.status(), StatusCode::NOT_FOUND);
    let v: Value = unknown_task.json().await.unwrap();
    assert_eq!(error_code(&v), "unknown_task");
    unknown_task = h.post("/v1/tasks/nope/checkin").send().await.unwrap();
    assert_eq!(unknown_task.status(), StatusCode::NOT_FOUND);

    for (what, round, token, body, status, code) in cases {
        let (s, v) = h.upload_raw(&round, token, body).await;
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(error_code(&v), code, "{what}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap().is_empty(),
            "{what}"
        );
        assert_eq!(
            h.task().await["round"]["updates"],
            1,
            "{what} changed the round"
        );
    }

    // The assignment that saw every refusal can still deliver, and the round commits exactly
    // the valid updates.
    let (s, v) = h.upload(&b, &delta(-3.0, 0.5), 10).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let c = h.assigned().await;
    let (s, _) = h.upload(&c, &delta(0.5, 0.5), 5).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    h.wait_version(1).await;
    let (_, p) = h.model().await;
    assert_eq!(
        p,
        expected_after(&[(good, 20), (delta(-3.0, 0.5), 10), (delta(0.5, 0.5), 5)])
    );
}

#[tokio::test]
async fn an_update_for_a_committed_round_or_an_old_version_is_refused() {
    let h = start(1).await;
    let a = h.assigned().await;
    let late = h.assigned().await; // overcommit 2: a second assignment of round 1
    let (s, _) = h.upload(&a, &delta(-1.0, -1.0), 10).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    h.wait_version(1).await;
    let (s, v) = h.upload(&late, &delta(1.0, 1.0), 10).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "round_closed"),
        "{v}"
    );
    // Round 2 trains version 1; an update built on version 0 is stale.
    let b = h.assigned().await;
    assert_eq!((b.round, b.base_version), (2, 1));
    let stale = Assigned {
        base_version: 0,
        ..b
    };
    let (s, v) = h.upload(&stale, &delta(1.0, 1.0), 10).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::CONFLICT, "stale_version"),
        "{v}"
    );
    assert_eq!(h.task().await["round"]["updates"], 0);
}

#[tokio::test]
async fn deadline_commits_above_the_minimum_and_abandons_below_it() {
    let h = start_with(policy(5, 2, 0.6), 1 << 20).await;
    // Round 1: one update, minimum two: abandoned at the deadline, model unchanged.
    let a = h.assigned().await;
    assert_eq!(
        h.upload(&a, &delta(1.0, 1.0), 10).await.0,
        StatusCode::ACCEPTED
    );
    let mut t = h.task().await;
    for _ in 0..100 {
        if t["round"]["round"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        t = h.task().await;
    }
    assert_eq!(t["round"]["round"], 2, "{t}");
    assert_eq!(t["version"], 0);
    assert_eq!(h.model().await.1.get("W").unwrap().data(), &[5.0]);
    // Round 2: two updates, minimum two: committed at the deadline.
    let b = h.assigned().await;
    let c = h.assigned().await;
    assert_eq!(b.round, 2);
    assert_eq!(
        h.upload(&b, &delta(-1.0, 0.0), 10).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        h.upload(&c, &delta(-3.0, 0.0), 10).await.0,
        StatusCode::ACCEPTED
    );
    h.wait_version(1).await;
    assert_eq!(h.model().await.1.get("W").unwrap().data(), &[3.0]);
    let hist = h.get_json("/v1/tasks/linear/rounds").await;
    assert_eq!(hist["rounds"][0]["status"], "abandoned");
    assert_eq!(hist["rounds"][0]["participants"], 1);
    assert_eq!(hist["rounds"][1]["status"], "committed");
}

#[tokio::test]
async fn updates_beyond_the_norm_bound_or_with_extra_metadata_are_refused() {
    let h = start_task(
        TaskSettings {
            max_update_norm: 10.0,
            ..small_task(policy(2, 1, 60.0))
        },
        1 << 20,
    )
    .await;
    let a = h.assigned().await;
    let (s, v) = h.upload(&a, &delta(9.0, 9.0), 5).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "norm_too_large"),
        "{v}"
    );
    let extra = delta(1.0, 1.0).to_safetensors(Some(HashMap::from([
        ("base_version".to_string(), "0".to_string()),
        ("examples".to_string(), "5".to_string()),
        ("token".to_string(), a.token.clone()),
        ("x".to_string(), "0.5,0.25,0.125".to_string()),
    ])));
    let (s, v) = h.upload_raw("1", &a.token, extra).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::BAD_REQUEST, "invalid_metadata"),
        "{v}"
    );
    let (s, v) = h.upload(&a, &delta(1.0, 1.0), 2_000_000_000).await;
    assert_eq!(
        (s, error_code(&v)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_examples"),
        "{v}"
    );
    assert_eq!(h.task().await["round"]["updates"], 0);
    let (s, _) = h.upload(&a, &delta(3.0, 4.0), 5).await;
    assert_eq!(s, StatusCode::ACCEPTED);
}

/// A body streamed in chunks without a length is cut off at the limit while it is read.
#[tokio::test]
async fn a_streamed_body_over_the_limit_is_refused_while_reading() {
    let h = start_with(policy(2, 1, 60.0), 4096).await;
    let a = h.assigned().await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![7u8; 1024])).collect();
    let r = h
        .post("/v1/tasks/linear/rounds/1/updates")
        .header("x-starling-token", &a.token)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "payload_too_large");
    // Refused before the engine saw it, and still counted.
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("starling_updates_total{outcome=\"payload_too_large\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_device_gets_one_assignment_per_round() {
    let h = start(3).await;
    let ask = |body: &'static str| {
        h.post("/v1/tasks/linear/checkin")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let first: Value = ask(r#"{"device": "phone-a"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["status"], "assigned");
    let again: Value = ask(r#"{"device": "phone-a"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "retry", "{again}");
    let other: Value = ask(r#"{"device": "phone-b"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["status"], "assigned");
    let bad = ask(r#"{"device": 7}"#).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(error_code(&v), "bad_request");
}

#[tokio::test]
async fn unknown_endpoints_answer_json() {
    let h = start(1).await;
    let r = h.get("/v2/nothing").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "not_found");
    let r = h.get("/v1/tasks/nope/model").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Issue point 1 over real sockets: clients that send a whole valid upload and hang up before
/// the answer (with a reset or a plain close) never freeze the round. Each assignment then
/// delivers (or learns its update already folded), and the round commits all of them.
#[tokio::test]
async fn clients_that_hang_up_after_uploading_never_freeze_the_round() {
    use tokio::io::AsyncWriteExt;
    const N: usize = 40;
    let h = start_with(
        RoundPolicy {
            overcommit: 1.0,
            ..policy(N as u32, N as u32, 600.0)
        },
        1 << 20,
    )
    .await;
    let mut assigned = Vec::new();
    for _ in 0..N {
        assigned.push(h.assigned().await);
    }
    for (i, a) in assigned.iter().enumerate() {
        let body = encode(&delta(1.0, 1.0), 0, 10, None, &a.token);
        let head = format!(
            "POST /v1/tasks/linear/rounds/1/updates HTTP/1.1\r\nhost: x\r\n\
             x-starling-token: {}\r\ncontent-length: {}\r\n\r\n",
            a.token,
            body.len()
        );
        let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        // Hang up at a different moment each time, half with a reset, half with a close.
        for _ in 0..i % 8 {
            tokio::task::yield_now().await;
        }
        if i % 2 == 0 {
            // A reset, deliberately: SO_LINGER 0 makes the close abortive.
            #[allow(deprecated)]
            s.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(s);
    }
    for a in &assigned {
        let (s, v) = h.upload(a, &delta(1.0, 1.0), 10).await;
        assert!(
            s == StatusCode::ACCEPTED
                || ["duplicate_update", "round_closed"].contains(&error_code(&v)),
            "{s} {v}"
        );
    }
    let t = h.wait_version(1).await;
    assert_eq!(t["round"]["round"], 2);
    let hist = h.get_json("/v1/tasks/linear/rounds").await;
    assert_eq!(hist["rounds"][0]["participants"], N);
    assert_eq!(h.model().await.1.get("W").unwrap().data(), &[6.0]);
}

/// Issue point 6 over HTTP: one client address checking in under 13 device ids gets the
/// task's per-address cap of assignments, not the round.
#[tokio::test]
async fn one_client_address_cannot_hoard_a_round_under_many_ids() {
    let h = start_task(
        TaskSettings {
            max_assignments_per_address: 3,
            ..small_task(policy(13, 1, 60.0))
        },
        1 << 20,
    )
    .await;
    let mut assigned = 0;
    for i in 0..13 {
        let v = h.check_in_device(&format!("sybil-{i}")).await;
        if v["status"] == "assigned" {
            assigned += 1;
        } else {
            assert!(v["reason"].as_str().unwrap().contains("address"), "{v}");
        }
    }
    assert_eq!(assigned, 3);
    assert_eq!(h.task().await["round"]["assigned"], 3);
}

/// Behind a proxy every device connects from the proxy's address: with
/// `client_address_header`, the address the proxy appended to `X-Forwarded-For` counts, and
/// the entries before it (the client's to forge) do not.
#[tokio::test]
async fn behind_a_proxy_the_forwarded_address_counts_for_fair_assignment() {
    let h = crate::harness::start(
        TaskSettings {
            max_assignments_per_address: 1,
            ..small_task(policy(10, 1, 60.0))
        },
        |s: &mut starling_server::settings::ServerSettings| {
            s.client_address_header = Some("x-forwarded-for".into());
        },
    )
    .await;
    let ask = |device: &str, forwarded: &str| {
        h.post("/v1/tasks/linear/checkin")
            .header("x-forwarded-for", forwarded)
            .json(&serde_json::json!({ "device": device }))
            .send()
    };
    let status = |r: reqwest::Response| async move {
        let v: Value = r.json().await.unwrap();
        v["status"].as_str().unwrap().to_string()
    };
    // Two phones behind the same proxy, each with its own forwarded address.
    assert_eq!(
        status(ask("a", "203.0.113.1").await.unwrap()).await,
        "assigned"
    );
    assert_eq!(
        status(ask("b", "203.0.113.2").await.unwrap()).await,
        "assigned"
    );
    // A third id from the first phone's address, forging an earlier entry: refused.
    assert_eq!(
        status(ask("c", "198.51.100.9, 203.0.113.1").await.unwrap()).await,
        "retry"
    );
}

/// The admin API: a rollback needs the admin token (and an admin API that is on); with it,
/// the task goes back to a stored version, which becomes a new version.
#[tokio::test]
async fn an_operator_rolls_a_task_back_with_the_admin_token() {
    const TOKEN: &str = "a-long-admin-token-for-tests";
    let rollback = |h: &Harness, token: Option<&str>, version: u64| {
        let mut r = h
            .post("/v1/admin/tasks/linear/rollback")
            .json(&serde_json::json!({ "version": version }));
        if let Some(t) = token {
            r = r.header("x-starling-admin-token", t);
        }
        r.send()
    };
    // The admin API is off without a token in the settings.
    let off = start(1).await;
    let r = rollback(&off, Some(TOKEN), 0).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let h = harness::start(small_task(policy(1, 1, 60.0)), |s| {
        s.admin_token = Some(Secret::new(TOKEN));
    })
    .await;
    for v in 1..=2u64 {
        let a = h.assigned().await;
        assert_eq!(
            h.upload(&a, &delta(-1.0, 0.0), 1).await.0,
            StatusCode::ACCEPTED
        );
        h.wait_version(v).await;
    }
    assert_eq!(h.model().await.1.get("W").unwrap().data(), &[3.0]);
    for token in [None, Some("wrong-token-of-some-length")] {
        let r = rollback(&h, token, 1).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_code(&v), "unauthorized");
    }
    assert_eq!(h.task().await["version"], 2, "refused calls change nothing");
    let r = rollback(&h, Some(TOKEN), 99).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "unknown_version");

    let r = rollback(&h, Some(TOKEN), 1).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["restored"].as_u64(), v["version"].as_u64()),
        (Some(1), Some(3))
    );
    let (version, params) = h.model().await;
    assert_eq!(version, 3);
    assert_eq!(
        params.get("W").unwrap().data(),
        &[4.0],
        "version 1's parameters"
    );
    let hist = h.get_json("/v1/tasks/linear/rounds").await;
    let last = hist["rounds"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["reason"], "rolled_back", "{last}");
}
