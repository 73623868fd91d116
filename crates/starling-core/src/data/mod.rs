//! In-memory data sets (features and targets, row-major f32) and CSV parsing from bytes.

pub mod datasets;
pub mod partition;

/// Errors in reading or shaping a data set.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    /// No data rows.
    #[error("the data has no rows")]
    Empty,
    /// A row has a different number of columns than the first.
    #[error("line {line}: {found} columns, expected {expected}")]
    Columns {
        /// 1-based line number.
        line: u64,
        /// Columns found.
        found: usize,
        /// Columns expected.
        expected: usize,
    },
    /// A field is not a number.
    #[error("line {line}, column {column}: `{value}` is not a number")]
    NotANumber {
        /// 1-based line number.
        line: u64,
        /// 1-based column number.
        column: usize,
        /// The field as read.
        value: String,
    },
    /// A field is NaN or infinite.
    #[error("line {line}, column {column}: value is not finite")]
    NotFinite {
        /// 1-based line number.
        line: u64,
        /// 1-based column number.
        column: usize,
    },
    /// The CSV is broken (bad quoting, invalid UTF-8).
    #[error("invalid CSV: {0}")]
    Csv(String),
    /// The target column does not exist.
    #[error("target column {0} does not exist")]
    NoSuchColumn(String),
    /// The data does not fit the model.
    #[error("{0}")]
    Shape(String),
}

/// Which CSV column is the target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetColumn {
    /// The last column (the default).
    #[default]
    Last,
    /// A 0-based column index.
    Index(usize),
    /// A column named in the header row.
    Name(String),
}

/// `n` examples: `feature_dim` features and `target_dim` targets each, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    features: Vec<f32>,
    targets: Vec<f32>,
    feature_dim: usize,
    target_dim: usize,
}

impl Dataset {
    /// A data set from row-major features and targets.
    pub fn new(
        features: Vec<f32>,
        targets: Vec<f32>,
        feature_dim: usize,
        target_dim: usize,
    ) -> Result<Self, DataError> {
        if feature_dim == 0 || target_dim == 0 {
            return Err(DataError::Shape(
                "feature and target widths must be at least 1".into(),
            ));
        }
        if !features.len().is_multiple_of(feature_dim)
            || !targets.len().is_multiple_of(target_dim)
            || features.len() / feature_dim != targets.len() / target_dim
        {
            return Err(DataError::Shape(
                "features and targets describe different numbers of rows".into(),
            ));
        }
        Ok(Self {
            features,
            targets,
            feature_dim,
            target_dim,
        })
    }

    /// Parses CSV bytes: every field a number, one target column (the last unless told
    /// otherwise); a first row with non-numeric fields is taken as a header.
    pub fn from_csv(bytes: &[u8], target: &TargetColumn) -> Result<Self, DataError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .comment(Some(b'#'))
            .from_reader(bytes);
        let mut header: Option<Vec<String>> = None;
        let mut rows: Vec<(u64, Vec<f32>)> = Vec::new();
        let mut width = 0;
        for (i, record) in reader.records().enumerate() {
            let record = record.map_err(|e| DataError::Csv(e.to_string()))?;
            let line = record.position().map_or(i as u64 + 1, |p| p.line());
            if record.iter().all(str::is_empty) {
                continue;
            }
            if rows.is_empty()
                && header.is_none()
                && record.iter().any(|f| f.parse::<f32>().is_err())
            {
                header = Some(record.iter().map(str::to_string).collect());
                width = record.len();
                continue;
            }
            if width == 0 {
                width = record.len();
            }
            if record.len() != width {
                return Err(DataError::Columns {
                    line,
                    found: record.len(),
                    expected: width,
                });
            }
            let mut values = Vec::with_capacity(width);
            for (c, field) in record.iter().enumerate() {
                let v: f32 = field.parse().map_err(|_| DataError::NotANumber {
                    line,
                    column: c + 1,
                    value: field.chars().take(40).collect(),
                })?;
                if !v.is_finite() {
                    return Err(DataError::NotFinite {
                        line,
                        column: c + 1,
                    });
                }
                values.push(v);
            }
            rows.push((line, values));
        }
        if rows.is_empty() {
            return Err(DataError::Empty);
        }
        if width < 2 {
            return Err(DataError::Shape(
                "a data row needs at least two columns: features and a target".into(),
            ));
        }
        let t = match target {
            TargetColumn::Last => width - 1,
            TargetColumn::Index(i) if *i < width => *i,
            TargetColumn::Index(i) => return Err(DataError::NoSuchColumn(i.to_string())),
            TargetColumn::Name(name) => header
                .as_ref()
                .and_then(|h| h.iter().position(|c| c == name))
                .ok_or_else(|| DataError::NoSuchColumn(format!("`{name}`")))?,
        };
        let mut features = Vec::with_capacity(rows.len() * (width - 1));
        let mut targets = Vec::with_capacity(rows.len());
        for (_, row) in rows {
            for (c, v) in row.into_iter().enumerate() {
                if c == t {
                    targets.push(v);
                } else {
                    features.push(v);
                }
            }
        }
        Self::new(features, targets, width - 1, 1)
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.features.len() / self.feature_dim.max(1)
    }

    /// True with no examples.
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// Features per example.
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// Targets per example.
    pub fn target_dim(&self) -> usize {
        self.target_dim
    }

    /// All features, row-major.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// All targets, row-major.
    pub fn targets(&self) -> &[f32] {
        &self.targets
    }

    /// Copies the rows `indices` into the two batch buffers (cleared first).
    pub fn gather(&self, indices: &[usize], x: &mut Vec<f32>, y: &mut Vec<f32>) {
        x.clear();
        y.clear();
        let (fd, td) = (self.feature_dim, self.target_dim);
        for &i in indices {
            x.extend_from_slice(&self.features[i * fd..(i + 1) * fd]);
            y.extend_from_slice(&self.targets[i * td..(i + 1) * td]);
        }
    }

    /// The rows `indices` as a new data set.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::new();
        let mut y = Vec::new();
        self.gather(indices, &mut x, &mut y);
        Dataset {
            features: x,
            targets: y,
            feature_dim: self.feature_dim,
            target_dim: self.target_dim,
        }
    }
}

