//! Losses: each returns the mean loss of a batch and writes its gradient with respect to the
//! model's output.

/// Mean squared error over all `n x width` outputs: `mean((y - t)^2)`, gradient
/// `2 (y - t) / (n width)`. This is TensorFlow's `reduce_mean(square(output - target))`.
pub fn mse(output: &[f32], target: &[f32], grad: &mut [f32]) -> f32 {
    let count = output.len() as f32;
    let mut sum = 0.0f32;
    for ((g, &y), &t) in grad.iter_mut().zip(output).zip(target) {
        let d = y - t;
        sum += d * d;
        *g = 2.0 * d / count;
    }
    sum / count
}

/// Softmax cross-entropy averaged over `n` rows of `classes` logits; `labels` holds one class
/// index per row (as f32). Gradient `(softmax - onehot) / n`.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[f32],
    classes: usize,
    grad: &mut [f32],
) -> f32 {
    let n = labels.len();
    let mut total = 0.0f64;
    for ((row, g), &label) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let label = label as usize;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut denom = 0.0f32;
        for (gi, &z) in g.iter_mut().zip(row) {
            *gi = (z - max).exp();
            denom += *gi;
        }
        for gi in g.iter_mut() {
            *gi /= denom;
        }
        total += f64::from(denom.ln() - (row[label] - max));
        g[label] -= 1.0;
        for gi in g.iter_mut() {
            *gi /= n as f32;
        }
    }
    (total / n as f64) as f32
}

/// The index of the largest logit of each row.
pub fn argmax_rows(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0
    })
}
