//! The Starling device runtime: check in, wait when told to, download the model, train on
//! local data, upload the update, repeat — retrying with back-off when the server is
//! unreachable. It knows the server only through the [`transport::Transport`] trait.
//!
//! - [`transport`]: the protocol as a trait, and its HTTP implementation.
//! - [`device`]: the device loop.
//! - [`data`]: loading local data files.

pub mod data;
pub mod device;
pub mod transport;

pub use device::{Device, DeviceOptions, DeviceReport};
pub use transport::{HttpTransport, Transport};

/// Errors a device can meet.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached (connection refused, timeout, …).
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The server refused a request.
    #[error("server refused ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Local data is unusable.
    #[error("local data: {0}")]
    Data(String),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] starling_core::train::TrainError),
    /// The server stayed unreachable for too long.
    #[error("gave up after the server was unreachable for {0:?}")]
    GaveUp(std::time::Duration),
}
