//! Loading data sets from files given on the command line (the project ships only tiny
//! fixtures; the real sets are wherever the user keeps them) and partitioning them.

use std::path::{Path, PathBuf};

use starling_core::data::datasets::{idx, shakespeare};
use starling_core::data::partition;
use starling_core::data::{Dataset, TargetColumn};

use crate::SimError;

fn read(path: &Path) -> Result<Vec<u8>, SimError> {
    std::fs::read(path).map_err(|e| SimError::Data(format!("cannot read {}: {e}", path.display())))
}

/// The first of `names` that exists in `dir` (plain or `.gz`).
fn find(dir: &Path, stem: &str) -> Result<PathBuf, SimError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(SimError::Data(format!(
        "{} has no {stem} (or {stem}.gz); expected the MNIST file layout",
        dir.display()
    )))
}

/// MNIST or Fashion-MNIST from a folder with the four IDX files (gzip or not):
/// `(train, test)`.
pub fn load_idx_dir(dir: &Path) -> Result<(Dataset, Dataset), SimError> {
    if !dir.is_dir() {
        return Err(SimError::Data(format!("{} is not a folder", dir.display())));
    }
    let load = |images: &str, labels: &str| -> Result<Dataset, SimError> {
        let (ip, lp) = (find(dir, images)?, find(dir, labels)?);
        idx::load(&read(&ip)?, &read(&lp)?)
            .map_err(|e| SimError::Data(format!("{} / {}: {e}", ip.display(), lp.display())))
    };
    Ok((
        load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    ))
}

/// A CSV file of numbers, the last column the target.
pub fn load_csv(path: &Path) -> Result<Dataset, SimError> {
    Dataset::from_csv(&read(path)?, &TargetColumn::Last)
        .map_err(|e| SimError::Data(format!("{}: {e}", path.display())))
}

/// Shakespeare by role: the first `devices` roles with at least `min_samples` (LEAF's
/// next-character) samples, each one device (the natural partition), their text as
/// sequences predicting every next character ([`shakespeare::Role::sequences`]); the last
/// `test_fraction` of every role's sequences go to the shared test set.
pub fn load_shakespeare(
    path: &Path,
    devices: usize,
    min_samples: usize,
    test_fraction: f64,
) -> Result<(Vec<Dataset>, Dataset), SimError> {
    let corpus = shakespeare::parse(&read(path)?, min_samples)
        .map_err(|e| SimError::Data(format!("{}: {e}", path.display())))?;
    if corpus.roles.len() < devices {
        return Err(SimError::Data(format!(
            "{} has {} roles with at least {min_samples} samples, fewer than {devices} devices",
            path.display(),
            corpus.roles.len()
        )));
    }
    let mut train = Vec::with_capacity(devices);
    let (mut tx, mut ty) = (Vec::new(), Vec::new());
    for role in corpus.roles.iter().take(devices) {
        let d = role.sequences();
        let n = d.len();
        let cut = n - ((n as f64 * test_fraction).round() as usize).min(n - 1);
        let test_idx: Vec<usize> = (cut..n).collect();
        let test = d.subset(&test_idx);
        tx.extend_from_slice(test.features());
        ty.extend_from_slice(test.targets());
        train.push(d.subset(&(0..cut).collect::<Vec<_>>()));
    }
    let test = Dataset::new(tx, ty, shakespeare::SEQ_LEN, shakespeare::SEQ_LEN)
        .map_err(|e| SimError::Data(e.to_string()))?;
    Ok((train, test))
}

/// How a training set is split over devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Shuffled and dealt out evenly.
    Iid,
    /// Sorted by label, cut into shards, `shards_per_device` random shards each (the FedAvg
    /// paper's pathological non-IID split: 200 shards of 300, 2 per device).
    Shards {
        /// Shards per device.
        shards_per_device: usize,
    },
    /// Each class spread over the devices in Dirichlet(alpha) proportions.
    Dirichlet {
        /// Concentration: small is skewed, large is near IID.
        alpha: f64,
    },
}

/// Splits `data` over `devices` devices.
pub fn partition_dataset(
    data: &Dataset,
    how: Partition,
    devices: usize,
    classes: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, SimError> {
    let labels = || partition::class_labels(data);
    match how {
        Partition::Iid => partition::iid(data.len(), devices, seed),
        Partition::Shards { shards_per_device } => {
            partition::label_shards(&labels(), devices, shards_per_device, seed)
        }
        Partition::Dirichlet { alpha } => {
            partition::dirichlet(&labels(), classes, devices, alpha, seed)
        }
    }
    .map_err(|e| SimError::Data(e.to_string()))
}
