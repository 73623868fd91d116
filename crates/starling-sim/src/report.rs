//! Per-round metrics and the results files: JSON (everything), CSV (one row per round) and an
//! SVG plot of test accuracy and loss per round that a person can open in a browser.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::sim::SimConfig;
use crate::{Federation, SimError};

/// What one round did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundMetrics {
    /// Round number.
    pub round: u64,
    /// Model version after the round.
    pub version: u64,
    /// Whether the round committed a new version.
    pub committed: bool,
    /// Devices sampled.
    pub sampled: usize,
    /// Devices whose update arrived in time.
    pub reported: usize,
    /// Devices that dropped out.
    pub dropped: usize,
    /// Devices that were stragglers.
    pub stragglers: usize,
    /// Buffered mode: updates refused since the previous step for being staler than
    /// `max_staleness` (`too_stale`); 0 in synchronous rounds.
    pub refused_stale: usize,
    /// Mean staleness (versions the model moved on since its base version) of the updates
    /// this round (step) folded; 0 in synchronous rounds; none when nothing was folded.
    pub mean_staleness: Option<f64>,
    /// The most assignments outstanding at once (devices training) during the round; in
    /// buffered mode at most the concurrency C.
    pub max_in_flight: usize,
    /// ε spent by the task after this round, at the budget's δ (with differential privacy).
    pub epsilon: Option<f64>,
    /// Examples behind the aggregated updates.
    pub examples: u64,
    /// Example-weighted mean of the devices' local losses after training.
    pub train_loss: Option<f64>,
    /// Example-weighted mean of the devices' local accuracies after training.
    pub train_accuracy: Option<f64>,
    /// Loss of the global model on the test set; none when this round was not evaluated
    /// (`eval_every`).
    pub test_loss: Option<f32>,
    /// Accuracy of the global model on the test set (classifiers, evaluated rounds).
    pub test_accuracy: Option<f32>,
    /// Update bytes uploaded.
    pub bytes_up: u64,
    /// Model bytes downloaded.
    pub bytes_down: u64,
    /// Virtual time since the start, seconds (buffered mode: the clock's time at the step).
    pub virtual_secs: f64,
    /// Wall time since the start, seconds.
    pub wall_secs: f64,
}

impl RoundMetrics {
    /// The round as TensorBoard scalars (`starling simulate --tensorboard`), under the tags
    /// the server writes for its rounds (`starling_server::tensorboard`): a committed round's
    /// `train/loss`, `train/accuracy`, `round/participants` (the devices that reported),
    /// `round/examples` (not under differential privacy, which publishes none) and
    /// `privacy/epsilon`; `round/abandoned` = 1 for a round that committed nothing;
    /// `eval/loss` and `eval/accuracy` when the round was evaluated, here on the held-out
    /// test set; and the simulator's own `sim/virtual_secs`, the virtual clock's time.
    pub fn tensorboard_scalars(&self) -> Vec<(&'static str, f64)> {
        let mut out = Vec::new();
        if self.committed {
            if let Some(loss) = self.train_loss {
                out.push(("train/loss", loss));
            }
            if let Some(accuracy) = self.train_accuracy {
                out.push(("train/accuracy", accuracy));
            }
            out.push(("round/participants", self.reported as f64));
            if self.epsilon.is_none() {
                out.push(("round/examples", self.examples as f64));
            }
            if let Some(epsilon) = self.epsilon {
                out.push(("privacy/epsilon", epsilon));
            }
        } else {
            out.push(("round/abandoned", 1.0));
        }
        if let Some(loss) = self.test_loss {
            out.push(("eval/loss", f64::from(loss)));
        }
        if let Some(accuracy) = self.test_accuracy {
            out.push(("eval/accuracy", f64::from(accuracy)));
        }
        out.push(("sim/virtual_secs", self.virtual_secs));
        out
    }
}

/// A finished simulation.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// The configuration.
    pub config: SimConfig,
    /// Devices.
    pub devices: usize,
    /// Examples per device: smallest, mean, largest.
    pub device_examples: (usize, f64, usize),
    /// Test examples.
    pub test_examples: usize,
    /// Per-round metrics.
    pub rounds: Vec<RoundMetrics>,
    /// Wall time of the whole run, seconds.
    pub wall_secs: f64,
    /// Rounds per wall-clock second.
    pub rounds_per_sec: f64,
    /// Test accuracy after the last evaluated round.
    pub final_accuracy: Option<f32>,
    /// Test loss after the last evaluated round.
    pub final_loss: Option<f32>,
    /// Why training stopped before the rounds ran out (a spent privacy budget), if it did.
    pub stopped: Option<String>,
    /// CPU seconds (user and system, every thread) the process used during the run; none where
    /// the platform does not say ([`crate::cpu`]).
    pub cpu_secs: Option<f64>,
    /// Cores kept busy: `cpu_secs` over `wall_secs`, at most the machine's cores (2.0 is two
    /// cores busy all the time).
    pub cores_busy: Option<f64>,
}