/// `n` points of `y = w x + b + noise` with `x` uniform in `[lo, hi)` and Gaussian noise of
/// standard deviation `noise`, seeded: the demo's per-device private data.
pub fn synthetic_line(
    w: f32,
    b: f32,
    (lo, hi): (f32, f32),
    n: usize,
    noise: f32,
    seed: u64,
) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(n);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let x = rng.random_range(lo..hi);
        // Box-Muller: one standard normal from two uniforms.
        let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
        xs.push(x);
        ys.push(w * x + b + noise * z);
    }
    Dataset {
        features: xs,
        targets: ys,
        feature_dim: 1,
        target_dim: 1,
    }
}

/// The data set as CSV text with a header (`x0,…,y0,…`).
pub fn to_csv(data: &Dataset) -> String {
    let mut out = String::new();
    let names: Vec<String> = (0..data.feature_dim)
        .map(|i| format!("x{i}"))
        .chain((0..data.target_dim).map(|i| format!("y{i}")))
        .collect();
    out.push_str(&names.join(","));
    out.push('\n');
    for (x, y) in data
        .features
        .chunks_exact(data.feature_dim)
        .zip(data.targets.chunks_exact(data.target_dim))
    {
        let row: Vec<String> = x.iter().chain(y).map(|v| v.to_string()).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_and_default_last_target() {
        let d = Dataset::from_csv(b"x1,x2,y\n1,2,3\n4,5,6\n", &TargetColumn::Last).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.features(), &[1.0, 2.0, 4.0, 5.0]);
        assert_eq!(d.targets(), &[3.0, 6.0]);
        let named =
            Dataset::from_csv(b"x1,x2,y\n1,2,3\n", &TargetColumn::Name("x1".into())).unwrap();
        assert_eq!(named.targets(), &[1.0]);
        assert_eq!(named.features(), &[2.0, 3.0]);
    }

    #[test]
    fn synthetic_data_round_trips_through_csv() {
        let d = synthetic_line(2.0, 1.0, (0.0, 1.0), 20, 0.1, 3);
        assert_eq!(d, synthetic_line(2.0, 1.0, (0.0, 1.0), 20, 0.1, 3));
        assert!(d.features().iter().all(|x| (0.0..1.0).contains(x)));
        let back = Dataset::from_csv(to_csv(&d).as_bytes(), &TargetColumn::Last).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn csv_errors_say_where() {
        assert_eq!(
            Dataset::from_csv(b"", &TargetColumn::Last),
            Err(DataError::Empty)
        );
        assert_eq!(
            Dataset::from_csv(b"x,y\n", &TargetColumn::Last),
            Err(DataError::Empty)
        );
        assert_eq!(
            Dataset::from_csv(b"1,2\n3,4,5\n", &TargetColumn::Last),
            Err(DataError::Columns {
                line: 2,
                found: 3,
                expected: 2
            })
        );
        assert_eq!(
            Dataset::from_csv(b"1,2\n3,abc\n", &TargetColumn::Last),
            Err(DataError::NotANumber {
                line: 2,
                column: 2,
                value: "abc".into()
            })
        );
        assert_eq!(
            Dataset::from_csv(b"1,2\n3,NaN\n", &TargetColumn::Last),
            Err(DataError::NotFinite { line: 2, column: 2 })
        );
        assert!(matches!(
            Dataset::from_csv(b"1\n2\n", &TargetColumn::Last),
            Err(DataError::Shape(_))
        ));
        assert_eq!(
            Dataset::from_csv(b"1,2\n", &TargetColumn::Index(5)),
            Err(DataError::NoSuchColumn("5".into()))
        );
    }
}
