//! The Starling device runtime: check in, wait when told to, download the model, train on
//! local data, upload the update, repeat — retrying with back-off while the server is
//! unreachable or answers with its own failure. It knows the server only through the
//! [`transport::Transport`] trait, and the protocol's types from [`starling_core::wire::protocol`].
//!
//! - [`transport`]: the protocol as a trait, and its HTTP implementation.
//! - [`device`]: the device loop, its retries and its give-up deadline.
//! - [`session`]: a resumable device: one contribution as explicit steps, saved between them,
//!   with the device policy (the host's conditions against the task's requirements).
//! - [`secure`]: the device's side of a secure round (SecAgg+ over the transport).
//! - [`data`]: loading local data files.
//! - [`examples`]: the device's local examples under a storage budget, newest kept.

pub mod data;
pub mod device;
pub mod examples;
pub mod secure;
pub mod session;
pub mod transport;

use std::time::Duration;

pub use device::{Device, DeviceEvent, DeviceOptions, DeviceReport};
pub use session::{Outcome, Session, Step};
pub use starling_core::wire::protocol::ErrorCode;
pub use transport::{CheckInAnswer, HttpTransport, Transport};

/// Errors a device can meet.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or did not answer within the request timeout.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The server answered a request with an error.
    #[error("server refused ({status} {code_name}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code, when this client knows it (match on this).
        code: Option<ErrorCode>,
        /// The code as the server wrote it, also for codes newer than this client; for an
        /// error answer without a JSON error body, `http_<status>`.
        code_name: String,
        /// The server's message.
        message: String,
        /// The answer's `Retry-After` (in seconds), if it had one.
        retry_after: Option<Duration>,
    },
    /// The server answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// TLS failed: the server's certificate was refused (not signed by a trusted CA, not for
    /// this host, expired), the server does not speak TLS, or a CA certificate given to trust
    /// is unusable. Not retried: it is a matter of configuration, not of the moment.
    #[error("TLS: {0}")]
    Tls(String),
    /// Local data is unusable.
    #[error("local data: {0}")]
    Data(String),
    /// A session's saved state is unusable, or a step was asked for out of order.
    #[error("session: {0}")]
    State(String),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] starling_core::trainer::train::TrainError),
    /// The server stayed unreachable or failing for `give_up_after`.
    #[error("gave up after the server failed for {after:?}; last error: {last_error}")]
    GaveUp {
        /// How long the server had been failing.
        after: Duration,
        /// The last failure.
        last_error: String,
    },
}

impl ClientError {
    /// The protocol's code of a refusal, when this client knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether the same request is worth sending again later: the server could not be
    /// reached, or it answered with its own trouble (any 5xx, 408, 429, or a code whose
    /// [`ErrorCode::is_retryable`] says so), not with a verdict on the request.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Refused { status, code, .. } => {
                *status >= 500
                    || *status == 408
                    || *status == 429
                    || code.is_some_and(ErrorCode::is_retryable)
            }
            _ => false,
        }
    }

    /// How long the server asked the client to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