impl SimReport {
    pub(crate) fn new(
        config: &SimConfig,
        federation: &Federation,
        rounds: Vec<RoundMetrics>,
        wall_secs: f64,
    ) -> Self {
        let last = rounds.iter().rev().find(|r| r.test_loss.is_some());
        Self {
            config: config.clone(),
            devices: federation.devices.len(),
            device_examples: federation.sizes(),
            test_examples: federation.test.len(),
            final_accuracy: last.and_then(|r| r.test_accuracy),
            final_loss: last.and_then(|r| r.test_loss),
            rounds_per_sec: rounds.len() as f64 / wall_secs.max(1e-9),
            stopped: None,
            cpu_secs: None,
            cores_busy: None,
            rounds,
            wall_secs,
        }
    }

    /// Records the CPU seconds the run used, and so the cores it kept busy.
    pub(crate) fn set_cpu_secs(&mut self, cpu_secs: Option<f64>) {
        self.cpu_secs = cpu_secs;
        self.cores_busy = cpu_secs.map(|c| c / self.wall_secs.max(1e-9));
    }

    /// The first round whose test accuracy reached `target`.
    pub fn rounds_to_accuracy(&self, target: f32) -> Option<u64> {
        self.rounds
            .iter()
            .find(|r| r.test_accuracy.is_some_and(|a| a >= target))
            .map(|r| r.round)
    }

    /// The virtual time (seconds since the start) of the first round whose test accuracy
    /// reached `target`.
    pub fn virtual_secs_to_accuracy(&self, target: f32) -> Option<f64> {
        self.rounds
            .iter()
            .find(|r| r.test_accuracy.is_some_and(|a| a >= target))
            .map(|r| r.virtual_secs)
    }

    /// The per-round table as CSV.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "round,version,committed,sampled,reported,dropped,stragglers,examples,train_loss,\
             train_accuracy,test_loss,test_accuracy,bytes_up,bytes_down,virtual_secs,wall_secs,\
             refused_stale,mean_staleness,max_in_flight,epsilon\n",
        );
        let opt = |v: Option<String>| v.unwrap_or_default();
        for r in &self.rounds {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.6},{},{},{},{}\n",
                r.round,
                r.version,
                r.committed,
                r.sampled,
                r.reported,
                r.dropped,
                r.stragglers,
                r.examples,
                opt(r.train_loss.map(|v| v.to_string())),
                opt(r.train_accuracy.map(|v| v.to_string())),
                opt(r.test_loss.map(|v| v.to_string())),
                opt(r.test_accuracy.map(|v| v.to_string())),
                r.bytes_up,
                r.bytes_down,
                r.virtual_secs,
                r.wall_secs,
                r.refused_stale,
                opt(r.mean_staleness.map(|v| format!("{v:.3}"))),
                r.max_in_flight,
                opt(r.epsilon.map(|v| format!("{v:.6}")))
            ));
        }
        out
    }

    /// Writes `results.json`, `results.csv` and `plot.svg` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, SimError> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join("results.json");
        std::fs::write(
            &json,
            serde_json::to_string_pretty(self).map_err(|e| SimError::Plot(e.to_string()))?,
        )?;
        let csv = dir.join("results.csv");
        std::fs::write(&csv, self.to_csv())?;
        let svg = dir.join("plot.svg");
        self.plot(&svg)?;
        Ok(vec![json, csv, svg])
    }

    /// Draws test accuracy (left) and test loss (right) per evaluated round (server step).
    pub fn plot(&self, path: &Path) -> Result<(), SimError> {
        let err = |e: &dyn std::fmt::Display| SimError::Plot(e.to_string());
        let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(500);
        let last = self.rounds.last().map_or(1, |r| r.round).max(1);
        let acc: Vec<(u64, f32)> = self
            .rounds
            .iter()
            .filter_map(|r| r.test_accuracy.map(|a| (r.round, a)))
            .collect();
        let loss: Vec<(u64, f32)> = self
            .rounds
            .iter()
            .filter_map(|r| r.test_loss.map(|l| (r.round, l)))
            .collect();
        let max_loss = loss.iter().map(|p| p.1).fold(0.0f32, f32::max).max(1e-6) * 1.05;
        let title = format!("{} on {} devices", self.config.model.name, self.devices);
        let x = if self.config.buffered.is_some() {
            "server step"
        } else {
            "round"
        };

        let mut chart = ChartBuilder::on(&left)
            .caption(format!("test accuracy — {title}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0u64..last, 0f32..1f32)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc("accuracy")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(acc, &BLUE))
            .map_err(|e| err(&e))?;

        let mut chart = ChartBuilder::on(&right)
            .caption("test loss", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0u64..last, 0f32..max_loss)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(loss, &RED))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}
