//! The IDX format of MNIST and Fashion-MNIST: a big-endian header (magic number, then one
//! u32 per dimension) followed by unsigned bytes. Images are `idx3-ubyte` (magic
//! `0x00000803`, dimensions count x rows x columns), labels `idx1-ubyte` (magic
//! `0x00000801`, dimension count).

use super::{maybe_gunzip, DatasetError};
use crate::data::Dataset;

const IMAGES: &str = "IDX images";
const LABELS: &str = "IDX labels";
/// Magic number of an IDX file of unsigned bytes with three dimensions.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Images read from an IDX file, pixels scaled from `0..=255` to `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Rows of each image.
    pub rows: usize,
    /// Columns of each image.
    pub cols: usize,
    /// `count x rows x cols` pixels, row-major.
    pub pixels: Vec<f32>,
}

impl Images {
    /// The number of images.
    pub fn count(&self) -> usize {
        self.pixels.len() / (self.rows * self.cols).max(1)
    }
}

/// Checks the magic number and reads `N` dimensions; returns them and the data after the
/// header, which must hold exactly their product in bytes.
fn parse<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
    magic: u32,
) -> Result<([usize; N], &'a [u8]), DatasetError> {
    let header = 4 + 4 * N;
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if bytes.len() < 4 {
        return Err(DatasetError::Truncated {
            what,
            expected: header,
            found: bytes.len(),
        });
    }
    let found = word(0);
    if found != magic {
        return Err(DatasetError::BadMagic {
            what,
            expected: magic,
            found,
        });
    }
    if bytes.len() < header {
        return Err(DatasetError::Truncated {
            what,
            expected: header,
            found: bytes.len(),
        });
    }
    let mut dims = [0usize; N];
    for (i, d) in dims.iter_mut().enumerate() {
        *d = word(4 + 4 * i) as usize;
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_add(header))
        .ok_or_else(|| DatasetError::BadHeader {
            what,
            reason: format!("dimensions {dims:?} are too large"),
        })?;
    match bytes.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(DatasetError::Truncated {
            what,
            expected,
            found: bytes.len(),
        }),
        std::cmp::Ordering::Greater => Err(DatasetError::TrailingBytes {
            what,
            expected,
            found: bytes.len(),
        }),
        std::cmp::Ordering::Equal => Ok((dims, &bytes[header..])),
    }
}

/// Reads an `idx3-ubyte` image file (gzip or raw), scaling each pixel `p` to `p / 255`.
pub fn parse_images(bytes: &[u8]) -> Result<Images, DatasetError> {
    let bytes = maybe_gunzip(bytes)?;
    let ([_, rows, cols], data) = parse::<3>(&bytes, IMAGES, IMAGES_MAGIC)?;
    if rows == 0 || cols == 0 {
        return Err(DatasetError::BadHeader {
            what: IMAGES,
            reason: format!("images of {rows}x{cols} pixels"),
        });
    }
    Ok(Images {
        rows,
        cols,
        pixels: data.iter().map(|&p| f32::from(p) / 255.0).collect(),
    })
}

/// Reads an `idx1-ubyte` label file (gzip or raw).
pub fn parse_labels(bytes: &[u8]) -> Result<Vec<u8>, DatasetError> {
    let bytes = maybe_gunzip(bytes)?;
    let ([_], data) = parse::<1>(&bytes, LABELS, LABELS_MAGIC)?;
    Ok(data.to_vec())
}

/// An image file and its label file (each gzip or raw) as a data set: one row of
/// `rows x cols` features per image (MNIST: 784, pixels in `[0, 1]`), one target column
/// holding the class index.
pub fn load(images: &[u8], labels: &[u8]) -> Result<Dataset, DatasetError> {
    let images = parse_images(images)?;
    let labels = parse_labels(labels)?;
    if images.count() != labels.len() {
        return Err(DatasetError::CountMismatch {
            images: images.count(),
            labels: labels.len(),
        });
    }
    let width = images.rows * images.cols;
    let targets = labels.iter().map(|&l| f32::from(l)).collect();
    Ok(Dataset::new(images.pixels, targets, width, 1).expect("one label per image"))
}
