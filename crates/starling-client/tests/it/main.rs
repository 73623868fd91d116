//! The device runtime's integration tests, one binary: the device loop (`device`) and the
//! resumable session (`session`), against real servers on 127.0.0.1 and a scripted one.

mod device;
mod secure;
mod session;
