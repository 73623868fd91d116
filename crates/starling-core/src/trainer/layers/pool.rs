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
