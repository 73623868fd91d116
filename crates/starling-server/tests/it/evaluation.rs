//! Federated evaluation rounds: every `evaluate_every` committed training rounds, a round in
//! which devices score the current model on their data and report loss, accuracy and example
//! count. Through the engine's handle and over real HTTP: the reports' example-weighted means
//! are recorded beside the training rounds, the model does not move, bad reports are refused
//! with a code and change nothing, and a round of too few devices publishes nothing.

use std::time::Duration;

use serde_json::{json, Value};
use starling_core::wire::protocol::{ErrorCode, EvaluationReport, RoundKind};
use starling_server::engine::{self, Caller, CheckIn, EngineError, TaskHandle};
use starling_server::settings::{RoundPolicy, TaskSettings};
use starling_server::store::RoundStatus;

use crate::harness::{self, delta, encode, spawn_clocked, STUCK};

/// The demo's task with rounds of `goal` (minimum `min`, deadline 60 s) and an evaluation
/// round after every training round that commits.
fn task(goal: u32, min: u32) -> TaskSettings {
    TaskSettings {
        rounds: RoundPolicy {
            goal,
            min,
            deadline_secs: 60.0,
            overcommit: 1.5,
            retry_secs: 1.0,
        },
        min_cohort: min,
        max_assignments_per_address: 100,
        evaluate_every: 1,
        ..TaskSettings::default()
    }
}

async fn assign(task: &TaskHandle, n: usize) -> Vec<engine::Assignment> {
    task.check_in_many((0..n).map(|i| Caller::device(format!("d{i}"))).collect())
        .await
        .unwrap()
        .into_iter()
        .map(|a| match a {
            CheckIn::Assigned(a) => a,
            CheckIn::Retry { reason, .. } => panic!("not assigned: {reason}"),
        })
        .collect()
}

/// One training round of two updates, committed.
async fn train_round(task: &TaskHandle) {
    let a = assign(task, 2).await;
    assert!(a.iter().all(|a| a.kind == RoundKind::Training));
    let round = a[0].round;
    for x in &a {
        let body = encode(&delta(0.5, 0.5), x.base_version, 4, Some(1.0), &x.token);
        task.upload(round, body.into()).await.unwrap();
    }
    wait_closed(task, round).await;
}

async fn wait_closed(task: &TaskHandle, round: u64) -> starling_server::store::RoundRecord {
    let mut rx = task.subscribe();
    let st = tokio::time::timeout(
        STUCK,
        rx.wait_for(|s| s.last_round.as_ref().is_some_and(|r| r.round == round)),
    )
    .await
    .unwrap_or_else(|_| panic!("round {round} never closed"))
    .unwrap()
    .clone();
    st.last_round.unwrap()
}

fn report(base_version: u64, examples: u64, loss: f64, accuracy: Option<f64>) -> EvaluationReport {
    EvaluationReport {
        base_version,
        examples,
        loss,
        accuracy,
    }
}

