//! The complete works of Shakespeare split by speaking role, as LEAF and the FedAvg paper
//! use them: each role (`"<play>/<ROLE>"`) is one device. Its text becomes samples in one of
//! two ways:
//!
//! - [`Role::sequences`], the FedAvg paper's character model unrolled over [`SEQ_LEN`]
//!   characters: the text cut into consecutive pieces of 80 characters, each predicting the
//!   80 characters that follow each of its characters (the piece shifted by one), so that
//!   every character of the text is predicted once. `starling simulate --model lstm` trains
//!   on these.
//! - [`Role::dataset`], LEAF's next-character samples: every window of 80 consecutive
//!   characters with the one character that follows as the target. The role filter counts
//!   these ([`Role::samples`]), as LEAF does.
//!
//! Input: one JSON object `{"<play>/<ROLE>": "<all lines of the role, newline-separated>"}`,
//! gzip or raw. Roles are ordered by name, so the partition is the same on every machine.
//!
//! Characters become indices in a fixed vocabulary: the 80 characters of LEAF's Shakespeare
//! task ([`VOCAB`], indices `0..80` in its order) and [`UNKNOWN`] (80) for any other
//! character, [`VOCAB_SIZE`] = 81 classes in all. A sample's features are its 80 character
//! indices as f32 (`0.0..=80.0`, meant for an embedding or a one-hot layer, not as
//! magnitudes), its targets the next characters' indices (80, or 1 for LEAF's samples).

use std::collections::BTreeMap;

use super::{maybe_gunzip, DatasetError};
use crate::data::Dataset;

/// The characters of LEAF's Shakespeare vocabulary, in index order.
pub const VOCAB: &str =
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}";
/// The index of every character not in [`VOCAB`].
pub const UNKNOWN: usize = 80;
/// Classes of the next-character target: the 80 characters of [`VOCAB`] and [`UNKNOWN`].
pub const VOCAB_SIZE: usize = 81;
/// Characters of context per sample (LEAF's and the FedAvg paper's 80).
pub const SEQ_LEN: usize = 80;

/// The vocabulary index of a character.
pub fn char_index(c: char) -> usize {
    match c {
        '\n' => 0,
        ' ' => 1,
        '!' => 2,
        '"' => 3,
        '&' => 4,
        '\'' => 5,
        '(' => 6,
        ')' => 7,
        ',' => 8,
        '-' => 9,
        '.' => 10,
        '0'..='9' => 11 + (c as usize - '0' as usize),
        ':' => 21,
        ';' => 22,
        '>' => 23,
        '?' => 24,
        'A'..='Z' => 25 + (c as usize - 'A' as usize),
        '[' => 51,
        ']' => 52,
        'a'..='z' => 53 + (c as usize - 'a' as usize),
        '}' => 79,
        _ => UNKNOWN,
    }
}

/// One speaking role: a device's private text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// `"<play>/<ROLE>"`.
    pub name: String,
    /// The role's text as vocabulary indices.
    pub text: Vec<u8>,
}

impl Role {
    /// The number of samples: one per window of [`SEQ_LEN`] characters that has a next
    /// character.
    pub fn samples(&self) -> usize {
        self.text.len().saturating_sub(SEQ_LEN)
    }

    /// The role's samples as a data set: [`SEQ_LEN`] features (character indices) and one
    /// target (the next character's index) per sample, in text order. Costs
    /// `(SEQ_LEN + 1) x 4` bytes per sample.
    pub fn dataset(&self) -> Dataset {
        let n = self.samples();
        let mut features = Vec::with_capacity(n * SEQ_LEN);
        let mut targets = Vec::with_capacity(n);
        for window in self.text.windows(SEQ_LEN + 1) {
            features.extend(window[..SEQ_LEN].iter().map(|&c| f32::from(c)));
            targets.push(f32::from(window[SEQ_LEN]));
        }
        Dataset::new(features, targets, SEQ_LEN, 1).expect("one target per window")
    }

    /// The number of sequences: pieces of [`SEQ_LEN`] characters, one after the other, each
    /// with the character after its last.
    pub fn sequences_len(&self) -> usize {
        self.text.len().saturating_sub(1) / SEQ_LEN
    }

    /// The role's text as sequences for a model that predicts at every step: piece `s` is
    /// characters `80 s .. 80 s + 80` (its features), and its targets are characters
    /// `80 s + 1 .. 80 s + 81`, the character after each. The last characters that do not
    /// fill a piece are left out. Costs `2 SEQ_LEN x 4` bytes per sequence.
    pub fn sequences(&self) -> Dataset {
        let n = self.sequences_len();
        let mut features = Vec::with_capacity(n * SEQ_LEN);
        let mut targets = Vec::with_capacity(n * SEQ_LEN);
        for s in 0..n {
            let piece = &self.text[s * SEQ_LEN..=(s + 1) * SEQ_LEN];
            features.extend(piece[..SEQ_LEN].iter().map(|&c| f32::from(c)));
            targets.extend(piece[1..].iter().map(|&c| f32::from(c)));
        }
        Dataset::new(features, targets, SEQ_LEN, SEQ_LEN).expect("80 targets per sequence")
    }
}

/// The roles that have enough samples, ordered by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    /// The roles, ordered by name.
    pub roles: Vec<Role>,
}

impl Corpus {
    /// Samples over all roles.
    pub fn samples(&self) -> usize {
        self.roles.iter().map(Role::samples).sum()
    }

    /// Every role's samples in one data set, roles in order, and the natural partition: one
    /// device per role, holding the indices of that role's samples. The whole corpus holds
    /// about 4 million samples (1.3 GB as f32): for a simulation, prefer building each
    /// device's data on demand with [`Role::dataset`].
    pub fn dataset(&self) -> (Dataset, Vec<Vec<usize>>) {
        let mut features = Vec::with_capacity(self.samples() * SEQ_LEN);
        let mut targets = Vec::with_capacity(self.samples());
        let mut partition = Vec::with_capacity(self.roles.len());
        for role in &self.roles {
            let start = targets.len();
            let d = role.dataset();
            features.extend_from_slice(d.features());
            targets.extend_from_slice(d.targets());
            partition.push((start..targets.len()).collect());
        }
        let data = Dataset::new(features, targets, SEQ_LEN, 1).expect("one target per window");
        (data, partition)
    }
}

/// Reads the roles JSON (gzip or raw), keeping the roles with at least `min_samples`
/// samples (and at least one). LEAF and the data's README use 64.
pub fn parse(bytes: &[u8], min_samples: usize) -> Result<Corpus, DatasetError> {
    let bytes = maybe_gunzip(bytes)?;
    let by_role: BTreeMap<String, String> = serde_json::from_slice(&bytes).map_err(|e| {
        DatasetError::Json(format!(
            "{e} (expected one object mapping \"<play>/<ROLE>\" to the role's text)"
        ))
    })?;
    let roles = by_role
        .into_iter()
        .map(|(name, text)| Role {
            name,
            text: text.chars().map(|c| char_index(c) as u8).collect(),
        })
        .filter(|r| r.samples() >= min_samples.max(1))
        .collect();
    Ok(Corpus { roles })
}
