//! Local differential privacy, for devices that trust no server: the device clips its own
//! update to an L2 bound and adds Gaussian noise before the update leaves it, so that
//! whatever the server does with it, each upload is a Gaussian-mechanism release of the
//! device's data. The device accounts for itself: `n` uploads compose to the ε of `n` steps
//! of the Gaussian mechanism (the Rényi-DP accountant at sampling rate 1: no amplification by
//! the server's sampling is assumed, since the device does not trust the server to sample).

use rand::{CryptoRng, Rng};
use rand_distr::{Distribution, StandardNormal};

use super::{epsilon, PrivacyError};
use crate::wire::params::Parameters;

/// A device's local differential privacy: clip to `clip`, add noise of deviation
/// `noise_multiplier · clip` to every coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDp {
    /// The L2 bound of the update before noise.
    pub clip: f64,
    /// The noise multiplier z.
    pub noise_multiplier: f64,
}

impl LocalDp {
    /// Checks the parameters: both positive and finite.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(PrivacyError::Clip(self.clip));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(PrivacyError::NoiseMultiplier(self.noise_multiplier));
        }
        Ok(())
    }

    /// Clips `delta` to L2 norm `clip` (scaling it down, in its direction) and adds Gaussian
    /// noise of standard deviation `noise_multiplier · clip` to every coordinate, drawn from
    /// the cryptographically secure `rng`.
    pub fn apply<R: Rng + CryptoRng + ?Sized>(&self, delta: &mut Parameters, rng: &mut R) {
        let norm = delta
            .iter()
            .flat_map(|(_, t)| t.data().iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        let std = self.noise_multiplier * self.clip;
        for t in delta.tensors_mut() {
            for x in t.data_mut() {
                let z: f64 = StandardNormal.sample(rng);
                *x = (f64::from(*x) * scale + std * z) as f32;
            }
        }
    }

    /// ε (at `delta`) the device has spent after `uploads` noised uploads.
    pub fn epsilon(&self, uploads: u64, delta: f64) -> Result<f64, PrivacyError> {
        if uploads == 0 {
            return Ok(0.0);
        }
        epsilon(1.0, self.noise_multiplier, uploads, delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;
    use rand::SeedableRng;

    fn params(v: Vec<f32>) -> Parameters {
        let n = v.len();
        Parameters::new(vec![("w".into(), Tensor::new(vec![n], v).unwrap())]).unwrap()
    }

    /// Statistically: the clipped signal is the update scaled to the bound in its direction,
    /// and what is added on top has mean 0 and the asked deviation (within 1% over 200,000
    /// coordinates).
    #[test]
    fn the_update_is_clipped_then_noised_with_the_asked_deviation() {
        let n = 200_000;
        let ldp = LocalDp {
            clip: 2.0,
            noise_multiplier: 0.5,
        };
        // Every coordinate 1: norm sqrt(n), clipped to 2, so each becomes 2 / sqrt(n).
        let mut d = params(vec![1.0; n]);
        ldp.apply(&mut d, &mut rand::rngs::StdRng::seed_from_u64(9));
        let signal = 2.0 / (n as f64).sqrt();
        let noise: Vec<f64> = d
            .at(0)
            .data()
            .iter()
            .map(|&x| f64::from(x) - signal)
            .collect();
        let mean = noise.iter().sum::<f64>() / n as f64;
        let sd = (noise.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(mean.abs() < 0.01, "{mean}");
        assert!(
            (sd / 1.0 - 1.0).abs() < 0.01,
            "deviation {sd}, wanted z·S = 1"
        );
        // A short update is not scaled: with tiny noise it comes back nearly unchanged.
        let tiny = LocalDp {
            clip: 10.0,
            noise_multiplier: 1e-9,
        };
        let mut d = params(vec![0.5, -0.25]);
        tiny.apply(&mut d, &mut rand::rngs::StdRng::seed_from_u64(1));
        assert!((d.at(0).data()[0] - 0.5).abs() < 1e-6);
        assert!((d.at(0).data()[1] + 0.25).abs() < 1e-6);
    }

    #[test]
    fn a_devices_epsilon_is_the_gaussian_mechanisms_composed_over_its_uploads() {
        let ldp = LocalDp {
            clip: 1.0,
            noise_multiplier: 4.0,
        };
        assert_eq!(ldp.epsilon(0, 1e-5).unwrap(), 0.0);
        let one = ldp.epsilon(1, 1e-5).unwrap();
        let ten = ldp.epsilon(10, 1e-5).unwrap();
        assert_eq!(one, epsilon(1.0, 4.0, 1, 1e-5).unwrap());
        assert!(ten > one && one > 0.0);
        assert!(LocalDp {
            clip: 0.0,
            noise_multiplier: 1.0
        }
        .validate()
        .is_err());
    }
}
