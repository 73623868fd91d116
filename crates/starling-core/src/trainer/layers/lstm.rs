//! The long short-term memory layer (Hochreiter and Schmidhuber 1997, with the forget gate of
//! Gers et al. 2000), as the FedAvg paper's character model stacks it, and the embedding
//! that feeds it; backward passes by backpropagation through time.
//!
//! Sequences are stored time-major: step `t` of a batch of `n` is the `n x width` block at
//! `t * n * width`, so the whole sequence is one `steps n x width` matrix. Only the recurrent
//! products must go step by step (`h_(t-1) U` forward, `dz_t Uᵀ` backward), on the
//! small-batch kernel that reads `U` where it lies; the input projection `x W`, and the
//! backward pass's `dW`, `dU` and `dx`, are each one GEMM over all steps at once (a GEMM per
//! step would repack `W` or `U` at every step).
//!
//! With the input `x_t` (`n x inputs`) and the previous hidden state `h_(t-1)` (`n x units`),
//! the gates are `z = x_t W + h_(t-1) U + b`, with `W` of shape `[inputs, 4 units]`, `U` of
//! `[units, 4 units]` and `b` of `[4 units]`, in the order input, forget, cell, output (as
//! PyTorch and Keras order them):
//!
//! ```text
//! i = σ(z_i)   f = σ(z_f)   g = tanh(z_g)   o = σ(z_o)
//! c_t = f ⊙ c_(t-1) + i ⊙ g        h_t = o ⊙ tanh(c_t)
//! ```
//!
//! The state starts at zero for every sequence.

use super::dense::SMALL_BATCH;
use super::gemm::{sgemm, Mat};
use super::kernels::dense_forward_small;

