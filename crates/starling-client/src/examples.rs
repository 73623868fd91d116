//! The device's local examples under a storage budget: the host collects examples as the
//! device sees them (a keyboard's typed words, a sensor's readings) and says how many bytes
//! of storage they may take; the store keeps the newest that fit and drops the oldest, so
//! training always sees the freshest data the budget allows and the app never fills the disk.
//!
//! The store is one file, `examples.bin`, in a folder the host chooses (the session's folder
//! does): a 16-byte header (`STEX`, format version 1, feature width, target width, all
//! little-endian u32) and then one row per example, its features and targets as
//! little-endian f32. The budget counts the whole file. Every change is written to a
//! temporary file, synced and renamed into place, so a crash leaves the old store or the new
//! one. A change that cannot be made (rows of another width, non-finite values, a budget
//! too small for one example) is refused with a message and changes nothing.
//!
//! The examples are the device's own and stay on the device: nothing here sends them
//! anywhere, and only what a training round makes of them (an update) ever leaves.

use std::path::{Path, PathBuf};

use starling_core::Dataset;

use crate::ClientError;

/// The store's file in its folder.
pub const EXAMPLES_FILE: &str = "examples.bin";
const MAGIC: &[u8; 4] = b"STEX";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;

/// Local examples kept under a byte budget, newest first to stay.
#[derive(Debug)]
pub struct ExampleStore {
    path: PathBuf,
    budget: u64,
    data: Option<Dataset>,
}

/// What [`ExampleStore::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    /// Examples of the new batch that were kept.
    pub kept: usize,
    /// Examples dropped to stay within the budget (the oldest first, new ones included
    /// when the batch alone is over it).
    pub dropped: usize,
    /// Examples in the store now.
    pub stored: usize,
}

fn data_error(message: impl Into<String>) -> ClientError {
    ClientError::Data(message.into())
}

impl ExampleStore {
    /// Opens the store in `dir` (made if missing) with a budget of `budget` bytes. A store
    /// already over a smaller budget is trimmed to it now, oldest examples first.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, ClientError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| data_error(format!("cannot make {}: {e}", dir.display())))?;
        let path = dir.join(EXAMPLES_FILE);
        let data = match std::fs::read(&path) {
            Ok(bytes) => Some(decode(&bytes).map_err(|m| {
                data_error(format!(
                    "{}: {m}; delete it to start afresh",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(data_error(format!("cannot read {}: {e}", path.display()))),
        };
        let mut store = Self { path, budget, data };
        if let Some(d) = &store.data {
            store.check_budget(d.feature_dim(), d.target_dim())?;
            if store.bytes() > budget {
                let keep = store.rows_in_budget(d.feature_dim(), d.target_dim());
                let trimmed = newest(d, keep);
                store.save(&trimmed)?;
                store.data = Some(trimmed);
            }
        }
        Ok(store)
    }

    /// The budget, bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes the store takes on disk (0 when it holds nothing yet).
    pub fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| {
            HEADER_LEN as u64 + d.len() as u64 * row_bytes(d.feature_dim(), d.target_dim())
        })
    }

    /// Examples stored.
    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, Dataset::len)
    }

    /// Whether it holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored examples, oldest first: what the device trains on.
    pub fn dataset(&self) -> Option<&Dataset> {
        self.data.as_ref()
    }

    fn rows_in_budget(&self, feature_dim: usize, target_dim: usize) -> usize {
        let room = self.budget.saturating_sub(HEADER_LEN as u64);
        usize::try_from(room / row_bytes(feature_dim, target_dim)).unwrap_or(usize::MAX)
    }

    fn check_budget(&self, feature_dim: usize, target_dim: usize) -> Result<(), ClientError> {
        let one = HEADER_LEN as u64 + row_bytes(feature_dim, target_dim);
        if self.budget < one {
            return Err(data_error(format!(
                "a storage budget of {} bytes cannot hold one example of {feature_dim} \
                 features and {target_dim} targets ({one} bytes with the header)",
                self.budget
            )));
        }
        Ok(())
    }

