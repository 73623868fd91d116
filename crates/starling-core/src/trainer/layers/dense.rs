//! The fully connected layer `y = x W + b` (`W`: `[inputs, units]`, as in TensorFlow's
//! `matmul(x, W) + b`): on the GEMM kernel, or for training batches of up to
//! [`SMALL_BATCH`] rows on the small-batch kernel of [`super::kernels`]. With plain SGD the
//! backward pass also steps the weight ([`backward_sgd`]).

use super::gemm::{sgemm, sgemm_strided, Mat};
#[cfg(not(target_arch = "wasm32"))]
use super::kernels::dense_forward_small;

/// The largest batch the forward pass gives the small-batch kernel (its output stays in L1).
pub const SMALL_BATCH: usize = 16;

/// The fewest units for which the forward pass uses the small-batch kernel: it pays off where
/// the weight is big; narrower layers (a regression's single output) keep the GEMM, whose
/// sums round the same natively and in the browser.
#[cfg(not(target_arch = "wasm32"))]
const SMALL_KERNEL_MIN_UNITS: usize = 16;

/// Forward pass: `x` is `n x inputs`; `y` is resized to `n x units` and overwritten.
pub fn forward(
    x: &[f32],
    n: usize,
    w: &[f32],
    b: &[f32],
    inputs: usize,
    units: usize,
    y: &mut Vec<f32>,
) {
    y.clear();
    for _ in 0..n {
        y.extend_from_slice(b);
    }
    // Not in the browser's device app, which stays under 100 KB: there the GEMM serves.
    #[cfg(not(target_arch = "wasm32"))]
    if n <= SMALL_BATCH && units >= SMALL_KERNEL_MIN_UNITS {
        return dense_forward_small(x, n, w, inputs, units, y);
    }
    sgemm(
        1.0,
        Mat::new(x, n, inputs),
        Mat::new(w, inputs, units),
        1.0,
        y,
    );
}

/// Backward pass: given `dy` (`n x units`), writes `dW = xᵀ dy` and `db = Σ_rows dy`, and
/// `dx = dy Wᵀ` (`n x inputs`) when given a buffer for it.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    n: usize,
    w: &[f32],
    dy: &[f32],
    inputs: usize,
    units: usize,
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    sgemm(
        1.0,
        Mat::new(x, n, inputs).t(),
        Mat::new(dy, n, units),
        0.0,
        dw,
    );
    bias_gradient(dy, units, db);
    if let Some(dx) = dx {
        sgemm(
            1.0,
            Mat::new(dy, n, units),
            Mat::new(w, inputs, units).t(),
            0.0,
            dx,
        );
    }
}

/// Rows of the weight [`backward_sgd`] handles at a time: 128 KiB of a 256-unit layer,
/// 512 KiB of the CNN's 512-unit one, so the block stays in L2 between its two GEMMs.
const STEP_BLOCK_ROWS: usize = 256;

/// The backward pass fused with a plain SGD step on the weight: writes `dx = dy Wᵀ` (when
/// given a buffer) from the weight as it was, and applies `W -= lr xᵀ dy` as a GEMM into
/// `W`, block of rows by block of rows: each block is read from memory once for both
/// (instead of `W` read for `dx`, `dW` written, then `W` and `dW` read and `W` written by a
/// separate step), and the weight gradient is never stored. The bias is the caller's
/// ([`bias_gradient`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_sgd(
    x: &[f32],
    n: usize,
    w: &mut [f32],
    dy: &[f32],
    inputs: usize,
    units: usize,
    learning_rate: f32,
    mut dx: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), n * inputs, "dense input length");
    assert_eq!(w.len(), inputs * units, "dense weight length");
    assert_eq!(dy.len(), n * units, "dense gradient length");
    if n == 0 {
        if let Some(dx) = dx {
            dx.fill(0.0);
        }
        return;
    }
    for (block, wb) in w.chunks_mut(STEP_BLOCK_ROWS * units).enumerate() {
        let (k0, rows) = (block * STEP_BLOCK_ROWS, wb.len() / units);
        if let Some(dx) = dx.as_deref_mut() {
            // dx[:, k0..k0 + rows] = dy W[k0..k0 + rows]ᵀ
            sgemm_strided(
                1.0,
                Mat::new(dy, n, units),
                Mat::new(wb, rows, units).t(),
                0.0,
                &mut dx[k0..],
                inputs,
            );
        }
        // W[k0..k0 + rows] -= lr x[:, k0..k0 + rows]ᵀ dy
        sgemm(
            -learning_rate,
            Mat::strided(&x[k0..], n, rows, inputs).t(),
            Mat::new(dy, n, units),
            1.0,
            wb,
        );
    }
}

/// `db = Σ_rows dy`.
pub fn bias_gradient(dy: &[f32], units: usize, db: &mut [f32]) {
    db.fill(0.0);
    for row in dy.chunks_exact(units) {
        for (acc, v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.7)
            .collect()
    }

    /// The fused step equals the backward pass followed by `W -= lr dW`, over shapes with one
    /// block, several, and a last partial one.
    #[test]
    fn the_fused_step_equals_the_gradient_then_the_step() {
        let lr = 0.05;
        for (n, inputs, units) in [(1, 3, 2), (10, 37, 33), (10, 600, 40), (17, 513, 9)] {
            let x = values(n * inputs, 1);
            let w = values(inputs * units, 2);
            let dy = values(n * units, 3);
            let (mut dw, mut db) = (vec![0.0; inputs * units], vec![0.0; units]);
            let mut dx_want = vec![0.0; n * inputs];
            backward(
                &x,
                n,
                &w,
                &dy,
                inputs,
                units,
                &mut dw,
                &mut db,
                Some(&mut dx_want),
            );
            let w_want: Vec<f32> = w.iter().zip(&dw).map(|(p, g)| p - lr * g).collect();
            let mut w_got = w.clone();
            let mut dx_got = vec![f32::NAN; n * inputs];
            backward_sgd(&x, n, &mut w_got, &dy, inputs, units, lr, Some(&mut dx_got));
            for (what, got, want) in [("dx", &dx_got, &dx_want), ("W", &w_got, &w_want)] {
                for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{what}[{i}] of ({n}, {inputs}, {units}): {g} against {e}"
                    );
                }
            }
            let mut w_alone = w.clone();
            backward_sgd(&x, n, &mut w_alone, &dy, inputs, units, lr, None);
            assert_eq!(w_alone, w_got, "the step does not depend on dx");
        }
    }
}
