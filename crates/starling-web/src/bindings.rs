//! The JavaScript face of [`crate::device`], through `wasm-bindgen`. Numbers cross as JS
//! numbers and `Float32Array`s, names as string arrays and the update as a `Uint8Array`: no
//! JSON or serde-to-JS glue of its own, which keeps the module small. Versions cross as JS
//! numbers (exact up to 2^53), not `BigInt`.

use std::ops::ControlFlow;

use starling_core::trainer::train::{Progress, TrainReport};
use starling_core::{Dataset, Parameters};
use wasm_bindgen::prelude::*;

use crate::device::{self, LocalModel};

#[wasm_bindgen]
extern "C" {
    /// A JavaScript function `(step, totalSteps, batchLoss) => void`, called as training
    /// goes (at most about a hundred times per run).
    #[wasm_bindgen(typescript_type = "(step: number, total: number, loss: number) => void")]
    pub type ProgressCallback;

    #[wasm_bindgen(method, js_name = call)]
    fn call3(this: &ProgressCallback, this_arg: &JsValue, step: f64, total: f64, loss: f32);

    /// The page's (or the worker's) clock, `Date.now()`: milliseconds since the Unix epoch,
    /// the same clock in the page and in its worker. Read only for partial work.
    #[wasm_bindgen(js_namespace = Date, js_name = now)]
    fn date_now() -> f64;
}

/// Forwards every `total / 100`-th step (and the last) to `callback`, so a long run does
/// not spend its time crossing into JavaScript.
fn reporter(callback: Option<&ProgressCallback>) -> impl FnMut(Progress) + '_ {
    move |p: Progress| {
        let every = (p.total_steps / 100).max(1);
        if let Some(cb) = callback {
            if p.step.is_multiple_of(every) || p.step == p.total_steps {
                cb.call3(
                    &JsValue::UNDEFINED,
                    p.step as f64,
                    p.total_steps as f64,
                    p.batch_loss,
                );
            }
        }
    }
}

fn version_from_js(v: f64) -> Result<u64, JsError> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_992.0 {
        Ok(v as u64)
    } else {
        // The number stays out of the message: formatting an f64 would link float
        // formatting for f64 into the module for a message only a page bug can cause.
        Err(JsError::new(
            "the base version is not a model version (a whole number from 0 to 2^53)",
        ))
    }
}

fn values(params: &Parameters, index: usize) -> Vec<f32> {
    if index < params.len() {
        params.at(index).data().to_vec()
    } else {
        Vec::new()
    }
}

/// A served model version, decoded from the bytes of `GET /v1/tasks/{task}/model`.
#[wasm_bindgen]
pub struct WebModel(LocalModel);

/// The person's data, parsed and checked against the model. It stays in this module's
/// memory; nothing in the API can send it anywhere.
#[wasm_bindgen]
pub struct WebData(Dataset);

/// An evaluation round's score of the served model on the person's data: the only numbers
/// an evaluation report carries.
#[wasm_bindgen]
#[derive(Debug, Clone, Copy)]
pub struct EvaluationOutcome {
    examples: usize,
    loss: f32,
    accuracy: Option<f32>,
}

#[wasm_bindgen]
impl EvaluationOutcome {
    /// Examples scored.
    #[wasm_bindgen(getter)]
    pub fn examples(&self) -> usize {
        self.examples
    }

    /// Mean loss.
    #[wasm_bindgen(getter)]
    pub fn loss(&self) -> f32 {
        self.loss
    }

    /// Mean accuracy (classifiers; `undefined` otherwise).
    #[wasm_bindgen(getter)]
    pub fn accuracy(&self) -> Option<f32> {
        self.accuracy
    }
}

/// The result of a training run: loss before and after, the trained parameters (for a
/// trial run) or the encoded update (for a contribution).
#[wasm_bindgen]
pub struct TrainOutcome {
    report: TrainReport,
    params: Option<Parameters>,
    update: Option<Vec<u8>>,
}

