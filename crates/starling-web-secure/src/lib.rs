//! The browser device app's secure aggregation (SecAgg+): the core's device side of a
//! secure round (`starling_core::secagg`) as a WebAssembly module of its own, which the page
//! imports only when a check-in answer says the round is secure (`secure` in the answer).
//! Kept out of `starling-web`'s module so that module stays under 100 KB gzip for every
//! other round; this one may use `serde_json` for the step bodies.
//!
//! The page does the HTTP (the same calls, order and retries as `starling device`); this
//! module turns each step's answer into the next step's message. Every secret comes from a
//! ChaCha20 generator seeded with 32 bytes of the page's `crypto.getRandomValues`, and lives
//! only in this module's memory for the round; the update goes out only masked.
//!
//! - [`device`]: the device's four steps in plain Rust over the core (tested natively
//!   against the core's `Aggregator`).
//! - [`bindings`]: their JavaScript face through `wasm-bindgen` (`SecureDevice`).
//!
//! `scripts/build-web.sh` builds it for `wasm32-unknown-unknown` and generates its JS glue
//! into `crates/starling-web/dist/` beside the main module's.

pub mod bindings;
pub mod device;
