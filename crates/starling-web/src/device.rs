//! The browser device's work in plain Rust, so native tests exercise exactly what the
//! WebAssembly module runs: decode the served checkpoint, read the person's data, train, and
//! encode the update. Every step is a call into `starling-core`; nothing here is new logic.
//! With partial work ([`Plan::partial_work`]) a contribution stops training at
//! [`stop_training_at`], on the page's clock, which [`crate::bindings`] reads.

use starling_core::data::{DataError, TargetColumn};
use starling_core::trainer::spec::SpecError;
use starling_core::trainer::train::{self, Progress, StepControl, TrainError, TrainReport};
use starling_core::wire::checkpoint::{self, CheckpointError};
use starling_core::{Dataset, Model, Parameters, Plan};

/// Why the browser device cannot go on. The messages are shown to the person as they are.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WebError {
    /// The downloaded model is not a checkpoint this build can read.
    #[error("the server sent a model this app cannot read: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint's spec does not compile into a model.
    #[error("the server's model spec is unusable: {0}")]
    Spec(#[from] SpecError),
    /// The person's data cannot be used with this model.
    #[error("{}", data_message(.0))]
    Data(DataError),
    /// The only row is a header (it holds something other than numbers), so there is no data.
    #[error(
        "there are no data rows: the first row (`{0}`) holds something other than numbers, so \
         it is read as column names; add rows of numbers"
    )]
    OnlyHeader(String),
    /// The plan sent by the server is not valid JSON for this build.
    #[error("the server's training plan is invalid: {0}")]
    Plan(String),
    /// Training refused to start for another reason.
    #[error("training failed: {0}")]
    Train(String),
}

impl From<TrainError> for WebError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Data(d) => WebError::Data(d),
            TrainError::Plan(p) => WebError::Plan(p),
            other => WebError::Train(other.to_string()),
        }
    }
}

/// The core's data errors, phrased for someone typing points into a phone.
fn data_message(e: &DataError) -> String {
    match e {
        DataError::Empty => {
            "there are no data points yet: add at least one point or paste CSV rows".into()
        }
        DataError::Columns {
            line,
            found,
            expected,
        } => format!(
            "line {line} has {found} values but the lines before it have {expected}: \
             every row needs the same number of columns"
        ),
        DataError::NotANumber {
            line,
            column,
            value,
        } => format!("line {line}, column {column}: `{value}` is not a number"),
        DataError::NotFinite { line, column } => {
            format!("line {line}, column {column}: the value is not a finite number")
        }
        other => other.to_string(),
    }
}

/// A served model version, ready to train.
#[derive(Debug, Clone)]
pub struct LocalModel {
    task: String,
    version: u64,
    model: Model,
    params: Parameters,
}

/// What training produced, for the page to show.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    /// The training report (examples, steps, metrics before and after).
    pub report: TrainReport,
    /// The locally trained parameters.
    pub params: Parameters,
}

impl LocalModel {
    /// Decodes a checkpoint as served by `GET /v1/tasks/{task}/model`.
    pub fn decode(bytes: &[u8]) -> Result<Self, WebError> {
        let c = checkpoint::decode(bytes)?;
        Ok(Self {
            task: c.task,
            version: c.version,
            model: Model::new(c.spec)?,
            params: c.params,
        })
    }

    /// The task the checkpoint belongs to.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The model version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The compiled model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The served parameters.
    pub fn params(&self) -> &Parameters {
        &self.params
    }