#[wasm_bindgen]
impl WebModel {
    /// Decodes a checkpoint; throws when the bytes are not one.
    #[wasm_bindgen(constructor)]
    pub fn new(checkpoint: &[u8]) -> Result<WebModel, JsError> {
        Ok(WebModel(LocalModel::decode(checkpoint)?))
    }

    /// The task the checkpoint belongs to.
    #[wasm_bindgen(getter)]
    pub fn task(&self) -> String {
        self.0.task().to_string()
    }

    /// The model version.
    #[wasm_bindgen(getter)]
    pub fn version(&self) -> f64 {
        self.0.version() as f64
    }

    /// The model's short name (`linear`, `logistic`, …).
    #[wasm_bindgen(getter, js_name = modelName)]
    pub fn model_name(&self) -> String {
        self.0.model().spec().name.clone()
    }

    /// Feature columns a data row has (before the target column).
    #[wasm_bindgen(getter)]
    pub fn inputs(&self) -> usize {
        self.0.model().spec().inputs
    }

    /// Target columns a data row has.
    #[wasm_bindgen(getter, js_name = targetWidth)]
    pub fn target_width(&self) -> usize {
        self.0.model().spec().target_width()
    }

    /// The parameters' names, in layout order.
    #[wasm_bindgen(js_name = parameterNames)]
    pub fn parameter_names(&self) -> Vec<String> {
        self.0.params().iter().map(|(n, _)| n.to_string()).collect()
    }

    /// The shape of parameter `index`.
    #[wasm_bindgen(js_name = parameterShape)]
    pub fn parameter_shape(&self, index: usize) -> Vec<u32> {
        if index < self.0.params().len() {
            let shape = self.0.params().at(index).shape();
            shape.iter().map(|&d| d as u32).collect()
        } else {
            Vec::new()
        }
    }

    /// The served values of parameter `index`, row-major.
    #[wasm_bindgen(js_name = parameterValues)]
    pub fn parameter_values(&self, index: usize) -> Vec<f32> {
        values(self.0.params(), index)
    }

    /// Parses CSV text with the core's reader and checks that it fits the model; throws
    /// with a message for the person when it does not (empty, not numbers, wrong columns).
    #[wasm_bindgen(js_name = checkData)]
    pub fn check_data(&self, csv: &str) -> Result<WebData, JsError> {
        Ok(WebData(self.0.parse_data(csv)?))
    }

    /// Trains a copy of the served parameters on `data` with `plan` (the server's plan as
    /// JSON), without encoding an update.
    pub fn train(
        &self,
        data: &WebData,
        plan: &str,
        progress: Option<ProgressCallback>,
    ) -> Result<TrainOutcome, JsError> {
        let plan = device::parse_plan(plan)?;
        let t = self.0.train(&data.0, &plan, reporter(progress.as_ref()))?;
        Ok(TrainOutcome {
            report: t.report,
            params: Some(t.params),
            update: None,
        })
    }

    /// An evaluation round's step: scores the served model on `data`.
    pub fn evaluate(&self, data: &WebData) -> EvaluationOutcome {
        let e = self.0.evaluate(&data.0);
        EvaluationOutcome {
            examples: data.0.len(),
            loss: e.loss,
            accuracy: e.accuracy,
        }
    }

