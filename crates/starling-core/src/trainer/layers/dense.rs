//! The fully connected layer `y = x W + b` (`W`: `[inputs, units]`, as in TensorFlow's
//! `matmul(x, W) + b`).

use super::gemm::{sgemm, Mat};

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
    db.fill(0.0);
    for row in dy.chunks_exact(units) {
        for (acc, v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
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
