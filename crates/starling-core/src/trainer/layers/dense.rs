//! The fully connected layer `y = x W + b` (`W`: `[inputs, units]`, as in TensorFlow's
//! `matmul(x, W) + b`): on the GEMM kernel, or for training batches of up to
//! [`SMALL_BATCH`] rows on the small-batch kernel of [`super::kernels`]. With plain SGD the
//! backward pass also steps the weight ([`backward_sgd`]).

use super::gemm::{sgemm, sgemm_strided, Mat};
// `LANE`: the floats of a row of `W` worked on at once by `SmallStep`, one vector register.
#[cfg(not(target_arch = "wasm32"))]
use super::kernels::{dense_forward_small, lane_sum, madd, run_vectorised, Vectorised, L as LANE};

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
///
/// `relu_input` says the input is a ReLU's output (perhaps pooled or flattened since), so
/// that its gradient is masked to zero wherever it is zero: for a small batch, each row `i`
/// of `W` then works only for the rows `b` of the batch with `x[b][i] != 0` (`dx[b][i]` is
/// set to zero for the others), and a row that meets only zeros is neither read nor
/// written. In the CNN's first dense layer 30-50% of the inputs are zero, more as it trains.
#[allow(clippy::too_many_arguments)]
pub fn backward_sgd(
    x: &[f32],
    n: usize,
    w: &mut [f32],
    dy: &[f32],
    inputs: usize,
    units: usize,
    learning_rate: f32,
    relu_input: bool,
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
    // Not in the browser's device app (size), as for the forward pass.
    #[cfg(not(target_arch = "wasm32"))]
    if n <= SMALL_BATCH
        && units >= SMALL_KERNEL_MIN_UNITS
        && inputs * units >= SMALL_STEP_MIN_WEIGHTS
    {
        return run_vectorised(SmallStep {
            x,
            n,
            w,
            dy,
            inputs,
            units,
            learning_rate,
            relu_input,
            dx,
        });
    }
    let _ = relu_input;
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

/// The fewest weights for which a small batch's step goes row by row ([`SmallStep`]): where
/// the weight is beyond half a core's L2 cache (1 MB; the CNN's first dense layer is 6.4 MB)
/// moving it is the cost. A weight that fits (the 2NN's 0.6 MB) is faster on the GEMMs:
/// row by row, the 2NN trained at 0.65x. The small-batch forward pass fetches a weight this
/// large a slab ahead.
pub(crate) const SMALL_STEP_MIN_WEIGHTS: usize = 1 << 18;

/// [`backward_sgd`] for a small batch, row by row of `W`: each row is read from memory once,
/// and while it is in L1 gives its column of `dx` (dot products with the rows of `dy`, which
/// stay in L1) and takes its update `-lr Σ_n x[n][i] dy[n]`. A GEMM would first copy all of
/// `W` into its packed layout (the CNN's first dense layer is 6.4 MB) for `dx`, then read
/// and write it again for the step.
#[cfg(not(target_arch = "wasm32"))]
struct SmallStep<'a> {
    x: &'a [f32],
    n: usize,
    w: &'a mut [f32],
    dy: &'a [f32],
    inputs: usize,
    units: usize,
    learning_rate: f32,
    /// Leave out the zero inputs ([`backward_sgd`]).
    relu_input: bool,
    dx: Option<&'a mut [f32]>,
}

#[cfg(not(target_arch = "wasm32"))]
impl Vectorised for SmallStep<'_> {
    #[inline(always)]
    fn run<const FMA: bool, const WIDE: bool>(self) {
        let Self {
            x,
            n,
            w,
            dy,
            inputs,
            units,
            learning_rate,
            relu_input,
            mut dx,
        } = self;
        let dys: [&[f32]; SMALL_BATCH] = std::array::from_fn(|b| {
            if b < n {
                &dy[b * units..][..units]
            } else {
                &[]
            }
        });
        for (i, row) in w.chunks_exact_mut(units).enumerate() {
            // The rows of the batch this row of `W` works for: all, or after a ReLU those
            // whose input is not zero (the others' `dx` is zero, and their update too).
            let mut live = [0usize; SMALL_BATCH];
            let mut m = 0;
            for b in 0..n {
                if !relu_input || x[b * inputs + i] != 0.0 {
                    live[m] = b;
                    m += 1;
                } else if let Some(dx) = dx.as_deref_mut() {
                    dx[b * inputs + i] = 0.0;
                }
            }
            let scale = |b: usize| -learning_rate * x[b * inputs + i];
            if WIDE {
                // The live rows in one pass over the row of `W`: `dy`'s rows are loaded
                // once, for both `dx` and the update.
                macro_rules! by_count {
                    ($($g:literal)*) => {
                        match m {
                            $($g => {
                                let idx: [usize; $g] = std::array::from_fn(|g| live[g]);
                                let dots = row_step::<FMA, $g>(
                                    row,
                                    idx.map(|b| dys[b]),
                                    idx.map(scale),
                                    units,
                                );
                                if let Some(dx) = dx.as_deref_mut() {
                                    for (&b, v) in idx.iter().zip(dots) {
                                        dx[b * inputs + i] = v;
                                    }
                                }
                            })*
                            _ => {}
                        }
                    };
                }
                by_count!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
                continue;
            }
            let live = &live[..m];
            // `dx[b][i] = dy[b] · W[i]`, from the row as it was, in groups of live rows.
            if let Some(dx) = dx.as_deref_mut() {
                for idx in groups(live) {
                    let mut put = |dots: &[f32]| {
                        idx.iter()
                            .zip(dots)
                            .for_each(|(&b, &v)| dx[b * inputs + i] = v);
                    };
                    match *idx {
                        [_, _, _, _, _, _, _, _] => {
                            put(&small_dots::<FMA, 8>(row, gather(&dys, idx), units))
                        }
                        [_, _] => put(&small_dots::<FMA, 2>(row, gather(&dys, idx), units)),
                        _ => put(&small_dots::<FMA, 1>(row, gather(&dys, idx), units)),
                    }
                }
            }
            // `W[i] -= lr Σ_b x[b][i] dy[b]`.
            for idx in groups(live) {
                let s = |b: &usize| scale(*b);
                match *idx {
                    [_, _, _, _, _, _, _, _] => {
                        small_update::<FMA, 8>(row, gather(&dys, idx), gather_with(idx, s), units)
                    }
                    [_, _] => {
                        small_update::<FMA, 2>(row, gather(&dys, idx), gather_with(idx, s), units)
                    }
                    _ => small_update::<FMA, 1>(row, gather(&dys, idx), gather_with(idx, s), units),
                }
            }
        }
    }
}

