//! Loaders of the standard federated-learning data sets, from byte slices (the caller reads
//! the files; the core does no I/O). Each accepts the bytes gzip-compressed or raw: gzip is
//! recognised by its magic number.
//!
//! - [`idx`]: MNIST and Fashion-MNIST (IDX images and labels) into a [`Dataset`](crate::Dataset).
//! - [`shakespeare`]: the plays by speaking role (LEAF's JSON) into per-role next-character
//!   samples: the natural "one role, one device" partition.

use std::borrow::Cow;
use std::io::Read;

pub mod idx;
pub mod shakespeare;

/// Errors in reading a data set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatasetError {
    /// The bytes start like gzip but do not decompress.
    #[error("corrupt gzip data: {0}")]
    Gzip(String),
    /// The data ends before its header says it should.
    #[error("{what}: truncated: expected {expected} bytes, found {found}")]
    Truncated {
        /// Which file (`IDX images`, `IDX labels`).
        what: &'static str,
        /// Bytes the header promises (header included).
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The data goes on after the end its header gives.
    #[error("{what}: {found} bytes, but the header describes {expected}: corrupt or not {what}")]
    TrailingBytes {
        /// Which file.
        what: &'static str,
        /// Bytes the header describes (header included).
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The file starts with the wrong magic number: another kind of file.
    #[error("{what}: magic number {found:#010x}, expected {expected:#010x}")]
    BadMagic {
        /// Which file.
        what: &'static str,
        /// The magic number this kind of file has.
        expected: u32,
        /// The number found.
        found: u32,
    },
    /// The header's dimensions are impossible (zero-sized images, sizes that overflow).
    #[error("{what}: invalid header: {reason}")]
    BadHeader {
        /// Which file.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Images and labels do not pair up.
    #[error("{images} images but {labels} labels: the two files do not belong together")]
    CountMismatch {
        /// Images in the image file.
        images: usize,
        /// Labels in the label file.
        labels: usize,
    },
    /// The JSON is malformed or not of the expected form.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// The gzip magic number (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The bytes, decompressed when they are gzip (several concatenated members are read as one
/// stream, as `gunzip` does); borrowed unchanged otherwise.
pub fn maybe_gunzip(bytes: &[u8]) -> Result<Cow<'_, [u8]>, DatasetError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| DatasetError::Gzip(e.to_string()))?;
    Ok(Cow::Owned(out))
}