    /// Adds `batch` as the newest examples and drops the oldest beyond the budget. Refused,
    /// with the store unchanged, when the batch's widths differ from the stored examples' or
    /// it holds NaN or an infinity.
    pub fn add(&mut self, batch: &Dataset) -> Result<Added, ClientError> {
        let (fd, td) = (batch.feature_dim(), batch.target_dim());
        if let Some(d) = &self.data {
            if (d.feature_dim(), d.target_dim()) != (fd, td) {
                return Err(data_error(format!(
                    "the store keeps examples of {} features and {} targets; these have {fd} \
                     and {td}",
                    d.feature_dim(),
                    d.target_dim()
                )));
            }
        }
        if let Some(row) = first_non_finite(batch) {
            return Err(data_error(format!(
                "example {row} of the batch holds NaN or an infinity; nothing was stored"
            )));
        }
        self.check_budget(fd, td)?;
        let keep = self.rows_in_budget(fd, td);
        let old = self.data.as_ref().map_or(0, Dataset::len);
        let total = old + batch.len();
        let dropped = total.saturating_sub(keep);
        let merged = match &self.data {
            Some(d) => {
                let mut features = d.features().to_vec();
                features.extend_from_slice(batch.features());
                let mut targets = d.targets().to_vec();
                targets.extend_from_slice(batch.targets());
                Dataset::new(features, targets, fd, td).map_err(|e| data_error(e.to_string()))?
            }
            None => batch.clone(),
        };
        let kept_all = newest(&merged, keep);
        self.save(&kept_all)?;
        self.data = Some(kept_all);
        Ok(Added {
            kept: batch.len().min(keep),
            dropped,
            stored: total - dropped,
        })
    }

    /// Forgets every stored example (the file is removed).
    pub fn clear(&mut self) -> Result<(), ClientError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(data_error(format!(
                    "cannot remove {}: {e}",
                    self.path.display()
                )))
            }
        }
        self.data = None;
        Ok(())
    }

    fn save(&self, data: &Dataset) -> Result<(), ClientError> {
        crate::session::write_atomic(&self.path, &encode(data))
    }
}

fn row_bytes(feature_dim: usize, target_dim: usize) -> u64 {
    4 * (feature_dim as u64 + target_dim as u64)
}

fn first_non_finite(d: &Dataset) -> Option<usize> {
    let (fd, td) = (d.feature_dim(), d.target_dim());
    (0..d.len()).find(|&i| {
        d.features()[i * fd..(i + 1) * fd]
            .iter()
            .chain(&d.targets()[i * td..(i + 1) * td])
            .any(|v| !v.is_finite())
    })
}

/// The newest `keep` rows of `d`.
fn newest(d: &Dataset, keep: usize) -> Dataset {
    let skip = d.len().saturating_sub(keep);
    let (fd, td) = (d.feature_dim(), d.target_dim());
    Dataset::new(
        d.features()[skip * fd..].to_vec(),
        d.targets()[skip * td..].to_vec(),
        fd,
        td,
    )
    .expect("a suffix of whole rows")
}

