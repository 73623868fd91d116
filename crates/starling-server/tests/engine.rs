//! The round engine through its handle, without HTTP: the batched calls an in-memory
//! transport (the simulator) uses.

use std::sync::Arc;

use bytes::Bytes;
use starling_core::update::{self, UpdateMeta};
use starling_core::{Parameters, Tensor};
use starling_server::engine::{self, CheckIn, EngineError};
use starling_server::metrics::Metrics;
use starling_server::settings::{RoundPolicy, TaskSettings};
use starling_server::store::Store;

fn delta(v: f32) -> Parameters {
    Parameters::new(vec![
        ("W".into(), Tensor::full(vec![1, 1], v)),
        ("b".into(), Tensor::full(vec![1], v)),
    ])
    .unwrap()
}

#[tokio::test]
async fn batched_check_ins_and_uploads_answer_each_item_in_order() {
    let def = TaskSettings {
        rounds: RoundPolicy {
            goal: 3,
            min: 1,
            deadline_secs: 600.0,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        ..TaskSettings::default()
    }
    .resolve()
    .unwrap();
    let store = Store::open_memory().await.unwrap();
    let task = engine::spawn(def, store, Arc::new(Metrics::default()))
        .await
        .unwrap();
    let answers = task
        .check_in_many(vec![Some("a".into()), Some("a".into()), None, None, None])
        .await
        .unwrap();
    let tokens: Vec<String> = answers
        .iter()
        .filter_map(|a| match a {
            CheckIn::Assigned(a) => Some(a.token.clone()),
            CheckIn::Retry { .. } => None,
        })
        .collect();
    // "a" twice gets one assignment; the goal of 3 caps the rest.
    assert!(matches!(answers[1], CheckIn::Retry { .. }));
    assert!(matches!(answers[4], CheckIn::Retry { .. }));
    assert_eq!(tokens.len(), 3);
    let body = |v: f32, t: &str| {
        Bytes::from(update::encode(
            &delta(v),
            &UpdateMeta {
                base_version: 0,
                examples: 10,
                loss: None,
                accuracy: None,
                token: t.into(),
            },
        ))
    };
    let results = task
        .upload_many(
            1,
            vec![
                body(1.0, &tokens[0]),
                body(f32::NAN, &tokens[1]),
                body(3.0, &tokens[2]),
            ],
        )
        .await;
    assert!(results[0].is_ok());
    assert!(
        matches!(&results[1], Err(EngineError::Update(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap().updates_in_round, 2);
    // The refused assignment can still deliver, which completes the round.
    let last = task.upload_many(1, vec![body(2.0, &tokens[1])]).await;
    assert!(last[0].is_ok());
    let mut st = task.subscribe();
    st.wait_for(|s| s.model.version == 1).await.unwrap();
    let w = task.status().model.params.get("W").unwrap().data()[0];
    assert!((w - 7.0).abs() < 1e-6, "5 + mean(1, 3, 2) = 7, got {w}");
}
