//! Inputs in a ring: a device's contribution as integers modulo 2^bits, so that masks cancel
//! exactly in the sum. Every value is first scaled into [-1, 1] by its range (an update's
//! coordinates by the clip bound, its weight by the weight cap, its loss by the loss bound),
//! then mapped to a signed integer in [-L, L] with L = 2^(input_bits - 1) - 1 by stochastic
//! rounding (floor(v L + u), u uniform in [0, 1)), which is unbiased, and stored in two's
//! complement modulo 2^bits. The ring has room for the sum of `devices` such integers
//! without wrapping: bits = input_bits + ceil(log2(devices)) + 1, at most 32.

use rand::Rng;

/// Why a ring cannot hold the inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The inputs' bits and the devices need more than 32 bits.
    #[error(
        "{input_bits}-bit inputs of {devices} devices need a ring of more than 32 bits; use \
         fewer input bits"
    )]
    TooWide {
        /// Bits per input.
        input_bits: u32,
        /// Devices whose inputs are summed.
        devices: usize,
    },
    /// Input bits outside 2..=24.
    #[error("input bits must be 2 to 24, got {0}")]
    InputBits(u32),
}

/// A fixed-point encoding of values in [-1, 1] into the ring Z_(2^bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedPoint {
    /// Bits of one device's input (its sign included).
    pub input_bits: u32,
    /// Bits of the ring: the sum of all devices' inputs never wraps.
    pub bits: u32,
}

impl FixedPoint {
    /// The encoding of `input_bits`-bit inputs summed over at most `devices` devices.
    pub fn new(input_bits: u32, devices: usize) -> Result<Self, EncodeError> {
        if !(2..=24).contains(&input_bits) {
            return Err(EncodeError::InputBits(input_bits));
        }
        let growth = usize::BITS - devices.max(1).saturating_sub(1).leading_zeros();
        let bits = input_bits + growth + 1;
        if bits > 32 {
            return Err(EncodeError::TooWide {
                input_bits,
                devices,
            });
        }
        Ok(Self { input_bits, bits })
    }

    /// The same inputs in a ring wide enough for distributed noise as well: `devices` devices
    /// each adding Skellam noise Sk(`mu`) to every value. Bits are added until the sum of the
    /// inputs and 12 standard deviations of the summed noise (plus 64) fit without wrapping.
    /// Server and devices derive it from the same public numbers, so they agree on the ring.
    pub fn with_noise(mut self, devices: usize, mu: f64) -> Result<Self, EncodeError> {
        let devices_f = devices.max(1) as f64;
        let bound =
            devices_f * self.levels() + 12.0 * (2.0 * mu.max(0.0) * devices_f).sqrt() + 64.0;
        while (1u64 << (self.bits - 1)) as f64 <= bound {
            if self.bits == 32 {
                return Err(EncodeError::TooWide {
                    input_bits: self.input_bits,
                    devices,
                });
            }
            self.bits += 1;
        }
        Ok(self)
    }

    /// The largest integer an input takes: L = 2^(input_bits - 1) - 1.
    pub fn levels(&self) -> f64 {
        f64::from((1u32 << (self.input_bits - 1)) - 1)
    }

    /// The ring's mask: 2^bits - 1.
    pub fn ring_mask(&self) -> u32 {
        if self.bits == 32 {
            u32::MAX
        } else {
            (1u32 << self.bits) - 1
        }
    }

    /// Encodes values already scaled into [-1, 1] (clamped there; NaN counts as 0) with
    /// stochastic rounding.
    pub fn encode(&self, values: &[f64], rng: &mut (impl Rng + ?Sized)) -> Vec<u32> {
        let levels = self.levels();
        let mask = self.ring_mask();
        values
            .iter()
            .map(|&v| {
                let v = if v.is_nan() { 0.0 } else { v.clamp(-1.0, 1.0) };
                let scaled = v * levels;
                let q = (scaled + rng.random::<f64>())
                    .floor()
                    .clamp(-levels, levels) as i64;
                (q as u32) & mask
            })
            .collect()
    }

    /// Decodes a sum of encoded inputs (modulo the ring) into the sum of the scaled values.
    pub fn decode(&self, sum: &[u32]) -> Vec<f64> {
        let levels = self.levels();
        let mask = u64::from(self.ring_mask());
        // 2^(bits - 1): values from it up are negative.
        let half = 1u64 << (self.bits - 1);
        sum.iter()
            .map(|&s| {
                let s = u64::from(s) & mask;
                let signed = if s >= half {
                    s as i64 - (mask + 1) as i64
                } else {
                    s as i64
                };
                signed as f64 / levels
            })
            .collect()
    }
}

/// Adds `b` into `a` modulo 2^bits.
pub fn add_into(a: &mut [u32], b: &[u32], mask: u32) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y) & mask;
    }
}

/// Subtracts `b` from `a` modulo 2^bits.
pub fn sub_from(a: &mut [u32], b: &[u32], mask: u32) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_sub(*y) & mask;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_ring_holds_the_sum_of_every_device() {
        let fp = FixedPoint::new(16, 1000).unwrap();
        assert_eq!(fp.bits, 16 + 10 + 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // 1000 devices at the extremes do not wrap.
        let mut sum = vec![0u32; 2];
        for _ in 0..1000 {
            add_into(&mut sum, &fp.encode(&[1.0, -1.0], &mut rng), fp.ring_mask());
        }
        let decoded = fp.decode(&sum);
        assert_eq!(decoded, vec![1000.0, -1000.0]);
        assert!(FixedPoint::new(24, 1 << 12).is_err());
        assert!(FixedPoint::new(1, 10).is_err());
    }

    #[test]
    fn a_ring_for_noise_holds_the_noised_sum() {
        let fp = FixedPoint::new(16, 10).unwrap();
        assert_eq!(fp.with_noise(10, 0.0).unwrap(), fp);
        // Noise of 4 levels' deviation a device needs more room.
        let mu = (4.0 * fp.levels()).powi(2) / 2.0;
        let wide = fp.with_noise(10, mu).unwrap();
        assert!(wide.bits > fp.bits && wide.input_bits == fp.input_bits);
        let half = (1u64 << (wide.bits - 1)) as f64;
        assert!(half > 10.0 * fp.levels() + 12.0 * (2.0 * mu * 10.0).sqrt());
        // 24-bit inputs of 100 devices fill a 32-bit ring: noise of deviation 2^27 over the
        // sum (12 of them are 1.6e9 on top of 8.4e8) leaves no bit to add.
        let full = FixedPoint::new(24, 100).unwrap();
        assert_eq!(full.bits, 32);
        assert!(full.with_noise(100, 1e14).is_err());
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_within_one_level() {
        let fp = FixedPoint::new(8, 10).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let v = 0.123_456_f64;
        let n = 20_000;
        let mut total = 0.0;
        for _ in 0..n {
            let d = fp.decode(&fp.encode(&[v], &mut rng))[0];
            assert!((d - v).abs() <= 1.0 / fp.levels() + 1e-12, "{d}");
            total += d;
        }
        let mean = total / f64::from(n);
        // Standard error of the mean below 0.5 / (127 sqrt(n)) ~ 2.8e-5.
        assert!((mean - v).abs() < 2e-4, "{mean}");
    }
}
