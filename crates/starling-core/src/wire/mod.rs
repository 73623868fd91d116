//! What crosses the wire between devices and the server, and how it is checked.
//!
//! - [`protocol`]: the HTTP API's typed requests and answers, headers, and every
//!   [`protocol::ErrorCode`] with its status.
//! - [`params`]: named f32 tensors and their safetensors codec.
//! - [`update`]: the update format and its validation into a [`update::CheckedUpdate`]
//!   (DESIGN.md invariant 3).
//! - [`checkpoint`]: the served form of a model version (spec and version in the metadata).
//! - [`json`], [`decode`] and `header`: a small JSON reader, the model spec and plan read by
//!   hand over it, and the safetensors codec over it: the browser build uses them instead
//!   of `serde_json`, serde's derives and the `safetensors` crate, to stay small.

pub mod checkpoint;
pub mod decode;
mod header;
pub mod json;
pub mod params;
pub mod protocol;
pub mod update;