    /// Parses CSV text (the core's reader: optional header, target in the last column) and
    /// checks that it fits the model.
    pub fn parse_data(&self, csv: &str) -> Result<Dataset, WebError> {
        let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last).map_err(|e| {
            let first = csv
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'));
            match (e, first) {
                // The core reads a first row with non-numbers as a header; typed into a
                // phone, such a row is more often a mistyped point.
                (DataError::Empty, Some(row)) => {
                    WebError::OnlyHeader(row.chars().take(40).collect())
                }
                (e, _) => WebError::Data(e),
            }
        })?;
        train::check_data(&self.model, &data).map_err(WebError::Data)?;
        Ok(data)
    }

    /// Trains a copy of the served parameters: the same loop as [`Self::local_update`],
    /// without encoding an update (the page's "try it" step).
    pub fn train(
        &self,
        data: &Dataset,
        plan: &Plan,
        progress: impl FnMut(Progress),
    ) -> Result<Trained, WebError> {
        let mut params = self.params.clone();
        let report = train::train(&self.model, &mut params, data, plan, progress)?;
        Ok(Trained { report, params })
    }

    /// An evaluation round's step: the served model's mean loss and accuracy on `data`
    /// (the core's [`Model::evaluate`], as the native device scores).
    pub fn evaluate(&self, data: &Dataset) -> starling_core::trainer::model::Evaluation {
        self.model
            .evaluate(&self.params, data.features(), data.targets(), data.len())
    }

    /// The native device's step, unchanged: trains a copy of the served parameters and
    /// encodes the update for the assignment (`base_version`, `token`). `progress` may stop
    /// training between steps (partial work), as in [`train::local_update`].
    pub fn local_update<C: StepControl>(
        &self,
        data: &Dataset,
        plan: &Plan,
        base_version: u64,
        token: String,
        progress: impl FnMut(Progress) -> C,
    ) -> Result<(Vec<u8>, TrainReport), WebError> {
        Ok(train::local_update(
            &self.model,
            &self.params,
            data,
            plan,
            base_version,
            token,
            progress,
        )?)
    }
}

/// With partial work, when a contribution stops training, in the milliseconds of the clock
/// `checked_in_ms` was read from (the page's `Date.now()`): the check-in time plus the
/// plan's training budget for the assignment's `deadline_secs`
/// ([`Plan::training_budget_secs`], the native device's rule). `None` (train every step)
/// when the plan does not allow partial work or the deadline is not a number; a
/// `checked_in_ms` that is not a number never stops training either.
pub fn stop_training_at(plan: &Plan, checked_in_ms: f64, deadline_secs: f64) -> Option<f64> {
    plan.training_budget_secs(deadline_secs)
        .map(|budget| checked_in_ms + budget * 1000.0)
}