#[tokio::test]
async fn an_evaluation_round_records_weighted_means_and_leaves_the_model() {
    let (task, _clock) = spawn_clocked(task(2, 2)).await;
    train_round(&task).await;
    let model = task.status().model;
    assert_eq!(model.version, 1);
    // Round 2 scores version 1.
    let a = assign(&task, 3).await;
    assert!(a
        .iter()
        .all(|a| a.kind == RoundKind::Evaluation && a.round == 2 && a.base_version == 1));
    assert_eq!(task.status().round.kind, RoundKind::Evaluation);
    // The two reports make the goal: loss (10 * 0.5 + 30 * 0.25) / 40, accuracy likewise.
    let r = task
        .evaluate(2, &a[0].token, None, report(1, 10, 0.5, Some(0.6)))
        .await
        .unwrap();
    assert_eq!((r.round, r.updates_in_round), (2, 1));
    task.evaluate(2, &a[1].token, None, report(1, 30, 0.25, Some(0.8)))
        .await
        .unwrap();
    let record = wait_closed(&task, 2).await;
    assert_eq!(record.kind, RoundKind::Evaluation);
    assert_eq!(record.status, RoundStatus::Evaluated);
    assert_eq!((record.base_version, record.version), (1, None));
    assert_eq!((record.participants, record.examples), (2, 40));
    assert_eq!(record.mean_loss, Some((5.0 + 7.5) / 40.0));
    assert!((record.mean_accuracy.unwrap() - (6.0 + 24.0) / 40.0).abs() < 1e-12);
    // The model did not move, and the next round trains again.
    let after = task.status();
    assert_eq!(after.model.version, 1);
    assert_eq!(after.model.body, model.body);
    assert_eq!(after.round.kind, RoundKind::Training);
    // The third device came too late.
    let e = task
        .evaluate(2, &a[2].token, None, report(1, 5, 0.1, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RoundClosed);
}

#[tokio::test]
async fn bad_reports_and_wrong_kinds_are_refused_and_change_nothing() {
    let (task, _clock) = spawn_clocked(task(2, 2)).await;
    // A report to a training round; an update to an evaluation round.
    let t = assign(&task, 2).await;
    let e = task
        .evaluate(1, &t[0].token, None, report(0, 5, 0.5, None))
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        EngineError::WrongRoundKind {
            round: 1,
            kind: RoundKind::Training
        }
    ));
    assert_eq!(e.to_string(), "round 1 is a training round");
    for x in &t {
        let body = encode(&delta(0.5, 0.5), 0, 4, None, &x.token);
        task.upload(1, body.into()).await.unwrap();
    }
    wait_closed(&task, 1).await;
    let a = assign(&task, 2).await;
    let body = encode(&delta(0.5, 0.5), 1, 4, None, &a[0].token);
    let e = task.upload(2, body.into()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::WrongRoundKind);
    assert_eq!(e.to_string(), "round 2 is an evaluation round");
    assert_eq!(
        task.admit_upload(2, &a[0].token, None)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::WrongRoundKind,
        "refused before an update's body is read"
    );

    let cases = [
        (report(1, 0, 0.5, None), ErrorCode::InvalidExamples),
        (
            report(1, 1_000_000_001, 0.5, None),
            ErrorCode::InvalidExamples,
        ),
        (report(1, 5, -0.5, None), ErrorCode::InvalidMetadata),
        (report(1, 5, f64::NAN, None), ErrorCode::InvalidMetadata),
        (
            report(1, 5, f64::INFINITY, None),
            ErrorCode::InvalidMetadata,
        ),
        (report(1, 5, 0.5, Some(1.5)), ErrorCode::InvalidMetadata),
        (report(1, 5, 0.5, Some(-0.1)), ErrorCode::InvalidMetadata),
        (report(0, 5, 0.5, None), ErrorCode::StaleVersion),
    ];
    for (bad, code) in cases {
        let e = task
            .evaluate(2, &a[0].token, None, bad.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{bad:?}: {e}");
        assert_eq!(task.status().round.updates, 0, "{bad:?} changed the round");
    }
    let e = task
        .evaluate(2, "forged", None, report(1, 5, 0.5, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidToken);
    // The assignment is still good after all that, once.
    task.evaluate(2, &a[0].token, None, report(1, 5, 0.5, None))
        .await
        .unwrap();
    let e = task
        .evaluate(2, &a[0].token, None, report(1, 5, 0.5, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::DuplicateUpdate);
    assert_eq!(task.status().round.updates, 1);
}

#[tokio::test]
async fn an_evaluation_round_of_too_few_devices_publishes_nothing() {
    let (task, clock) = spawn_clocked(task(3, 2)).await;
    let t = assign(&task, 3).await;
    for x in &t {
        let body = encode(&delta(0.5, 0.5), 0, 4, None, &x.token);
        task.upload(1, body.into()).await.unwrap();
    }
    wait_closed(&task, 1).await;
    let a = assign(&task, 3).await;
    task.evaluate(2, &a[0].token, None, report(1, 7, 0.125, Some(0.5)))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(61));
    let record = wait_closed(&task, 2).await;
    assert_eq!(record.status, RoundStatus::Abandoned);
    assert_eq!(record.kind, RoundKind::Evaluation);
    assert_eq!(
        (record.examples, record.mean_loss, record.mean_accuracy),
        (0, None, None),
        "one device's loss is not published"
    );
    // The next round trains (evaluation does not repeat until a training round commits).
    assert_eq!(task.status().round.kind, RoundKind::Training);
}

#[test]
fn evaluation_rounds_need_synchronous_rounds() {
    let settings = TaskSettings {
        evaluate_every: 5,
        buffered: Some(Default::default()),
        ..TaskSettings::default()
    };
    let e = settings.resolve().unwrap_err().to_string();
    assert!(e.contains("evaluate_every needs synchronous rounds"), "{e}");
}

/// Over HTTP: the check-in says `evaluation` and where to post the report; the report goes
/// in as JSON with the token header; the round history shows the evaluation beside the
/// training rounds. A report with a field beyond the four is refused.
#[tokio::test]
async fn devices_report_evaluations_over_http_and_the_history_shows_them() {
    let h = harness::start(task(1, 1), |_| {}).await;
    let a = h.assigned().await;
    let (status, _) = h.upload(&a, &delta(1.0, 1.0), 3).await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED);
    h.wait_version(1).await;
    let answer = h.check_in_device("scorer").await;
    assert_eq!(answer["kind"], "evaluation", "{answer}");
    assert_eq!(
        answer["upload_url"],
        "/v1/tasks/linear/rounds/2/evaluations"
    );
    assert_eq!(h.task().await["round"]["kind"], "evaluation");
    let token = answer["token"].as_str().unwrap();
    let url = answer["upload_url"].as_str().unwrap();

    let post = |body: Value, token: Option<&str>| {
        let mut req = h.post(url).json(&body);
        if let Some(t) = token {
            req = req.header("x-starling-token", t);
        }
        req.send()
    };
    let error = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (status, body["error"]["code"].as_str().unwrap().to_string())
    };
    let good = json!({"base_version": 1, "examples": 12, "loss": 0.75, "accuracy": 0.5});
    assert_eq!(
        error(post(good.clone(), None).await.unwrap()).await,
        (401, "missing_token".into())
    );
    let extra = json!({"base_version": 1, "examples": 12, "loss": 0.75, "features": [1.0]});
    assert_eq!(
        error(post(extra, Some(token)).await.unwrap()).await,
        (400, "invalid_metadata".into())
    );
    let r = h
        .post(url)
        .header("x-starling-token", token)
        .body(vec![b'{'; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(error(r).await, (413, "payload_too_large".into()));
    // An update posted to the evaluation round's updates URL is the wrong kind.
    let (status, body) = h
        .upload_raw("2", token, encode(&delta(1.0, 1.0), 1, 3, None, token))
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].clone()),
        (409, json!("wrong_round_kind"))
    );
    assert_eq!(h.round_updates().await, 0);

    let r = post(good, Some(token)).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    let receipt: Value = r.json().await.unwrap();
    assert_eq!(
        (
            receipt["round"].clone(),
            receipt["updates_in_round"].clone()
        ),
        (json!(2), json!(1))
    );
    // The round closes just after the receipt: wait for its record.
    let history = tokio::time::timeout(STUCK, async {
        loop {
            let history = h.get_json("/v1/tasks/linear/rounds").await;
            if history["rounds"].as_array().unwrap().len() == 2 {
                return history;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the evaluation round closes");
    let rounds = history["rounds"].as_array().unwrap();
    let eval = rounds
        .iter()
        .find(|r| r["round"] == 2)
        .unwrap_or_else(|| panic!("round 2 recorded: {history}"));
    assert_eq!(eval["kind"], "evaluation");
    assert_eq!(eval["status"], "evaluated");
    assert_eq!(eval["examples"], 12);
    assert_eq!(eval["mean_loss"], 0.75);
    assert_eq!(eval["mean_accuracy"], 0.5);
    assert_eq!(eval["version"], Value::Null);
    assert_eq!(rounds[0]["kind"], "training");
    assert_eq!(
        h.task().await["version"],
        1,
        "evaluation does not move the model"
    );
}
