//! Loading a device's local data from files.

use std::path::Path;

use starling_core::data::{Dataset, TargetColumn};

use crate::ClientError;

/// Reads a CSV file (numbers only; a header row is allowed; the target is the last column
/// unless told otherwise).
pub fn load_csv(path: &Path, target: &TargetColumn) -> Result<Dataset, ClientError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ClientError::Data(format!("cannot read {}: {e}", path.display())))?;
    Dataset::from_csv(&bytes, target)
        .map_err(|e| ClientError::Data(format!("{}: {e}", path.display())))
}
