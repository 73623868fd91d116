//! Secure aggregation, SecAgg+ (Bonawitz et al., CCS 2017; Bell et al., CCS 2020): the
//! server learns the sum of the devices' inputs and nothing about any one of them, and the
//! round survives devices dropping out at any step. Plain state machines over plain
//! messages, so the same code runs in the server's engine, the native client, the browser
//! (wasm32: every secret comes from the caller's generator, no OS randomness here) and the
//! simulator.
//!
//! - [`encode`]: inputs as fixed-point integers in the ring Z_(2^bits), with stochastic
//!   rounding.
//! - [`shamir`]: Shamir t-of-k shares of 32-byte secrets over GF(2^8).
//! - [`graph`]: SecAgg+'s random Harary graph of O(log n) neighbours per device.
//! - [`input`]: a device's update, weight, loss and accuracy as one ring vector, and the
//!   server's decoding of the sum into a `WeightedSum`.
//! - [`protocol`]: the device ([`protocol::Client`]) and the server
//!   ([`protocol::Aggregator`]): advertise keys (X25519), share keys (ChaCha20-Poly1305 under
//!   HKDF-SHA256 keys), masked input (ChaCha20 expansions of the agreed seeds), unmask.

pub mod encode;
pub mod graph;
pub mod input;
pub mod protocol;
pub mod shamir;
