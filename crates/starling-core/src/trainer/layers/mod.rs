//! Layers of the built-in trainer, each with a forward and a backward pass over a batch stored
//! row-major (`n` examples of `width` values; images as NCHW, channel by channel, row by row).
//!
//! - [`dense`]: fully connected `y = x W + b` on a GEMM kernel ([`gemm`]), or for small
//!   batches on [`kernels`], which also fuse the backward pass with a plain SGD step.
//! - [`conv`]: two-dimensional convolution as im2col + GEMM, or natively for 5x5 kernels
//!   [`winograd`]'s minimal filtering; natively its backward pass goes over only the nonzero
//!   output gradients ([`sparse_conv`]) where few are (under a max-pool and a ReLU).
//! - [`pool`]: max pooling.
//! - [`activation`]: element-wise ReLU, sigmoid and tanh.
//! - [`lstm`]: the LSTM layer and the embedding before it, time-major, with backpropagation
//!   through time (the FedAvg paper's character model; not yet a spec layer).
//!
//! Flattening needs no layer code: the row-major layout of `[C, H, W]` already is the flat
//! vector.

pub mod activation;
pub mod conv;
pub mod dense;
pub mod gemm;
pub mod kernels;
pub mod lstm;
pub mod pool;
#[cfg(not(target_arch = "wasm32"))]
pub mod sparse_conv;
#[cfg(not(target_arch = "wasm32"))]
pub mod winograd;

/// The first `len` values of the scratch buffer `buf`, which grows (with zeros) when it is
/// shorter and never shrinks. Layers of different sizes share one buffer: resizing it to
/// each layer's length would write zeros over everything a larger layer had used, at every
/// step. Callers overwrite what they read.
///
/// Natively the slice starts on a cache line (64 bytes, a vector of 16 floats): the
/// allocator aligns to 16 bytes only, and a vector load or store that straddles two lines
/// costs two. The kernels' buffers cut from it are whole vectors long, so they start on
/// lines too.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    // Room for the start to move to the next line.
    const ROOM: usize = 16;
    if buf.len() < len + ROOM {
        buf.resize(len + ROOM, 0.0);
    }
    let start = buf.as_ptr().align_offset(64).min(ROOM);
    &mut buf[start..start + len]
}

/// [`scratch`] in the browser, whose module has no wide vectors (and no bytes to spare).
#[cfg(target_arch = "wasm32")]
pub(crate) fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Test inputs: `len` values in `[-0.7, 0.7)` on a fixed pattern, different per `seed`.
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.7)
        .collect()
}