/// Reads a plan as the server sends it (`plan` in the task and check-in JSON), with the
/// core's lean reader (`wire::decode::plan`: the plan `serde_json` reads, at a fraction of
/// the module's size).
pub fn parse_plan(json: &str) -> Result<Plan, WebError> {
    let plan =
        starling_core::wire::decode::plan(json).map_err(|e| WebError::Plan(e.to_string()))?;
    plan.validate()?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_core::trainer::builtin;
    use starling_core::wire::update;

    fn served(version: u64) -> Vec<u8> {
        let spec = builtin::linear(1, 1);
        let params = spec.init_params(0);
        checkpoint::encode("linear", version, &spec, &params)
    }

    #[test]
    fn decodes_the_served_linear_model() {
        let m = LocalModel::decode(&served(3)).unwrap();
        assert_eq!((m.task(), m.version()), ("linear", 3));
        assert_eq!(m.params().get("W").unwrap().data(), &[5.0]);
        assert_eq!(m.params().get("b").unwrap().data(), &[3.0]);
        assert!(matches!(
            LocalModel::decode(b"not a checkpoint"),
            Err(WebError::Checkpoint(_))
        ));
    }

    #[test]
    fn unusable_data_is_refused_with_a_reason() {
        let m = LocalModel::decode(&served(0)).unwrap();
        assert_eq!(m.parse_data("x,y\n1,2\n2,4\n").unwrap().len(), 2);
        let err = |csv: &str| m.parse_data(csv).unwrap_err().to_string();
        assert!(err("").contains("no data points"), "{}", err(""));
        assert!(err("  \n").contains("no data points"));
        assert!(err("1,2\n3,abc\n").contains("`abc` is not a number"));
        assert!(err("1,abc\n").contains("first row (`1,abc`) holds something other than numbers"));
        assert!(err("x,y\n").contains("no data rows"));
        assert!(err("1,2\n3,4,5\n").contains("line 2 has 3 values"));
        assert!(
            err("1,2,3\n4,5,6\n").contains("takes 1 feature column(s), the data has 2"),
            "{}",
            err("1,2,3\n4,5,6\n")
        );
        assert!(err("1\n2\n").contains("at least two columns"));
    }

    #[test]
    fn the_update_is_the_core_update() {
        let m = LocalModel::decode(&served(2)).unwrap();
        let data = m.parse_data("1,3\n2,5\n3,7\n").unwrap();
        let plan = parse_plan(r#"{"epochs":3,"batch_size":2,"learning_rate":0.05}"#).unwrap();
        let (bytes, report) = m
            .local_update(&data, &plan, 2, "tok".into(), |_| {})
            .unwrap();
        let (native, _) =
            train::local_update(m.model(), m.params(), &data, &plan, 2, "tok".into(), |_| {})
                .unwrap();
        // The metadata's key order varies (the core keeps it in a HashMap), so compare what
        // the bytes say rather than the bytes.
        let layout = m.model().layout().clone();
        let (ours, theirs) = (
            update::decode(&bytes, &layout, None).unwrap(),
            update::decode(&native, &layout, None).unwrap(),
        );
        assert_eq!(ours.meta, theirs.meta);
        assert_eq!(ours.tensors, theirs.tensors);
        assert_eq!(ours.meta.examples, 3);
        assert_eq!(ours.meta.base_version, 2);
        assert!(report.after.loss < report.before.loss);
        let trained = m.train(&data, &plan, |_| {}).unwrap();
        assert_eq!(trained.report, report);
    }

    #[test]
    fn partial_work_stops_at_the_budget_and_sends_the_core_update() {
        let plan = parse_plan(r#"{"epochs":3,"batch_size":2,"partial_work":true}"#).unwrap();
        // 60 s to the deadline leave 54 s of training; without partial work, no limit.
        assert_eq!(stop_training_at(&plan, 1000.0, 60.0), Some(55_000.0));
        assert_eq!(stop_training_at(&plan, 1000.0, f64::NAN), None);
        let whole = parse_plan(r#"{"epochs":3,"batch_size":2}"#).unwrap();
        assert_eq!(stop_training_at(&whole, 1000.0, 60.0), None);

        let m = LocalModel::decode(&served(2)).unwrap();
        let data = m.parse_data("1,3\n2,5\n3,7\n4,9\n5,11\n").unwrap();
        let stop = |p: Progress| {
            if p.step == 2 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        };
        let (bytes, report) = m.local_update(&data, &plan, 2, "tok".into(), stop).unwrap();
        let (native, _) =
            train::local_update(m.model(), m.params(), &data, &plan, 2, "tok".into(), stop)
                .unwrap();
        let layout = m.model().layout().clone();
        let (ours, theirs) = (
            update::decode(&bytes, &layout, None).unwrap(),
            update::decode(&native, &layout, None).unwrap(),
        );
        assert_eq!(ours.meta, theirs.meta);
        assert_eq!(ours.tensors, theirs.tensors);
        // Two steps of two examples in the first epoch: 4 of the 5 examples.
        assert_eq!((report.steps, report.planned_steps), (2, 9));
        assert_eq!((report.examples, ours.meta.examples), (4, 4));
    }

    #[test]
    fn bad_plans_are_named() {
        assert!(matches!(parse_plan("{"), Err(WebError::Plan(_))));
        assert!(matches!(
            parse_plan(r#"{"epochs":0}"#),
            Err(WebError::Plan(_))
        ));
        assert!(matches!(
            parse_plan(r#"{"bogus":1}"#),
            Err(WebError::Plan(_))
        ));
    }
}
