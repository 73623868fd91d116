//! Max pooling over square windows of each channel of NCHW batches. Only windows wholly
//! inside the input count (TensorFlow's `valid`); the forward pass records which input won
//! each window, and the backward pass routes the gradient there.

/// The output size along one dimension, or `None` when the window is larger than the input.
/// `stride` must be at least 1.
pub fn output_size(input: usize, size: usize, stride: usize) -> Option<usize> {
    (input >= size).then(|| (input - size) / stride + 1)
}

/// The geometry of a max-pooling layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    /// Channels (in and out).
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Side of the square window.
    pub size: usize,
    /// Step between windows.
    pub stride: usize,
    /// Output height.
    pub out_height: usize,
    /// Output width.
    pub out_width: usize,
}

impl MaxPool {
    /// The geometry for an input of shape `[channels, height, width]`; `None` when a
    /// dimension, the size or the stride is 0, or the window does not fit.
    pub fn new([channels, height, width]: [usize; 3], size: usize, stride: usize) -> Option<Self> {
        if channels == 0 || size == 0 || stride == 0 {
            return None;
        }
        let out_height = output_size(height, size, stride)?;
        let out_width = output_size(width, size, stride)?;
        Some(Self {
            channels,
            height,
            width,
            size,
            stride,
            out_height,
            out_width,
        })
    }

    /// Values per input example.
    pub fn input_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Values per output example.
    pub fn output_len(&self) -> usize {
        self.channels * self.out_height * self.out_width
    }

