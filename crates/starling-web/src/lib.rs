//! Starling's browser device app: the core's model loading, local training and update
//! encoding compiled to WebAssembly, and the page (in `www/`) that runs them on a phone or
//! desktop browser. The person's data is parsed and trained on inside the page; only the
//! update (a parameter difference, an example count, and the local loss and accuracy) is
//! uploaded.
//!
//! - [`device`]: the device's steps in plain Rust over `starling-core` (tested natively).
//! - [`bindings`]: their JavaScript face through `wasm-bindgen`.
//!
//! `scripts/build-web.sh` builds the module for `wasm32-unknown-unknown`, generates the JS
//! glue into `dist/`; `starling serve` embeds `www/` and `dist/` and serves them at `/` and
//! `/app/`.

pub mod bindings;
pub mod device;
