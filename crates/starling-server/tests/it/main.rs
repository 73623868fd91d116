//! The server's integration tests, one binary: the HTTP API against a real server on 127.0.0.1:0 with a real SQLite file, the engine through its handle on a virtual clock, hostile clients over raw sockets, concurrency, the protocol's documents, fuzzing of the upload path, TensorBoard event files read back with TensorBoard, and the example config (`harness` starts a server and speaks its HTTP for the others).

mod admin;
mod api;
mod buffered;
mod concurrency;
mod credentials;
mod engine;
mod evaluation;
mod example_config;
mod fuzz_upload;
mod hardening;
mod harness;
mod privacy;
mod protocol;
mod secagg;
mod secagg_http;
mod tensorboard;
