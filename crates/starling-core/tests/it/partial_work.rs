//! FedProx's partial work in the training loop: a run the caller stops between steps equals
//! the first steps of the whole run, and its update counts the examples it trained on.

use std::ops::ControlFlow;

use starling_core::data::{Dataset, TargetColumn};
use starling_core::trainer::train::{local_update, train, Plan, TrainReport};
use starling_core::wire::update;
use starling_core::{trainer::builtin, Model, Parameters};

/// 37 examples of a noisy two-class problem in two features.
fn data() -> Dataset {
    let csv: String = (0..37)
        .map(|i| {
            let x = (i as f32 / 37.0) * 4.0 - 2.0;
            let y = (i as f32 * 0.37).sin();
            format!("{x},{y},{}\n", u8::from(x + 0.5 * y > 0.0))
        })
        .collect();
    Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).unwrap()
}

fn model() -> Model {
    Model::new(builtin::logistic(2, 2)).unwrap()
}

/// Batches of 4 over 37 examples: 10 steps an epoch, the last of one example.
const PER_EPOCH: usize = 10;

fn plan(epochs: u32, shuffle: bool) -> Plan {
    Plan {
        epochs,
        batch_size: 4,
        learning_rate: 0.3,
        momentum: 0.5,
        shuffle,
        seed: 7,
        mu: 0.2,
        partial_work: true,
        evaluate_after_training: false,
        requires: Default::default(),
    }
}

/// Trains from the model's initial parameters, stopping after `stop_after` steps.
fn run(data: &Dataset, plan: &Plan, stop_after: Option<usize>) -> (Parameters, TrainReport) {
    let model = model();
    let mut params = model.spec().init_params(1);
    let report = train(&model, &mut params, data, plan, |p| {
        if stop_after.is_some_and(|n| p.step >= n) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    (params, report)
}

#[test]
fn stopping_after_whole_epochs_equals_a_plan_of_fewer_epochs() {
    let data = data();
    // Shuffled, with momentum and the proximal term: the stopped run is the same run, cut.
    let (stopped, report) = run(&data, &plan(5, true), Some(2 * PER_EPOCH));
    let (shorter, full_two) = run(&data, &plan(2, true), None);
    assert_eq!(stopped, shorter);
    assert_eq!(report.steps, 2 * PER_EPOCH);
    assert_eq!(report.planned_steps, 5 * PER_EPOCH);
    assert!(report.is_partial());
    assert_eq!(report.examples, 37, "every example was seen");
    assert_eq!(report.after, full_two.after);
    assert!(!full_two.is_partial());
}

#[test]
fn stopping_in_the_first_epoch_counts_only_the_batches_run() {
    let data = data();
    for stop in [1, 3, PER_EPOCH - 1] {
        // In file order, n steps of the first epoch are a one-epoch plan on the rows those
        // batches hold.
        let (stopped, report) = run(&data, &plan(3, false), Some(stop));
        let rows: Vec<usize> = (0..4 * stop).collect();
        let mut prefix = (Vec::new(), Vec::new());
        data.gather(&rows, &mut prefix.0, &mut prefix.1);
        let prefix = Dataset::new(prefix.0, prefix.1, 2, 1).unwrap();
        let (reference, _) = run(&prefix, &plan(1, false), None);
        assert_eq!(stopped, reference, "stopped after {stop} step(s)");
        assert_eq!(report.examples, 4 * stop, "stopped after {stop} step(s)");
        assert_eq!((report.steps, report.planned_steps), (stop, 3 * PER_EPOCH));
        // Shuffled, the count is the same: an epoch's batches do not overlap.
        let (_, shuffled) = run(&data, &plan(3, true), Some(stop));
        assert_eq!(shuffled.examples, 4 * stop);
    }
    // The epoch's last batch holds one example.
    let (_, report) = run(&data, &plan(3, true), Some(PER_EPOCH));
    assert_eq!(report.examples, 37);
}

#[test]
fn stopping_after_the_first_epoch_counts_every_example() {
    let data = data();
    for stop in [PER_EPOCH + 1, 2 * PER_EPOCH + 5] {
        let (_, report) = run(&data, &plan(3, true), Some(stop));
        assert_eq!((report.steps, report.examples), (stop, 37));
        assert!(report.is_partial());
    }
}

#[test]
fn a_run_that_stops_at_its_last_step_or_never_is_whole() {
    let data = data();
    let (whole, report) = run(&data, &plan(2, true), None);
    let (at_end, at_end_report) = run(&data, &plan(2, true), Some(2 * PER_EPOCH));
    assert_eq!(whole, at_end);
    assert_eq!(report, at_end_report);
    assert!(!report.is_partial());
    assert_eq!((report.steps, report.planned_steps), (20, 20));
    // A callback that only watches (returns `()`) never stops training.
    let model = model();
    let mut watched = model.spec().init_params(1);
    let mut calls = 0;
    let r = train(&model, &mut watched, &data, &plan(2, true), |_| calls += 1).unwrap();
    assert_eq!((watched, r, calls), (whole, report, 20));
}

#[test]
fn a_partial_update_reports_the_examples_it_trained_on() {
    let data = data();
    let model = model();
    let base = model.spec().init_params(1);
    let stop = 3;
    let (body, report) = local_update(
        &model,
        &base,
        &data,
        &plan(2, false),
        4,
        "tok".into(),
        |p| {
            if p.step == stop {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert_eq!((report.steps, report.examples), (stop, 12));
    let (trained, _) = run(&data, &plan(2, false), Some(stop));
    let view = update::decode(&body, model.layout(), None).unwrap();
    assert_eq!(view.meta.examples, 12);
    assert_eq!(view.meta.base_version, 4);
    assert_eq!(view.meta.loss, Some(report.after.loss));
    let delta = trained.sub(&base).unwrap();
    assert_eq!(view.tensors.len(), delta.len());
    for (bytes, (name, tensor)) in view.tensors.iter().zip(delta.iter()) {
        let le: Vec<u8> = tensor.data().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            *bytes,
            &le[..],
            "{name}: the update is the stopped run's difference"
        );
    }
}

#[test]
fn the_training_budget_leaves_a_margin_for_the_upload() {
    let p = plan(1, true);
    let budget = |d: f64| p.training_budget_secs(d);
    // A tenth of the deadline, at least 1 s, at most half of it.
    assert_eq!(budget(60.0), Some(54.0));
    assert_eq!(budget(300.0), Some(270.0));
    assert_eq!(budget(5.0), Some(4.0));
    assert_eq!(budget(1.0), Some(0.5));
    assert_eq!(budget(0.0), Some(0.0));
    assert_eq!(budget(-3.0), Some(0.0));
    assert_eq!(budget(f64::NAN), None);
    assert_eq!(budget(f64::INFINITY), None);
    // Without partial work a device trains to the end.
    let off = Plan {
        partial_work: false,
        ..p
    };
    assert_eq!(off.training_budget_secs(60.0), None);
    assert_eq!(Plan::default().training_budget_secs(1.0), None);
}

#[test]
fn plans_without_the_key_do_no_partial_work() {
    let plan: Plan = serde_json::from_str(r#"{"epochs": 2, "mu": 0.1}"#).unwrap();
    assert!(!plan.partial_work);
    let plan: Plan = serde_json::from_str(r#"{"partial_work": true}"#).unwrap();
    assert!(plan.partial_work);
    let json = serde_json::to_value(Plan::default()).unwrap();
    assert_eq!(json["partial_work"], serde_json::json!(false));
}