    /// Forward pass over `n` examples. With `argmax`, records for every output the index
    /// (within its example) of the input that won, for [`MaxPool::backward`].
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32], mut argmax: Option<&mut Vec<u32>>) {
        let (il, ol) = (self.input_len(), self.output_len());
        assert_eq!(x.len(), n * il, "max_pool input length");
        assert_eq!(y.len(), n * ol, "max_pool output length");
        assert!(u32::try_from(il).is_ok(), "max_pool example too large");
        if let Some(a) = argmax.as_deref_mut() {
            a.resize(n * ol, 0);
        }
        // Not in the browser's device app, which stays under 100 KB.
        #[cfg(not(target_arch = "wasm32"))]
        if self.size == 2 && self.stride == 2 {
            return self.forward_2x2(x, y, argmax);
        }
        let (h, w, s, k) = (self.height, self.width, self.stride, self.size);
        let mut out = 0;
        for xn in x.chunks_exact(il) {
            for c in 0..self.channels {
                let base = c * h * w;
                for oh in 0..self.out_height {
                    for ow in 0..self.out_width {
                        let first = base + oh * s * w + ow * s;
                        let (mut best, mut at) = (xn[first], first);
                        for i in 0..k {
                            let row = first + i * w;
                            for (j, &v) in xn[row..row + k].iter().enumerate() {
                                if v > best {
                                    best = v;
                                    at = row + j;
                                }
                            }
                        }
                        y[out] = best;
                        if let Some(a) = argmax.as_deref_mut() {
                            a[out] = at as u32;
                        }
                        out += 1;
                    }
                }
            }
        }
    }

    /// [`MaxPool::forward`] for the common 2x2 windows with stride 2 (the FedAvg CNN's): two
    /// input rows at a time, the same winners (the first largest in reading order).
    #[cfg(not(target_arch = "wasm32"))]
    fn forward_2x2(&self, x: &[f32], y: &mut [f32], mut argmax: Option<&mut Vec<u32>>) {
        let (w, ow) = (self.width, self.out_width);
        let plane = self.height * w;
        let il = self.input_len();
        let mut out = 0;
        for xn in x.chunks_exact(il) {
            for c in 0..self.channels {
                for oh in 0..self.out_height {
                    let top = c * plane + 2 * oh * w;
                    let (r0, r1) = (&xn[top..top + 2 * ow], &xn[top + w..top + w + 2 * ow]);
                    let ys = &mut y[out..out + ow];
                    match argmax.as_deref_mut() {
                        Some(a) => {
                            let at = &mut a[out..out + ow];
                            for (o, ((p0, p1), (yv, av))) in r0
                                .chunks_exact(2)
                                .zip(r1.chunks_exact(2))
                                .zip(ys.iter_mut().zip(at.iter_mut()))
                                .enumerate()
                            {
                                let base = top + 2 * o;
                                let (mut best, mut win) = (p0[0], base);
                                if p0[1] > best {
                                    (best, win) = (p0[1], base + 1);
                                }
                                if p1[0] > best {
                                    (best, win) = (p1[0], base + w);
                                }
                                if p1[1] > best {
                                    (best, win) = (p1[1], base + w + 1);
                                }
                                *yv = best;
                                *av = win as u32;
                            }
                        }
                        None => {
                            for ((p0, p1), yv) in r0
                                .chunks_exact(2)
                                .zip(r1.chunks_exact(2))
                                .zip(ys.iter_mut())
                            {
                                let mut best = p0[0];
                                for v in [p0[1], p1[0], p1[1]] {
                                    if v > best {
                                        best = v;
                                    }
                                }
                                *yv = best;
                            }
                        }
                    }
                    out += ow;
                }
            }
        }
    }

    /// Backward pass: writes `dx` (zero except at each window's winner, which receives the
    /// window's gradient; overlapping windows add up).
    pub fn backward(&self, dy: &[f32], n: usize, argmax: &[u32], dx: &mut [f32]) {
        let (il, ol) = (self.input_len(), self.output_len());
        assert_eq!(dy.len(), n * ol, "max_pool gradient length");
        assert_eq!(argmax.len(), n * ol, "max_pool argmax length");
        assert_eq!(dx.len(), n * il, "max_pool input gradient length");
        dx.fill(0.0);
        for ((dxn, dy_n), an) in dx
            .chunks_exact_mut(il)
            .zip(dy.chunks_exact(ol))
            .zip(argmax.chunks_exact(ol))
        {
            for (&g, &a) in dy_n.iter().zip(an) {
                dxn[a as usize] += g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2x2 path against the windows read one by one: the same maxima and the same
    /// winners (the first largest in reading order), on odd sizes (the last row and column
    /// fall outside every window) and values with many ties.
    #[test]
    fn the_2x2_path_picks_the_same_winners_as_reading_each_window() {
        for [c, h, w] in [[1, 2, 2], [3, 7, 5], [2, 28, 28]] {
            let pool = MaxPool::new([c, h, w], 2, 2).unwrap();
            let n = 3;
            let x: Vec<f32> = (0..n * pool.input_len())
                .map(|i| ((i * 7919) % 5) as f32 - 2.0)
                .collect();
            let mut y = vec![0.0; n * pool.output_len()];
            let mut argmax = Vec::new();
            pool.forward(&x, n, &mut y, Some(&mut argmax));
            let mut y_plain = vec![0.0; y.len()];
            pool.forward(&x, n, &mut y_plain, None);
            assert_eq!(y_plain, y);
            let mut out = 0;
            for xn in x.chunks_exact(pool.input_len()) {
                for ch in 0..c {
                    for oh in 0..pool.out_height {
                        for ow in 0..pool.out_width {
                            let window = [(0, 0), (0, 1), (1, 0), (1, 1)]
                                .map(|(i, j)| ch * h * w + (2 * oh + i) * w + 2 * ow + j);
                            let mut win = window[0];
                            for &at in &window[1..] {
                                if xn[at] > xn[win] {
                                    win = at;
                                }
                            }
                            assert_eq!(y[out], xn[win], "[{c}, {h}, {w}] output {out}");
                            assert_eq!(argmax[out] as usize, win, "[{c}, {h}, {w}] output {out}");
                            out += 1;
                        }
                    }
                }
            }
        }
    }
}
