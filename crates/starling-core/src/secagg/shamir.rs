//! Shamir's secret sharing (Shamir 1979) of 32-byte secrets, byte by byte over GF(2^8) with
//! the AES polynomial x^8 + x^4 + x^3 + x + 1 (as SLIP-0039 and most byte-wise schemes do):
//! each byte of the secret is the constant term of its own random polynomial of degree
//! `threshold - 1`, a share is the 32 polynomials evaluated at the share's nonzero `x`, and
//! any `threshold` shares give the secret back by Lagrange interpolation at 0. Fewer reveal
//! nothing: every secret is equally consistent with them.
//!
//! No maintained crate fits (the byte-wise ones are unmaintained; `vsss-rs` shares scalars of
//! elliptic-curve fields), so this is the small field implementation, tested against the
//! field's definition (FIPS-197's worked products, every inverse) and the scheme's
//! (reconstruction from every `threshold`-subset, uniform shares below it). The arithmetic
//! has no secret-dependent branch or table lookup.

use rand::RngCore;

/// Bytes of a shared secret.
pub const SECRET_LEN: usize = 32;

/// One share of a 32-byte secret: the polynomials at `x`.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    /// The evaluation point, nonzero and distinct among a secret's shares.
    pub x: u8,
    /// The 32 polynomials' values at `x`.
    pub y: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

/// Why shares cannot be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// The threshold is 0 or above the number of shares.
    #[error("a threshold of {threshold} cannot be met by {shares} shares")]
    Threshold {
        /// The threshold.
        threshold: usize,
        /// The shares.
        shares: usize,
    },
    /// An evaluation point is 0 (the secret itself) or repeated.
    #[error("share points must be nonzero and distinct")]
    Points,
}

/// Multiplication in GF(2^8) mod x^8 + x^4 + x^3 + x + 1, without branches on the operands.
pub fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (carry & 0x1b);
        b >>= 1;
    }
    product
}

/// The multiplicative inverse in GF(2^8) (a^254); 0 for 0.
pub fn inv(a: u8) -> u8 {
    // a^254 = a^(2+4+8+16+32+64+128).
    let mut result = 1u8;
    let mut power = a;
    for _ in 0..7 {
        power = mul(power, power);
        result = mul(result, power);
    }
    result
}

/// Splits `secret` into one share per point of `xs`, any `threshold` of which give it back.
pub fn split(
    secret: &[u8; SECRET_LEN],
    threshold: usize,
    xs: &[u8],
    rng: &mut impl RngCore,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > xs.len() {
        return Err(ShamirError::Threshold {
            threshold,
            shares: xs.len(),
        });
    }
    check_points(xs.iter().copied())?;
    // Coefficients 1..threshold of every byte's polynomial.
    let mut coefficients = vec![[0u8; SECRET_LEN]; threshold - 1];
    for c in &mut coefficients {
        rng.fill_bytes(c);
    }
    let shares = xs
        .iter()
        .map(|&x| {
            let mut y = [0u8; SECRET_LEN];
            for (i, out) in y.iter_mut().enumerate() {
                // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + secret.
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = mul(acc, x) ^ c[i];
                }
                *out = mul(acc, x) ^ secret[i];
            }
            Share { x, y }
        })
        .collect();
    for c in &mut coefficients {
        c.fill(0);
    }
    Ok(shares)
}

fn check_points(xs: impl Iterator<Item = u8> + Clone) -> Result<(), ShamirError> {
    let mut seen = [false; 256];
    for x in xs {
        if x == 0 || seen[usize::from(x)] {
            return Err(ShamirError::Points);
        }
        seen[usize::from(x)] = true;
    }
    Ok(())
}

/// The secret from `threshold` (or more; the first `threshold` are used) of its shares.
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; SECRET_LEN], ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::Threshold {
            threshold,
            shares: shares.len(),
        });
    }
    let used = &shares[..threshold];
    check_points(used.iter().map(|s| s.x))?;
    let mut secret = [0u8; SECRET_LEN];
    for (j, sj) in used.iter().enumerate() {
        // Lagrange basis at 0: prod_{m != j} x_m / (x_m - x_j); minus is xor.
        let mut basis = 1u8;
        for (m, sm) in used.iter().enumerate() {
            if m != j {
                basis = mul(basis, mul(sm.x, inv(sm.x ^ sj.x)));
            }
        }
        for (out, &y) in secret.iter_mut().zip(&sj.y) {
            *out ^= mul(basis, y);
        }
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_field_is_aes_gf256() {
        // FIPS-197, section 4.2: {57} * {83} = {c1}, {57} * {13} = {fe}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "{a}");
            assert_eq!(mul(a, 1), a);
            assert_eq!(mul(a, 0), 0);
        }
        assert_eq!(inv(0), 0);
        // Multiplication distributes over addition (xor).
        for (a, b, c) in [(3u8, 7u8, 200u8), (0x57, 0x83, 0x13), (255, 128, 1)] {
            assert_eq!(mul(a, b ^ c), mul(a, b) ^ mul(a, c));
        }
    }

    #[test]
    fn any_threshold_of_the_shares_give_the_secret_back() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut secret = [0u8; SECRET_LEN];
        rng.fill_bytes(&mut secret);
        let xs: Vec<u8> = (1..=6).collect();
        let shares = split(&secret, 4, &xs, &mut rng).unwrap();
        // Every 4-subset of the 6, in any order.
        for mask in 0u32..64 {
            if mask.count_ones() != 4 {
                continue;
            }
            let mut subset: Vec<Share> = (0..6)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| shares[i].clone())
                .collect();
            subset.reverse();
            assert_eq!(combine(&subset, 4).unwrap(), secret, "{mask:b}");
        }
        // Three are not enough: their interpolation is another value.
        assert_ne!(combine(&shares[..3], 3).unwrap(), secret);
        assert_eq!(
            combine(&shares[..3], 4),
            Err(ShamirError::Threshold {
                threshold: 4,
                shares: 3
            })
        );
        assert_eq!(
            split(&secret, 2, &[1, 1], &mut rng),
            Err(ShamirError::Points)
        );
        assert_eq!(
            split(&secret, 2, &[0, 1], &mut rng),
            Err(ShamirError::Points)
        );
    }

    #[test]
    fn fewer_than_threshold_shares_are_uniform_whatever_the_secret() {
        // With threshold 2, one share's byte is secret ^ c * x: uniform over the 256 values
        // for every secret. Count the first byte of share x = 5 over many splits of two
        // different secrets: both histograms are flat.
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for byte in [0u8, 0xff] {
            let secret = [byte; SECRET_LEN];
            let mut counts = [0u32; 256];
            let trials = 256 * 200;
            for _ in 0..trials {
                let s = split(&secret, 2, &[5, 9], &mut rng).unwrap();
                counts[usize::from(s[0].y[0])] += 1;
            }
            // Chi-square with 255 degrees of freedom: far below 400 unless skewed.
            let expected = f64::from(trials) / 256.0;
            let chi2: f64 = counts
                .iter()
                .map(|&c| (f64::from(c) - expected).powi(2) / expected)
                .sum();
            assert!(chi2 < 400.0, "secret byte {byte}: chi-square {chi2}");
        }
    }
}