    /// The native device's step: trains a copy and encodes the update for the assignment
    /// (`baseVersion`, `token` from the check-in). `takeUpdate()` then gives the bytes to
    /// POST to the round.
    ///
    /// With a plan that allows partial work, `checkedInAt` (`Date.now()` when the check-in
    /// answer arrived) and `deadlineSecs` (the answer's `deadline_secs`) set when training
    /// stops ([`device::stop_training_at`]); without them, or without partial work, it runs
    /// every step. The outcome's `steps` and `plannedSteps` say whether it stopped early.
    #[wasm_bindgen(js_name = localUpdate)]
    #[allow(clippy::too_many_arguments)]
    pub fn local_update(
        &self,
        data: &WebData,
        plan: &str,
        base_version: f64,
        token: String,
        progress: Option<ProgressCallback>,
        checked_in_at: Option<f64>,
        deadline_secs: Option<f64>,
    ) -> Result<TrainOutcome, JsError> {
        let plan = device::parse_plan(plan)?;
        let base_version = version_from_js(base_version)?;
        let stop_at = checked_in_at
            .zip(deadline_secs)
            .and_then(|(at, secs)| device::stop_training_at(&plan, at, secs));
        let mut report_progress = reporter(progress.as_ref());
        let (bytes, report) =
            self.0
                .local_update(&data.0, &plan, base_version, token, |p: Progress| {
                    report_progress(p);
                    match stop_at {
                        Some(at) if date_now() >= at => ControlFlow::Break(()),
                        _ => ControlFlow::Continue(()),
                    }
                })?;
        Ok(TrainOutcome {
            report,
            params: None,
            update: Some(bytes),
        })
    }
}

#[wasm_bindgen]
impl WebData {
    /// Number of examples.
    #[wasm_bindgen(getter)]
    pub fn examples(&self) -> usize {
        self.0.len()
    }

    /// All features, row-major (for the page's plot).
    pub fn features(&self) -> Vec<f32> {
        self.0.features().to_vec()
    }

    /// All targets, row-major (for the page's plot).
    pub fn targets(&self) -> Vec<f32> {
        self.0.targets().to_vec()
    }
}

#[wasm_bindgen]
impl TrainOutcome {
    /// Examples trained on: the count the update reports (fewer than the data's when partial
    /// work stopped training within the first epoch).
    #[wasm_bindgen(getter)]
    pub fn examples(&self) -> usize {
        self.report.examples
    }

    /// Optimiser steps taken.
    #[wasm_bindgen(getter)]
    pub fn steps(&self) -> usize {
        self.report.steps
    }

    /// Optimiser steps the plan asked for: more than `steps` when partial work stopped
    /// training early to meet the round's deadline.
    #[wasm_bindgen(getter, js_name = plannedSteps)]
    pub fn planned_steps(&self) -> usize {
        self.report.planned_steps
    }

    /// Mean loss over the data before training.
    #[wasm_bindgen(getter, js_name = lossBefore)]
    pub fn loss_before(&self) -> f32 {
        self.report.before.loss
    }

    /// Mean loss over the data after training.
    #[wasm_bindgen(getter, js_name = lossAfter)]
    pub fn loss_after(&self) -> f32 {
        self.report.after.loss
    }

    /// Accuracy before training (classifiers only).
    #[wasm_bindgen(getter, js_name = accuracyBefore)]
    pub fn accuracy_before(&self) -> Option<f32> {
        self.report.before.accuracy
    }

    /// Accuracy after training (classifiers only).
    #[wasm_bindgen(getter, js_name = accuracyAfter)]
    pub fn accuracy_after(&self) -> Option<f32> {
        self.report.after.accuracy
    }

    /// The trained values of parameter `index` (trial runs; empty for a contribution).
    #[wasm_bindgen(js_name = parameterValues)]
    pub fn parameter_values(&self, index: usize) -> Vec<f32> {
        self.params
            .as_ref()
            .map(|p| values(p, index))
            .unwrap_or_default()
    }

    /// The encoded update (once; empty after, or for a trial run).
    #[wasm_bindgen(js_name = takeUpdate)]
    pub fn take_update(&mut self) -> Vec<u8> {
        self.update.take().unwrap_or_default()
    }
}

// The person's data and trained numbers stay out of any printout: only their sizes show.
impl std::fmt::Debug for WebModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebModel").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WebData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebData")
            .field("examples", &self.0.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TrainOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainOutcome")
            .field("has_update", &self.update.is_some())
            .finish_non_exhaustive()
    }
}
