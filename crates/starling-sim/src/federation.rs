//! The devices' data: a training set split into per-device partitions, and a held-out test set.

use std::sync::Arc;

use starling_core::Dataset;

use crate::SimError;

/// Per-device data sets and the test set.
#[derive(Debug, Clone)]
pub struct Federation {
    /// One data set per device (shared with the training threads without copying).
    pub devices: Arc<Vec<Dataset>>,
    /// The held-out test set.
    pub test: Arc<Dataset>,
}

impl Federation {
    /// Splits `train` by `partition` (one list of example indices per device).
    pub fn from_partition(
        train: &Dataset,
        partition: &[Vec<usize>],
        test: Dataset,
    ) -> Result<Self, SimError> {
        if partition.is_empty() {
            return Err(SimError::Config("the partition has no devices".into()));
        }
        if let Some(i) = partition.iter().position(Vec::is_empty) {
            return Err(SimError::Config(format!("device {i} has no examples")));
        }
        Ok(Self::new(
            partition.iter().map(|idx| train.subset(idx)).collect(),
            test,
        ))
    }

    /// A federation from per-device data sets (a natural partition) and a test set.
    pub fn new(devices: Vec<Dataset>, test: Dataset) -> Self {
        Self {
            devices: Arc::new(devices),
            test: Arc::new(test),
        }
    }

    /// Examples per device: smallest, mean, largest.
    pub fn sizes(&self) -> (usize, f64, usize) {
        let sizes: Vec<usize> = self.devices.iter().map(Dataset::len).collect();
        let total: usize = sizes.iter().sum();
        (
            sizes.iter().copied().min().unwrap_or(0),
            total as f64 / sizes.len().max(1) as f64,
            sizes.iter().copied().max().unwrap_or(0),
        )
    }
}