fn encode(d: &Dataset) -> Vec<u8> {
    let (fd, td) = (d.feature_dim(), d.target_dim());
    let mut out = Vec::with_capacity(HEADER_LEN + d.len() * 4 * (fd + td));
    out.extend_from_slice(MAGIC);
    for v in [VERSION, fd as u32, td as u32] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for i in 0..d.len() {
        for v in d.features()[i * fd..(i + 1) * fd]
            .iter()
            .chain(&d.targets()[i * td..(i + 1) * td])
        {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Dataset, String> {
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err("not an example store".into());
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if word(4) != VERSION {
        return Err(format!("example store format {} is not known", word(4)));
    }
    let (fd, td) = (word(8) as usize, word(12) as usize);
    if fd == 0 || td == 0 {
        return Err("the example store's widths are zero".into());
    }
    let row = 4 * (fd + td);
    let body = &bytes[HEADER_LEN..];
    if !body.len().is_multiple_of(row) {
        return Err("the example store ends in the middle of an example".into());
    }
    let n = body.len() / row;
    let mut features = Vec::with_capacity(n * fd);
    let mut targets = Vec::with_capacity(n * td);
    for r in body.chunks_exact(row) {
        let mut values = r
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
        features.extend(values.by_ref().take(fd));
        targets.extend(values);
    }
    Dataset::new(features, targets, fd, td).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` examples of 2 features and 1 target, numbered from `from`.
    fn rows(from: usize, n: usize) -> Dataset {
        let features = (from..from + n)
            .flat_map(|i| [i as f32, -(i as f32)])
            .collect();
        let targets = (from..from + n).map(|i| i as f32 * 0.5).collect();
        Dataset::new(features, targets, 2, 1).unwrap()
    }

    /// Room for `n` examples of `rows`' width (12 bytes each) and the header.
    fn budget_for(n: u64) -> u64 {
        HEADER_LEN as u64 + 12 * n
    }

    #[test]
    fn the_store_keeps_the_newest_examples_that_fit_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExampleStore::open(dir.path(), budget_for(10) + 11).unwrap();
        assert_eq!(
            store.add(&rows(0, 6)).unwrap(),
            Added {
                kept: 6,
                dropped: 0,
                stored: 6
            }
        );
        // Four more fit; the fifth pushes the oldest out.
        assert_eq!(
            store.add(&rows(6, 5)).unwrap(),
            Added {
                kept: 5,
                dropped: 1,
                stored: 10
            }
        );
        assert_eq!(store.dataset().unwrap(), &rows(1, 10));
        assert!(store.bytes() <= store.budget());
        let on_disk = std::fs::metadata(dir.path().join(EXAMPLES_FILE))
            .unwrap()
            .len();
        assert_eq!(on_disk, store.bytes());
        // A batch larger than the whole budget: only its newest stay.
        assert_eq!(
            store.add(&rows(100, 25)).unwrap(),
            Added {
                kept: 10,
                dropped: 25,
                stored: 10
            }
        );
        assert_eq!(store.dataset().unwrap(), &rows(115, 10));
    }

    #[test]
    fn a_reopened_store_holds_the_same_examples_and_a_smaller_budget_trims_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExampleStore::open(dir.path(), budget_for(8)).unwrap();
        store.add(&rows(0, 8)).unwrap();
        drop(store);
        let store = ExampleStore::open(dir.path(), budget_for(8)).unwrap();
        assert_eq!(store.dataset().unwrap(), &rows(0, 8));
        let store = ExampleStore::open(dir.path(), budget_for(3)).unwrap();
        assert_eq!(store.dataset().unwrap(), &rows(5, 3));
        let on_disk = std::fs::metadata(dir.path().join(EXAMPLES_FILE))
            .unwrap()
            .len();
        assert_eq!(on_disk, budget_for(3));
    }

    #[test]
    fn bad_examples_and_impossible_budgets_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExampleStore::open(dir.path(), budget_for(5)).unwrap();
        store.add(&rows(0, 3)).unwrap();
        let before = std::fs::read(dir.path().join(EXAMPLES_FILE)).unwrap();

        let wider = Dataset::new(vec![1.0; 3], vec![0.0], 3, 1).unwrap();
        let e = store.add(&wider).unwrap_err().to_string();
        assert!(
            e.contains("2 features") && e.contains("these have 3"),
            "{e}"
        );
        let mut bad = rows(3, 2).features().to_vec();
        bad[3] = f32::NAN;
        let nan = Dataset::new(bad, vec![0.0, 1.0], 2, 1).unwrap();
        let e = store.add(&nan).unwrap_err().to_string();
        assert!(e.contains("example 1") && e.contains("NaN"), "{e}");
        let inf = Dataset::new(vec![0.0, 0.0], vec![f32::INFINITY], 2, 1).unwrap();
        assert!(store.add(&inf).is_err());

        assert_eq!(store.dataset().unwrap(), &rows(0, 3));
        assert_eq!(
            std::fs::read(dir.path().join(EXAMPLES_FILE)).unwrap(),
            before
        );

        // A budget that holds no example at all is refused, before anything is stored.
        let other = tempfile::tempdir().unwrap();
        let mut tiny = ExampleStore::open(other.path(), budget_for(1) - 1).unwrap();
        let e = tiny.add(&rows(0, 1)).unwrap_err().to_string();
        assert!(e.contains("cannot hold one example"), "{e}");
        assert!(!other.path().join(EXAMPLES_FILE).exists());
        // A corrupt file is named, not guessed at.
        std::fs::write(
            other.path().join(EXAMPLES_FILE),
            b"STEX\x01\0\0\0\x02\0\0\0\x01\0\0\0xyz",
        )
        .unwrap();
        let e = ExampleStore::open(other.path(), 1000)
            .unwrap_err()
            .to_string();
        assert!(e.contains("middle of an example"), "{e}");
    }

    #[test]
    fn clear_forgets_every_example() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExampleStore::open(dir.path(), budget_for(4)).unwrap();
        store.add(&rows(0, 4)).unwrap();
        store.clear().unwrap();
        assert!(store.is_empty());
        assert!(!dir.path().join(EXAMPLES_FILE).exists());
        assert!(ExampleStore::open(dir.path(), budget_for(4))
            .unwrap()
            .is_empty());
    }
}