/// `y += x m` for a step's batch (`x`: `n x k`, `m`: `k x cols`): the small-batch kernel for
/// batches it suits, else the GEMM.
fn step_product(x: &[f32], n: usize, m: &[f32], k: usize, cols: usize, y: &mut [f32]) {
    if n <= SMALL_BATCH {
        dense_forward_small(x, n, m, k, cols, y);
    } else {
        sgemm(1.0, Mat::new(x, n, k), Mat::new(m, k, cols), 1.0, y);
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Shapes of one LSTM layer over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lstm {
    /// Width of each step's input.
    pub inputs: usize,
    /// Hidden units.
    pub units: usize,
}

/// What the forward pass keeps for the backward pass: every step's gates (after their
/// activations), cell state and hidden state, time-major.
#[derive(Debug, Default, Clone)]
pub struct LstmCache {
    /// `steps x n x 4 units`: i, f, g, o after σ / tanh.
    gates: Vec<f32>,
    /// `steps x n x units`: the cell states.
    cells: Vec<f32>,
    /// `steps x n x units`: the hidden states (the layer's output).
    hidden: Vec<f32>,
    /// Scratch of the backward pass, kept so that a warm training step allocates nothing:
    /// the gradients flowing back from step t + 1 into h_t and c_t, every step's gates'
    /// gradient (`steps x n x 4 units`), and `Uᵀ`.
    dh_next: Vec<f32>,
    dc_next: Vec<f32>,
    dz: Vec<f32>,
    ut: Vec<f32>,
}

impl LstmCache {
    /// The hidden states, `steps x n x units`: the layer's output.
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }
}

impl Lstm {
    /// Parameters: `W`, `U` and `b`.
    pub fn parameter_count(&self) -> usize {
        4 * self.units * (self.inputs + self.units + 1)
    }

    /// Forward pass over `steps` steps of a batch of `n`: `x` is `steps x n x inputs`
    /// (time-major); the hidden states land in `cache` (see [`LstmCache::hidden`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        steps: usize,
        w: &[f32],
        u: &[f32],
        b: &[f32],
        cache: &mut LstmCache,
    ) {
        let (d, h) = (self.inputs, self.units);
        assert_eq!(x.len(), steps * n * d, "LSTM input length");
        let g4 = 4 * h;
        cache.gates.clear();
        cache.gates.resize(steps * n * g4, 0.0);
        cache.cells.clear();
        cache.cells.resize(steps * n * h, 0.0);
        cache.hidden.clear();
        cache.hidden.resize(steps * n * h, 0.0);
        // Every step's input projection at once: z = b + x W over all steps n rows.
        for row in cache.gates.chunks_exact_mut(g4) {
            row.copy_from_slice(b);
        }
        sgemm(
            1.0,
            Mat::new(x, steps * n, d),
            Mat::new(w, d, g4),
            1.0,
            &mut cache.gates,
        );
        for t in 0..steps {
            if t > 0 {
                let prev = &cache.hidden[(t - 1) * n * h..t * n * h];
                let z = &mut cache.gates[t * n * g4..(t + 1) * n * g4];
                step_product(prev, n, u, h, g4, z);
            }
            for r in 0..n {
                let gate = &mut cache.gates[(t * n + r) * g4..(t * n + r + 1) * g4];
                for k in 0..h {
                    gate[k] = sigmoid(gate[k]);
                    gate[h + k] = sigmoid(gate[h + k]);
                    gate[2 * h + k] = gate[2 * h + k].tanh();
                    gate[3 * h + k] = sigmoid(gate[3 * h + k]);
                }
                for k in 0..h {
                    let c_prev = if t > 0 {
                        cache.cells[((t - 1) * n + r) * h + k]
                    } else {
                        0.0
                    };
                    let c = gate[h + k] * c_prev + gate[k] * gate[2 * h + k];
                    cache.cells[(t * n + r) * h + k] = c;
                    cache.hidden[(t * n + r) * h + k] = gate[3 * h + k] * c.tanh();
                }
            }
        }
    }

    /// Backward pass: given `dh`, the loss's gradient with respect to the layer's output
    /// (every step's hidden state, `steps x n x units`, with `sequences`; else the last
    /// step's, `n x units`), writes `dw`, `du`, `db` (overwritten) and, when given a buffer,
    /// `dx` (`steps x n x inputs`). `cache` is the forward pass's; its scratch is reused.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        x: &[f32],
        n: usize,
        steps: usize,
        w: &[f32],
        u: &[f32],
        cache: &mut LstmCache,
        dh: &[f32],
        sequences: bool,
        dw: &mut [f32],
        du: &mut [f32],
        db: &mut [f32],
        dx: Option<&mut [f32]>,
    ) {
        let (d, h) = (self.inputs, self.units);
        let g4 = 4 * h;
        let from_above = if sequences { steps * n * h } else { n * h };
        assert_eq!(dh.len(), from_above, "LSTM output gradient length");
        if steps == 0 {
            for g in [dw, du, db] {
                g.fill(0.0);
            }
            if let Some(dx) = dx {
                dx.fill(0.0);
            }
            return;
        }
        let LstmCache {
            gates,
            cells,
            hidden,
            dh_next,
            dc_next,
            dz,
            ut,
        } = cache;
        for buf in [&mut *dh_next, &mut *dc_next] {
            buf.clear();
            buf.resize(n * h, 0.0);
        }
        dz.resize(steps * n * g4, 0.0);
        // Uᵀ, `4 units x units`, so that each step's dz_t Uᵀ reads rows where they lie.
        ut.resize(g4 * h, 0.0);
        for (k, row) in u.chunks_exact(g4).enumerate() {
            for (j, v) in row.iter().enumerate() {
                ut[j * h + k] = *v;
            }
        }
        for t in (0..steps).rev() {
            // The gradient from above at this step: every step's with `sequences`, else only
            // the last step's.
            let above = if sequences {
                Some(&dh[t * n * h..(t + 1) * n * h])
            } else {
                (t + 1 == steps).then_some(dh)
            };
            let dzt = &mut dz[t * n * g4..(t + 1) * n * g4];
            for r in 0..n {
                let gate = &gates[(t * n + r) * g4..(t * n + r + 1) * g4];
                let dzr = &mut dzt[r * g4..(r + 1) * g4];
                for k in 0..h {
                    let at = (t * n + r) * h + k;
                    let (i, f, g, o) = (gate[k], gate[h + k], gate[2 * h + k], gate[3 * h + k]);
                    let c = cells[at];
                    let c_prev = if t > 0 { cells[at - n * h] } else { 0.0 };
                    let tc = c.tanh();
                    let dht = above.map_or(0.0, |a| a[r * h + k]) + dh_next[r * h + k];
                    let dc = dht * o * (1.0 - tc * tc) + dc_next[r * h + k];
                    dzr[k] = dc * g * i * (1.0 - i);
                    dzr[h + k] = dc * c_prev * f * (1.0 - f);
                    dzr[2 * h + k] = dc * i * (1.0 - g * g);
                    dzr[3 * h + k] = dht * tc * o * (1.0 - o);
                    dc_next[r * h + k] = dc * f;
                }
            }
            if t > 0 {
                // dh_(t-1) = dz_t Uᵀ
                dh_next.fill(0.0);
                step_product(dzt, n, ut, g4, h, dh_next);
            }
        }
        // The parameters' gradients and dx, each one GEMM over all steps.
        sgemm(
            1.0,
            Mat::new(x, steps * n, d).t(),
            Mat::new(dz, steps * n, g4),
            0.0,
            dw,
        );
        db.fill(0.0);
        for row in dz.chunks_exact(g4) {
            for (acc, v) in db.iter_mut().zip(row) {
                *acc += v;
            }
        }
        // dU = Σ_(t ≥ 1) h_(t-1)ᵀ dz_t: the hidden states of steps 0..steps-1 against the
        // gates' gradients of steps 1..steps.
        let later = (steps - 1) * n;
        sgemm(
            1.0,
            Mat::new(&hidden[..later * h], later, h).t(),
            Mat::new(&dz[n * g4..], later, g4),
            0.0,
            du,
        );
        if let Some(dx) = dx {
            sgemm(
                1.0,
                Mat::new(dz, steps * n, g4),
                Mat::new(w, d, g4).t(),
                0.0,
                dx,
            );
        }
    }
}

