//! The core's integration tests, one binary: gradients against finite differences, the training loop against a hand-written reference, FedProx's proximal term and partial work (training stopped between steps), model specs, data-set loaders and partitions on the committed fixtures, the paper models learning real digits, the Rényi-DP accountant against dp-accounting's numbers, and fuzzing of update decoding.

mod datasets;
mod fedprox;
mod fuzz_update;
mod gradients;
mod lstm;
mod mnist;
mod models;
mod partial_work;
mod partition;
mod privacy;
mod secagg;
mod training;
