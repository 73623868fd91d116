//! Devices' training times on the virtual clock, drawn from a distribution
//! (`starling simulate --latency SPEC`) instead of being derived from their example counts.
//!
//! A spec is `constant:SECS`, `uniform:LO:HI`, `exponential:MEAN`, `lognormal:SIGMA` (median
//! 1 second, i.e. mu = 0) or `lognormal:SIGMA:MEDIAN`. Draws are seeded by the caller, so a
//! simulation stays reproducible.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::{Distribution, Exp, LogNormal, Uniform};
use serde::{Serialize, Serializer};

/// A distribution of device training times, in virtual seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Every device takes `secs`.
    Constant {
        /// Seconds per assignment (positive).
        secs: f64,
    },
    /// Uniform on `[lo, hi)`.
    Uniform {
        /// Shortest time (at least 0).
        lo: f64,
        /// Longest time (above `lo`).
        hi: f64,
    },
    /// Exponential with mean `mean`.
    Exponential {
        /// Mean seconds (positive).
        mean: f64,
    },
    /// Log-normal: `median · exp(sigma · N(0, 1))`, a heavy right tail for larger sigma.
    LogNormal {
        /// Standard deviation of the logarithm (at least 0).
        sigma: f64,
        /// Median seconds (positive); `exp(mu)`.
        median: f64,
    },
}

/// What a spec looks like, for error messages.
const FORMS: &str =
    "constant:SECS, uniform:LO:HI, exponential:MEAN, lognormal:SIGMA or lognormal:SIGMA:MEDIAN";

/// A latency spec that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid latency `{spec}`: {reason} (expected {FORMS})")]
pub struct LatencyError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Latency {
    /// Checks the parameters (a value built in code is checked like a parsed one).
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, not {v}"))
            }
        };
        match *self {
            Latency::Constant { secs } => positive("SECS", secs),
            Latency::Uniform { lo, hi } => {
                if lo.is_finite() && hi.is_finite() && lo >= 0.0 && lo < hi {
                    Ok(())
                } else {
                    Err(format!(
                        "LO and HI must satisfy 0 <= LO < HI, not {lo} and {hi}"
                    ))
                }
            }
            Latency::Exponential { mean } => positive("MEAN", mean),
            Latency::LogNormal { sigma, median } => {
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(format!("SIGMA must be a number >= 0, not {sigma}"));
                }
                positive("MEDIAN", median)
            }
        }
    }

    /// One training time in seconds (positive, finite).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        let secs = match *self {
            Latency::Constant { secs } => secs,
            Latency::Uniform { lo, hi } => Uniform::new(lo, hi).map_or(lo, |u| u.sample(rng)),
            Latency::Exponential { mean } => Exp::new(1.0 / mean).map_or(mean, |e| e.sample(rng)),
            Latency::LogNormal { sigma, median } => {
                LogNormal::new(median.ln(), sigma).map_or(median, |d| d.sample(rng))
            }
        };
        // A draw of exactly 0 (uniform from 0) or an overflow in an absurd tail would stop or
        // break the clock: keep every time positive and finite.
        if secs.is_finite() {
            secs.max(1e-9)
        } else {
            f64::MAX / 4.0
        }
    }

    /// The distribution's mean, in seconds.
    pub fn mean(&self) -> f64 {
        match *self {
            Latency::Constant { secs } => secs,
            Latency::Uniform { lo, hi } => (lo + hi) / 2.0,
            Latency::Exponential { mean } => mean,
            Latency::LogNormal { sigma, median } => median * (sigma * sigma / 2.0).exp(),
        }
    }
}

impl FromStr for Latency {
    type Err = LatencyError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| LatencyError {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = spec.trim().split(':');
        let kind = parts.next().unwrap_or_default().to_ascii_lowercase();
        let numbers = parts
            .map(|p| {
                p.trim()
                    .parse::<f64>()
                    .map_err(|_| err(format!("`{p}` is not a number")))
            })
            .collect::<Result<Vec<f64>, _>>()?;
        let arity = |want: &str| {
            err(format!(
                "`{kind}` takes {want}, got {} number(s)",
                numbers.len()
            ))
        };
        let latency = match (kind.as_str(), numbers.as_slice()) {
            ("constant", &[secs]) => Latency::Constant { secs },
            ("constant", _) => return Err(arity("one number (SECS)")),
            ("uniform", &[lo, hi]) => Latency::Uniform { lo, hi },
            ("uniform", _) => return Err(arity("two numbers (LO:HI)")),
            ("exponential", &[mean]) => Latency::Exponential { mean },
            ("exponential", _) => return Err(arity("one number (MEAN)")),
            ("lognormal", &[sigma]) => Latency::LogNormal { sigma, median: 1.0 },
            ("lognormal", &[sigma, median]) => Latency::LogNormal { sigma, median },
            ("lognormal", _) => return Err(arity("one or two numbers (SIGMA[:MEDIAN])")),
            _ => return Err(err(format!("unknown distribution `{kind}`"))),
        };
        latency.validate().map_err(err)?;
        Ok(latency)
    }
}

impl fmt::Display for Latency {
    /// The spec that parses back to this distribution.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Latency::Constant { secs } => write!(f, "constant:{secs}"),
            Latency::Uniform { lo, hi } => write!(f, "uniform:{lo}:{hi}"),
            Latency::Exponential { mean } => write!(f, "exponential:{mean}"),
            Latency::LogNormal { sigma, median } => write!(f, "lognormal:{sigma}:{median}"),
        }
    }
}

impl Serialize for Latency {
    /// As its spec, e.g. `"lognormal:1.5:1"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn draws_are_seeded_positive_and_near_their_mean() {
        for spec in [
            "constant:2",
            "uniform:0:4",
            "exponential:2",
            "lognormal:0.5:1.7649",
        ] {
            let l: Latency = spec.parse().unwrap();
            let draw = |seed| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                (0..20_000).map(|_| l.sample(&mut rng)).collect::<Vec<_>>()
            };
            let (a, b) = (draw(1), draw(1));
            assert_eq!(a, b, "{spec}: seeded");
            assert!(a.iter().all(|&t| t > 0.0 && t.is_finite()), "{spec}");
            let mean = a.iter().sum::<f64>() / a.len() as f64;
            assert!((mean - 2.0).abs() < 0.1, "{spec}: mean {mean}");
            assert!((l.mean() - 2.0).abs() < 1e-3, "{spec}: {}", l.mean());
        }
    }
}