/// An embedding: token `k` becomes row `k` of the table `E` (`[vocab, width]`). Tokens come
/// as `n x steps` indices (each example's sequence, row-major, stored as f32 as every
/// feature is); the output is time-major, `steps x n x width`, as [`Lstm`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Embedding {
    /// Number of tokens.
    pub vocab: usize,
    /// Values per token.
    pub width: usize,
}

impl Embedding {
    /// The token at `v`, clamped into the vocabulary (the data check refuses indices outside
    /// it before training; this keeps the lookup in bounds whatever comes).
    fn token(&self, v: f32) -> usize {
        (v.max(0.0) as usize).min(self.vocab - 1)
    }

    /// Forward pass: `tokens` is `n x steps`; `y` is resized to `steps x n x width`.
    pub fn forward(&self, tokens: &[f32], n: usize, steps: usize, e: &[f32], y: &mut Vec<f32>) {
        assert_eq!(tokens.len(), n * steps, "embedding input length");
        let w = self.width;
        y.clear();
        y.resize(steps * n * w, 0.0);
        for t in 0..steps {
            for r in 0..n {
                let k = self.token(tokens[r * steps + t]);
                y[(t * n + r) * w..(t * n + r + 1) * w].copy_from_slice(&e[k * w..(k + 1) * w]);
            }
        }
    }

