//! A dense, row-major f32 tensor: the only value type the trainer and the wire format know.

use serde::{Deserialize, Serialize};

/// A row-major f32 tensor with an explicit shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// The number of elements a shape holds (1 for a scalar's empty shape).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A tensor from its shape and data; `None` when the two disagree in size.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Self> {
        (numel(&shape) == data.len()).then_some(Self { shape, data })
    }

    /// A tensor of the given shape filled with `value`.
    pub fn full(shape: Vec<usize>, value: f32) -> Self {
        let n = numel(&shape);
        Self {
            shape,
            data: vec![value; n],
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        Self::full(shape, 0.0)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl Tensor {
    /// The backing vector, for kernels that swap buffers without reallocating.
    pub(crate) fn data_mut_vec(&mut self) -> &mut Vec<f32> {
        &mut self.data
    }
}
