//! What crosses the wire between devices and the server, and how it is checked.
//!
//! - [`protocol`]: the HTTP API's typed requests and answers, headers, and every
//!   [`protocol::ErrorCode`] with its status.
//! - [`params`]: named f32 tensors and their safetensors codec.
//! - [`update`]: the update format and its validation into a [`update::CheckedUpdate`]
//!   (DESIGN.md invariant 3).
//! - [`checkpoint`]: the served form of a model version (spec and version in the metadata).

pub mod checkpoint;
pub mod params;
pub mod protocol;
pub mod update;