    /// Backward pass: `dy` is `steps x n x width`; `de` (the table's gradient) is
    /// overwritten.
    pub fn backward(&self, tokens: &[f32], n: usize, steps: usize, dy: &[f32], de: &mut [f32]) {
        let w = self.width;
        de.fill(0.0);
        for t in 0..steps {
            for r in 0..n {
                let k = self.token(tokens[r * steps + t]);
                for (acc, v) in de[k * w..(k + 1) * w]
                    .iter_mut()
                    .zip(&dy[(t * n + r) * w..(t * n + r + 1) * w])
                {
                    *acc += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut impl Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// A scalar loss of the outputs: a fixed random projection, so every output matters.
    fn loss(hidden: &[f32], proj: &[f32]) -> f64 {
        hidden.iter().zip(proj).map(|(a, b)| f64::from(a * b)).sum()
    }

    /// Every gradient of the LSTM (W, U, b and the input) against central finite
    /// differences of the loss, over several steps and a batch of three.
    #[test]
    fn lstm_gradients_match_finite_differences() {
        // A batch the small-batch kernel takes, one it leaves to the GEMM, and one step.
        for (n, steps) in [(3, 5), (17, 3), (2, 1)] {
            lstm_gradients_for(n, steps);
        }
    }

    fn lstm_gradients_for(n: usize, steps: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let layer = Lstm {
            inputs: 3,
            units: 4,
        };
        let g4 = 4 * layer.units;
        let x = random(&mut rng, steps * n * layer.inputs, 1.0);
        let w = random(&mut rng, layer.inputs * g4, 0.6);
        let u = random(&mut rng, layer.units * g4, 0.6);
        let b = random(&mut rng, g4, 0.3);
        let proj = random(&mut rng, steps * n * layer.units, 1.0);
        assert_eq!(layer.parameter_count(), w.len() + u.len() + b.len());

        let run = |x: &[f32], w: &[f32], u: &[f32], b: &[f32]| {
            let mut cache = LstmCache::default();
            layer.forward(x, n, steps, w, u, b, &mut cache);
            loss(cache.hidden(), &proj)
        };
        let mut cache = LstmCache::default();
        layer.forward(&x, n, steps, &w, &u, &b, &mut cache);
        let (mut dw, mut du, mut db) = (vec![0.0; w.len()], vec![0.0; u.len()], vec![0.0; g4]);
        let mut dx = vec![0.0; x.len()];
        layer.backward(
            &x,
            n,
            steps,
            &w,
            &u,
            &mut cache,
            &proj,
            true,
            &mut dw,
            &mut du,
            &mut db,
            Some(&mut dx),
        );

        let eps = 1e-2f32;
        let check = |name: &str, analytic: &[f32], numeric: &dyn Fn(usize) -> f64| {
            for (i, &a) in analytic.iter().enumerate() {
                let num = numeric(i);
                let err = (f64::from(a) - num).abs() / (1.0 + num.abs());
                assert!(
                    err < 2e-3,
                    "{name}[{i}] (n {n}, {steps} steps): analytic {a}, numeric {num}"
                );
            }
        };
        let bump = |v: &[f32], i: usize, by: f32| {
            let mut v = v.to_vec();
            v[i] += by;
            v
        };
        check("W", &dw, &|i| {
            (run(&x, &bump(&w, i, eps), &u, &b) - run(&x, &bump(&w, i, -eps), &u, &b))
                / f64::from(2.0 * eps)
        });
        check("U", &du, &|i| {
            (run(&x, &w, &bump(&u, i, eps), &b) - run(&x, &w, &bump(&u, i, -eps), &b))
                / f64::from(2.0 * eps)
        });
        check("b", &db, &|i| {
            (run(&x, &w, &u, &bump(&b, i, eps)) - run(&x, &w, &u, &bump(&b, i, -eps)))
                / f64::from(2.0 * eps)
        });
        check("x", &dx, &|i| {
            (run(&bump(&x, i, eps), &w, &u, &b) - run(&bump(&x, i, -eps), &w, &u, &b))
                / f64::from(2.0 * eps)
        });
    }

    /// The forward pass against the equations written out for one unit and two steps.
    #[test]
    fn lstm_forward_follows_the_equations() {
        let layer = Lstm {
            inputs: 1,
            units: 1,
        };
        // Gates i, f, g, o: W = [0.5, -0.3, 0.8, 0.2], U = [0.1, 0.4, -0.6, 0.9], b = 0.1 each.
        let (w, u, b) = ([0.5, -0.3, 0.8, 0.2], [0.1, 0.4, -0.6, 0.9], [0.1; 4]);
        let x = [1.0, -2.0];
        let mut cache = LstmCache::default();
        layer.forward(&x, 1, 2, &w, &u, &b, &mut cache);
        let s = |v: f32| 1.0 / (1.0 + (-v).exp());
        let (mut h, mut c) = (0.0f32, 0.0f32);
        for (t, &xt) in x.iter().enumerate() {
            let z: Vec<f32> = (0..4).map(|k| xt * w[k] + h * u[k] + b[k]).collect();
            c = s(z[1]) * c + s(z[0]) * z[2].tanh();
            h = s(z[3]) * c.tanh();
            assert!((cache.hidden()[t] - h).abs() < 1e-6, "step {t}");
        }
    }

    #[test]
    fn embedding_looks_up_rows_and_scatters_gradients_back() {
        let emb = Embedding { vocab: 4, width: 2 };
        let e: Vec<f32> = (0..8).map(|v| v as f32).collect();
        // Two sequences of three tokens: [1, 3, 1] and [0, 2, 3].
        let tokens = [1.0, 3.0, 1.0, 0.0, 2.0, 3.0];
        let mut y = Vec::new();
        emb.forward(&tokens, 2, 3, &e, &mut y);
        // Time-major: step 0 is (token 1, token 0), step 1 (3, 2), step 2 (1, 3).
        assert_eq!(
            y,
            [2.0, 3.0, 0.0, 1.0, 6.0, 7.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]
        );
        let dy: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut de = vec![9.0; 8];
        emb.backward(&tokens, 2, 3, &dy, &mut de);
        // Token 1 at (t0, r0) and (t2, r0); token 3 at (t1, r0) and (t2, r1).
        assert_eq!(
            de,
            [
                2.0,
                3.0,
                0.0 + 8.0,
                1.0 + 9.0,
                6.0,
                7.0,
                4.0 + 10.0,
                5.0 + 11.0
            ]
        );
    }
}
