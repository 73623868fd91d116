//! The resumable session against a real server: stopped after download and after training,
//! reopened from its folder (as a new process would), it delivers exactly the update an
//! uninterrupted run delivers; a device whose conditions do not meet the task's requirements
//! sends no check-in; a host's own training goes through `submit_params`; steps out of order
//! and rounds that moved on are answered clearly.

use starling_client::session::{Outcome, Session, Step};
use starling_client::{ClientError, HttpTransport};
use starling_core::data::synthetic_line;
use starling_core::wire::update;
use starling_core::{Conditions, Plan, Requirements};
use starling_server::settings::{plan_table, RoundPolicy, TaskSettings};
use starling_server::{Running, Settings};

/// A server whose `linear` task commits every update (rounds of one), with `plan`.
async fn server(dir: &std::path::Path, plan: Plan) -> Running {
    let mut s = Settings::default();
    s.server.data_dir = dir.to_path_buf();
    s.tasks = vec![TaskSettings {
        plan: Some(plan_table(&plan)),
        rounds: RoundPolicy {
            goal: 1,
            min: 1,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        // Rounds of one device, said explicitly: a test.
        min_cohort: 1,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    starling_server::spawn(s, listener).await.unwrap()
}

fn plan() -> Plan {
    Plan {
        epochs: 3,
        batch_size: 5,
        learning_rate: 0.05,
        seed: 7,
        ..Plan::default()
    }
}

fn open(url: &str, dir: &std::path::Path) -> Session<HttpTransport> {
    Session::open(HttpTransport::new(url), "linear", dir).unwrap()
}

const READY: Conditions = Conditions {
    charging: Some(true),
    idle: Some(true),
    unmetered: Some(true),
    battery: Some(1.0),
};

/// The update's values and weight, without its token (each server hands out its own).
fn content(body: &[u8]) -> (Vec<Vec<f32>>, u64, u64) {
    let layout = starling_core::trainer::builtin::linear(1, 1).layout();
    let checked = update::check(body.to_vec(), &update::Rules::lenient(&layout)).unwrap();
    let values = checked
        .tensors()
        .map(|t| {
            t.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
        .collect();
    (values, checked.meta().examples, checked.meta().base_version)
}

#[tokio::test]
async fn a_session_stopped_between_steps_resumes_and_delivers_the_same_update() {
    let data = synthetic_line(2.0, 1.0, (-1.0, 1.0), 30, 0.1, 3);

    // Uninterrupted: every step in one session.
    let (a_dir, a_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = server(a_dir.path(), plan()).await;
    let mut s = open(&a.url(), a_state.path());
    assert!(matches!(
        s.check_in(&READY).await.unwrap(),
        Outcome::Assigned { round: 1, .. }
    ));
    assert_eq!(
        s.download().await.unwrap(),
        Outcome::Downloaded { version: 0 }
    );
    assert!(matches!(
        s.train(&data).unwrap(),
        Outcome::Trained { examples: 30, .. }
    ));
    let uninterrupted = s.update_bytes().unwrap();
    assert!(matches!(
        s.upload().await.unwrap(),
        Outcome::Delivered { round: 1, .. }
    ));
    assert_eq!(s.step(), &Step::Idle);

    // Stopped after the download and after training; each step in a session reopened from
    // the folder alone.
    let (b_dir, b_state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b = server(b_dir.path(), plan()).await;
    {
        let mut s = open(&b.url(), b_state.path());
        s.check_in(&READY).await.unwrap();
        s.download().await.unwrap();
    }
    let device_id = {
        let mut s = open(&b.url(), b_state.path());
        assert_eq!(s.step().name(), "downloaded");
        s.train(&data).unwrap();
        s.device_id().to_string()
    };
    let mut s = open(&b.url(), b_state.path());
    assert_eq!(s.step().name(), "ready");
    assert_eq!(s.device_id(), device_id, "the device keeps its id");
    let resumed = s.update_bytes().unwrap();
    assert_eq!(content(&resumed), content(&uninterrupted));
    assert!(matches!(
        s.upload().await.unwrap(),
        Outcome::Delivered { round: 1, .. }
    ));

    // Both servers committed the same model.
    for running in [&a, &b] {
        let mut rx = running.tasks[0].subscribe();
        rx.wait_for(|st| st.model.version == 1).await.unwrap();
    }
    assert_eq!(
        a.tasks[0].status().model.params,
        b.tasks[0].status().model.params
    );
}

#[tokio::test]
async fn a_device_that_does_not_meet_the_tasks_requirements_sends_no_check_in() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let charging = Plan {
        requires: Requirements {
            charging: true,
            min_battery: 0.5,
            ..Requirements::default()
        },
        ..plan()
    };
    let running = server(dir.path(), charging).await;
    let mut s = open(&running.url(), state.path());
    for (conditions, why) in [
        (
            Conditions {
                charging: Some(false),
                battery: Some(0.9),
                ..Conditions::default()
            },
            "charging",
        ),
        (
            Conditions {
                battery: Some(0.9),
                ..Conditions::default()
            },
            "does not say",
        ),
        (
            Conditions {
                charging: Some(true),
                battery: Some(0.2),
                ..Conditions::default()
            },
            "battery",
        ),
    ] {
        match s.check_in(&conditions).await.unwrap() {
            Outcome::NotEligible { reason } => assert!(reason.contains(why), "{reason}"),
            other => panic!("{conditions:?}: {other:?}"),
        }
    }
    assert_eq!(s.step(), &Step::Idle);
    let round = running.tasks[0].status().round;
    assert_eq!(round.assigned, 0, "no check-in reached the server");
    // Plugged in and charged: it checks in.
    let ok = Conditions {
        charging: Some(true),
        battery: Some(0.8),
        ..Conditions::default()
    };
    assert!(matches!(
        s.check_in(&ok).await.unwrap(),
        Outcome::Assigned { .. }
    ));
    assert_eq!(running.tasks[0].status().round.assigned, 1);
}

#[tokio::test]
async fn a_hosts_own_training_is_submitted_as_weights() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let running = server(dir.path(), plan()).await;
    let mut s = open(&running.url(), state.path());

    // Out of order: told which step is needed.
    match s.upload().await {
        Err(ClientError::State(m)) => assert!(m.contains("needs step `ready`"), "{m}"),
        other => panic!("{other:?}"),
    }
    s.check_in(&READY).await.unwrap();
    s.download().await.unwrap();
    let model = s.model().unwrap();
    assert_eq!(model.version, 0);
    // "Train" elsewhere: W from 5 to 4, b from 3 to 2.5.
    let mut trained = model.params.clone();
    for (name, value) in [("W", 4.0f32), ("b", 2.5)] {
        trained.get_mut(name).unwrap().data_mut()[0] = value;
    }
    // Weights of the wrong shape are refused before anything is sent.
    let wrong = starling_core::Parameters::new(vec![(
        "W".into(),
        starling_core::Tensor::new(vec![2], vec![1.0, 2.0]).unwrap(),
    )])
    .unwrap();
    assert!(matches!(
        s.submit_params(&wrong, 10, None),
        Err(ClientError::Data(_))
    ));
    assert!(matches!(
        s.submit_params(&trained, 10, Some(0.25)).unwrap(),
        Outcome::Trained { examples: 10, .. }
    ));
    assert!(matches!(
        s.upload().await.unwrap(),
        Outcome::Delivered { .. }
    ));
    let mut rx = running.tasks[0].subscribe();
    rx.wait_for(|st| st.model.version == 1).await.unwrap();
    let committed = running.tasks[0].status().model.params;
    assert_eq!(committed.get("W").unwrap().data(), &[4.0]);
    assert_eq!(committed.get("b").unwrap().data(), &[2.5]);
}

#[tokio::test]
async fn an_update_for_a_round_that_moved_on_is_dropped_and_the_session_goes_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (slow, fast) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut s = Settings::default();
    s.server.data_dir = dir.path().to_path_buf();
    s.tasks = vec![TaskSettings {
        plan: Some(plan_table(&plan())),
        rounds: RoundPolicy {
            goal: 1,
            min: 1,
            deadline_secs: 60.0,
            overcommit: 2.0,
            retry_secs: 0.1,
        },
        min_cohort: 1,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = starling_server::spawn(s, listener).await.unwrap();
    let data = synthetic_line(2.0, 1.0, (-1.0, 1.0), 30, 0.1, 3);
    let mut late = open(&running.url(), slow.path());
    let mut first = open(&running.url(), fast.path());
    for s in [&mut late, &mut first] {
        s.check_in(&READY).await.unwrap();
        s.download().await.unwrap();
        s.train(&data).unwrap();
    }
    assert!(matches!(
        first.upload().await.unwrap(),
        Outcome::Delivered { .. }
    ));
    match late.upload().await.unwrap() {
        Outcome::Dropped { reason } => assert!(reason.contains("round_closed"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(late.step(), &Step::Idle);
    // A folder of another task is refused.
    match Session::open(HttpTransport::new(&running.url()), "other", slow.path()) {
        Err(ClientError::State(m)) => assert!(m.contains("task `linear`"), "{m}"),
        other => panic!("{other:?}"),
    }
}

/// Bring your own model: a task defined only by a safetensors checkpoint (`model =
/// "external"`, `initial_model`). The server serves and averages it; the built-in trainer
/// says it cannot train it; weights from the host's own training commit.
#[tokio::test]
async fn an_external_model_is_trained_with_the_hosts_weights() {
    use starling_core::{Parameters, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let initial = Parameters::new(vec![
        (
            "encoder.weight".into(),
            Tensor::new(vec![2, 3], vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).unwrap(),
        ),
        (
            "head.bias".into(),
            Tensor::new(vec![1], vec![-1.0]).unwrap(),
        ),
    ])
    .unwrap();
    let file = dir.path().join("initial.safetensors");
    std::fs::write(&file, initial.to_safetensors(None)).unwrap();
    let mut s = Settings::default();
    s.server.data_dir = dir.path().join("data");
    s.tasks = vec![TaskSettings {
        model: "external".into(),
        initial_model: Some(file),
        rounds: RoundPolicy {
            goal: 1,
            min: 1,
            deadline_secs: 60.0,
            overcommit: 1.0,
            retry_secs: 0.1,
        },
        min_cohort: 1,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = starling_server::spawn(s, listener).await.unwrap();
    let mut session = open(&running.url(), state.path());
    session.check_in(&READY).await.unwrap();
    session.download().await.unwrap();
    let model = session.model().unwrap();
    assert!(model.spec.is_external());
    assert_eq!(model.params, initial, "version 0 is the checkpoint");

    // The built-in trainer refuses, saying what to do instead.
    let data = synthetic_line(2.0, 1.0, (-1.0, 1.0), 10, 0.1, 3);
    match session.train(&data) {
        Err(e) => assert!(e.to_string().contains("SDK"), "{e}"),
        Ok(o) => panic!("{o:?}"),
    }
    let mut trained = initial.clone();
    trained.get_mut("head.bias").unwrap().data_mut()[0] = 0.5;
    session.submit_params(&trained, 20, Some(0.1)).unwrap();
    assert!(matches!(
        session.upload().await.unwrap(),
        Outcome::Delivered { .. }
    ));
    let mut rx = running.tasks[0].subscribe();
    rx.wait_for(|st| st.model.version == 1).await.unwrap();
    assert_eq!(running.tasks[0].status().model.params.as_ref(), &trained);
}