/// `live` in consecutive groups of 8 (as many as there are), then of 2, then 1.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn groups(live: &[usize]) -> impl Iterator<Item = &[usize]> {
    let mut rest = live;
    std::iter::from_fn(move || {
        let take = match rest.len() {
            0 => return None,
            l if l >= 8 => 8,
            l if l >= 2 => 2,
            _ => 1,
        };
        let (group, tail) = rest.split_at(take);
        rest = tail;
        Some(group)
    })
}

/// The rows `dys[b]` for the `G` first `b` of `idx`.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn gather<'a, const G: usize>(dys: &[&'a [f32]; SMALL_BATCH], idx: &[usize]) -> [&'a [f32]; G] {
    std::array::from_fn(|g| dys[idx[g]])
}

/// `f(b)` for the `G` first `b` of `idx`.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn gather_with<const G: usize>(idx: &[usize], f: impl Fn(&usize) -> f32) -> [f32; G] {
    std::array::from_fn(|g| f(&idx[g]))
}

/// One row of `W` and `G` rows of the batch (with 32 vector registers): returns the
/// products `dy[g] · row` for `dx` (with the old weights) and adds `Σ_g s[g] dy[g]` to the
/// row, each lane of the row meeting each `dy[g]` once for both. Row by row in groups (the
/// other path) the rows of `dy` are read twice, once for `dx` and once for the update, and
/// the loads, not the multiply-adds, set the pace.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn row_step<const FMA: bool, const G: usize>(
    row: &mut [f32],
    dys: [&[f32]; G],
    s: [f32; G],
    units: usize,
) -> [f32; G] {
    let full = units / LANE * LANE;
    // Nothing to add where every input is zero (inputs after a ReLU often are).
    let update = s.iter().any(|&v| v != 0.0);
    let mut acc = [[0.0f32; LANE]; G];
    for u in (0..full).step_by(LANE) {
        let old = lane_at(row, u);
        let mut new = old;
        for (g, a) in acc.iter_mut().enumerate() {
            let d = lane_at(dys[g], u);
            for l in 0..LANE {
                a[l] = madd::<FMA>(d[l], old[l], a[l]);
                new[l] = madd::<FMA>(s[g], d[l], new[l]);
            }
        }
        if update {
            row[u..u + LANE].copy_from_slice(&new);
        }
    }
    let dots = std::array::from_fn(|g| {
        let mut sum = lane_sum(&acc[g]);
        for u in full..units {
            sum = madd::<FMA>(dys[g][u], row[u], sum);
        }
        sum
    });
    if update {
        for u in full..units {
            for (&sg, d) in s.iter().zip(&dys) {
                row[u] = madd::<FMA>(sg, d[u], row[u]);
            }
        }
    }
    dots
}

/// The lane of `v` from `u`, as a value.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn lane_at(v: &[f32], u: usize) -> [f32; LANE] {
    let mut lane = [0.0f32; LANE];
    lane.copy_from_slice(&v[u..u + LANE]);
    lane
}

