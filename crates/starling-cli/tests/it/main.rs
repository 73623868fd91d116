//! The `starling` binary's integration tests, one binary: the real binary as separate processes (`common` starts and reads them).

mod admin;
mod bench;
mod common;
mod data;
mod demo;
mod privacy;
mod processes;
mod session;
mod tensorboard;
mod tls;
mod train;