/// `row · dys[g]` for each of the `G` rows `dys`.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn small_dots<const FMA: bool, const G: usize>(
    row: &[f32],
    dys: [&[f32]; G],
    units: usize,
) -> [f32; G] {
    let mut acc = [[0.0f32; LANE]; G];
    let full = units / LANE * LANE;
    for u in (0..full).step_by(LANE) {
        let wv = lane_at(row, u);
        for (a, d) in acc.iter_mut().zip(&dys) {
            let d = lane_at(d, u);
            for l in 0..LANE {
                a[l] = madd::<FMA>(d[l], wv[l], a[l]);
            }
        }
    }
    std::array::from_fn(|g| {
        let mut sum = lane_sum(&acc[g]);
        for u in full..units {
            sum = madd::<FMA>(dys[g][u], row[u], sum);
        }
        sum
    })
}

/// `row += Σ_g s[g] dys[g]`; nothing to do where every `s` is zero (inputs after a ReLU
/// often are).
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn small_update<const FMA: bool, const G: usize>(
    row: &mut [f32],
    dys: [&[f32]; G],
    s: [f32; G],
    units: usize,
) {
    if s.iter().all(|&v| v == 0.0) {
        return;
    }
    let full = units / LANE * LANE;
    for u in (0..full).step_by(LANE) {
        let mut acc = lane_at(row, u);
        for (&sg, d) in s.iter().zip(&dys) {
            let d = lane_at(d, u);
            for l in 0..LANE {
                acc[l] = madd::<FMA>(sg, d[l], acc[l]);
            }
        }
        row[u..u + LANE].copy_from_slice(&acc);
    }
    for u in full..units {
        for (&sg, d) in s.iter().zip(&dys) {
            row[u] = madd::<FMA>(sg, d[u], row[u]);
        }
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
    use super::super::test_values as values;
    use super::*;

    /// The fused step equals the backward pass followed by `W -= lr dW`, over shapes with one
    /// block, several, and a last partial one.
    #[test]
    fn the_fused_step_equals_the_gradient_then_the_step() {
        let lr = 0.05;
        for (n, inputs, units) in [
            (1, 3, 2),
            (10, 37, 33),
            (10, 600, 40),
            (17, 513, 9),
            // Past SMALL_STEP_MIN_WEIGHTS: the row-by-row step, at every group size and
            // with units that end in a partial lane.
            (16, 16_400, 16),
            (3, 520, 512),
            (10, 513, 520),
        ]
        .into_iter()
        // With AVX-512, every batch up to SMALL_BATCH has its own whole-batch step.
        .chain((1..=SMALL_BATCH).map(|n| (n, 513, 520)))
        {
            // Whole columns of zeros, as after a ReLU, for the step to skip, and zeros here
            // and there, for it to leave out of a row's work.
            let mut x = values(n * inputs, 1);
            for (k, v) in x.iter_mut().enumerate() {
                if (k % inputs) % 4 == 0 || k % 7 == 3 {
                    *v = 0.0;
                }
            }
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
            // With `relu_input`, the row-by-row step gives a zero input a zero gradient (the
            // ReLU would zero it); the step is the same.
            let row_by_row = n <= SMALL_BATCH
                && units >= SMALL_KERNEL_MIN_UNITS
                && inputs * units >= SMALL_STEP_MIN_WEIGHTS;
            let dx_masked: Vec<f32> = (0..n * inputs)
                .map(|k| {
                    if row_by_row && x[k] == 0.0 {
                        0.0
                    } else {
                        dx_want[k]
                    }
                })
                .collect();
            let mut w_plain = Vec::new();
            // `backward_sgd`, and for the row-by-row shapes each of its paths, whichever this
            // CPU takes: with 32 vector registers (AVX-512) and without.
            let paths = if row_by_row { 0..3 } else { 0..1 };
            for (path, (relu_input, dx_want)) in
                paths.flat_map(|p| [(p, (false, &dx_want)), (p, (true, &dx_masked))])
            {
                let run = |w: &mut [f32], dx: Option<&mut [f32]>| {
                    let step = SmallStep {
                        x: &x,
                        n,
                        w,
                        dy: &dy,
                        inputs,
                        units,
                        learning_rate: lr,
                        relu_input,
                        dx,
                    };
                    match path {
                        0 => {
                            backward_sgd(&x, n, step.w, &dy, inputs, units, lr, relu_input, step.dx)
                        }
                        1 => step.run::<false, true>(),
                        _ => step.run::<true, false>(),
                    }
                };
                let mut w_got = w.clone();
                let mut dx_got = vec![f32::NAN; n * inputs];
                run(&mut w_got, Some(&mut dx_got));
                for (what, got, want) in [("dx", &dx_got, dx_want), ("W", &w_got, &w_want)] {
                    for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{what}[{i}] of ({n}, {inputs}, {units}), path {path}, relu input \
                             {relu_input}: {g} against {e}"
                        );
                    }
                }
                let mut w_alone = w.clone();
                run(&mut w_alone, None);
                assert!(
                    w_alone == w_got,
                    "path {path}: the step does not depend on dx"
                );
                // Nor, exactly, on relu_input (a zero input adds exactly nothing).
                if !relu_input {
                    w_plain = w_got;
                } else {
                    assert!(
                        w_plain == w_got,
                        "path {path}: the step depends on relu_input"
                    );
                }
            }
        }
    }
}
