//! The protocol between devices and the server, defined once: the typed requests and answers
//! of the HTTP API v1, the header names, and every error code with its HTTP status. The server
//! answers with these types, the native client and the browser app read them, and the OpenAPI
//! document is checked against them (`starling-server/tests/it/protocol.rs`). Plain serde types,
//! so the module builds for `wasm32-unknown-unknown` like the rest of the core.

use serde::{Deserialize, Serialize};

use crate::secagg::protocol::{AdvertiseKeys, Envelope, Unmasking};
use crate::secagg::shamir::Share;
use crate::trainer::train::Plan;

/// The header that carries an upload's token, so that the server checks the assignment before
/// it reads (and buffers) the body. It must equal the `token` in the update's metadata.
pub const TOKEN_HEADER: &str = "x-starling-token";

/// The header that carries the admin token on the admin API (`/v1/admin/...`).
pub const ADMIN_TOKEN_HEADER: &str = "x-starling-admin-token";

/// The scheme of a device credential in the standard `Authorization` header: a device of an
/// enrolled task sends `Authorization: Bearer <credential>` with every check-in, upload and
/// evaluation report.
pub const CREDENTIAL_SCHEME: &str = "Bearer";

/// The header that carries the served model's version beside its `ETag`.
pub const VERSION_HEADER: &str = "x-starling-version";

/// Every reason the server refuses a request: a stable, machine-readable code and the HTTP
/// status it is answered with. The status comes from here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such endpoint.
    NotFound,
    /// The endpoint exists but not for this method.
    MethodNotAllowed,
    /// A control request (check-in body, query) is not what the endpoint takes.
    BadRequest,
    /// No task with that name.
    UnknownTask,
    /// The round number was never opened, or is not a canonical decimal number.
    UnknownRound,
    /// Empty body, or not a valid safetensors file.
    MalformedUpdate,
    /// Metadata missing, unparsable, out of range, or a field the protocol does not define.
    InvalidMetadata,
    /// Tensor names, shapes or dtypes differ from the model's.
    WrongTensors,
    /// The example count is zero, negative, or beyond the protocol's limit.
    InvalidExamples,
    /// A tensor holds NaN or an infinity.
    NotFinite,
    /// The update's L2 norm exceeds the task's bound.
    NormTooLarge,
    /// An upload without its token header.
    MissingToken,
    /// The token is not an assignment of this round (or does not match the body's).
    InvalidToken,
    /// The update is built on another version than the round trains.
    StaleVersion,
    /// The round is over or closing.
    RoundClosed,
    /// An update sent to an evaluation round, or an evaluation report to a training round.
    WrongRoundKind,
    /// The task has stopped training (its privacy budget is spent); check-ins get this until
    /// an operator changes the task.
    TaskStopped,
    /// Buffered asynchronous mode: the update is built on a version more versions behind the
    /// current one than the task's `max_staleness`.
    TooStale,
    /// This assignment already delivered its update.
    DuplicateUpdate,
    /// The body exceeds the endpoint's (for uploads: the task's) size limit.
    PayloadTooLarge,
    /// The request's URI is longer than the server reads.
    UriTooLong,
    /// The client sent its request or body too slowly.
    RequestTimeout,
    /// Too many uploads are in flight; come back after `Retry-After`.
    Busy,
    /// An admin call without the right admin token (or with the admin API off).
    Unauthorized,
    /// A request to an enrolled task without a device credential.
    MissingCredential,
    /// A device credential the server never issued for this task.
    InvalidCredential,
    /// A device credential an operator revoked.
    RevokedCredential,
    /// An enrollment with the wrong enrollment secret, or to a task that takes none.
    EnrollmentRefused,
    /// Too many requests from one client address or credential; come back after
    /// `Retry-After`.
    RateLimited,
    /// An admin call's task settings are invalid (the message says which key).
    InvalidSettings,
    /// An uploaded model does not fit the task's model (names, shapes, dtypes, finiteness).
    InvalidModel,
    /// The admin call conflicts with the task's state (it exists already, or is defined in
    /// the settings file).
    Conflict,
    /// No stored model version with that number (never committed, or no longer kept).
    UnknownVersion,
    /// The task's engine is shutting down.
    Unavailable,
    /// Secure aggregation: a message for another step of the round than the one it is in.
    WrongPhase,
    /// Secure aggregation: this device already sent this step's message.
    DuplicateMessage,
    /// Secure aggregation: a masked input of another length than the round's.
    WrongLength,
    /// Secure aggregation: the device did not take part in the steps this one builds on.
    NotInCohort,
    /// Secure aggregation: encrypted shares or unmasking shares that are not one per
    /// neighbour, or name a device that is not the sender's neighbour.
    InvalidShares,
    /// Secure aggregation: an advertised public key of low order, with which no device
    /// could agree a secret.
    InvalidKey,
    /// The server failed (storage); details are in its log, not in the answer.
    Internal,
}

impl ErrorCode {
    /// Every code, in the order of the documentation.
    pub const ALL: [ErrorCode; 41] = [
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BadRequest,
        ErrorCode::UnknownTask,
        ErrorCode::UnknownRound,
        ErrorCode::UnknownVersion,
        ErrorCode::MalformedUpdate,
        ErrorCode::InvalidMetadata,
        ErrorCode::WrongTensors,
        ErrorCode::InvalidExamples,
        ErrorCode::NotFinite,
        ErrorCode::NormTooLarge,
        ErrorCode::MissingToken,
        ErrorCode::Unauthorized,
        ErrorCode::MissingCredential,
        ErrorCode::InvalidCredential,
        ErrorCode::RevokedCredential,
        ErrorCode::EnrollmentRefused,
        ErrorCode::InvalidToken,
        ErrorCode::StaleVersion,
        ErrorCode::RoundClosed,
        ErrorCode::WrongRoundKind,
        ErrorCode::TaskStopped,
        ErrorCode::TooStale,
        ErrorCode::DuplicateUpdate,
        ErrorCode::WrongPhase,
        ErrorCode::DuplicateMessage,
        ErrorCode::WrongLength,
        ErrorCode::NotInCohort,
        ErrorCode::InvalidShares,
        ErrorCode::InvalidKey,
        ErrorCode::Conflict,
        ErrorCode::InvalidSettings,
        ErrorCode::InvalidModel,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::RequestTimeout,
        ErrorCode::RateLimited,
        ErrorCode::Busy,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownTask => "unknown_task",
            ErrorCode::UnknownRound => "unknown_round",
            ErrorCode::MalformedUpdate => "malformed_update",
            ErrorCode::InvalidMetadata => "invalid_metadata",
            ErrorCode::WrongTensors => "wrong_tensors",
            ErrorCode::InvalidExamples => "invalid_examples",
            ErrorCode::NotFinite => "not_finite",
            ErrorCode::NormTooLarge => "norm_too_large",
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::StaleVersion => "stale_version",
            ErrorCode::RoundClosed => "round_closed",
            ErrorCode::TooStale => "too_stale",
            ErrorCode::WrongRoundKind => "wrong_round_kind",
            ErrorCode::TaskStopped => "task_stopped",
            ErrorCode::DuplicateUpdate => "duplicate_update",
            ErrorCode::WrongPhase => "wrong_phase",
            ErrorCode::DuplicateMessage => "duplicate_message",
            ErrorCode::WrongLength => "wrong_length",
            ErrorCode::NotInCohort => "not_in_cohort",
            ErrorCode::InvalidShares => "invalid_shares",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Busy => "busy",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::MissingCredential => "missing_credential",
            ErrorCode::InvalidCredential => "invalid_credential",
            ErrorCode::RevokedCredential => "revoked_credential",
            ErrorCode::EnrollmentRefused => "enrollment_refused",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidSettings => "invalid_settings",
            ErrorCode::InvalidModel => "invalid_model",
            ErrorCode::Conflict => "conflict",
            ErrorCode::UnknownVersion => "unknown_version",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code named `s` on the wire, if there is one.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::MalformedUpdate
            | ErrorCode::InvalidMetadata
            | ErrorCode::InvalidSettings
            | ErrorCode::WrongLength
            | ErrorCode::InvalidShares
            | ErrorCode::InvalidKey => 400,
            ErrorCode::MissingToken
            | ErrorCode::Unauthorized
            | ErrorCode::MissingCredential
            | ErrorCode::InvalidCredential => 401,
            ErrorCode::InvalidToken
            | ErrorCode::RevokedCredential
            | ErrorCode::EnrollmentRefused
            | ErrorCode::NotInCohort => 403,
            ErrorCode::NotFound
            | ErrorCode::UnknownTask
            | ErrorCode::UnknownRound
            | ErrorCode::UnknownVersion => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::StaleVersion
            | ErrorCode::RoundClosed
            | ErrorCode::TooStale
            | ErrorCode::WrongRoundKind
            | ErrorCode::TaskStopped
            | ErrorCode::DuplicateUpdate
            | ErrorCode::WrongPhase
            | ErrorCode::DuplicateMessage
            | ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UriTooLong => 414,
            ErrorCode::WrongTensors
            | ErrorCode::InvalidExamples
            | ErrorCode::NotFinite
            | ErrorCode::NormTooLarge
            | ErrorCode::InvalidModel => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Busy | ErrorCode::Unavailable => 503,
        }
    }

    /// Whether a device should try the same request again later (after `Retry-After` when
    /// the answer has one): the server's own trouble, not the request's.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy
                | ErrorCode::RateLimited
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::RequestTimeout
        )
    }

    /// When the server answers with this code, for people (the README's error table).
    pub fn description(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "no such endpoint",
            ErrorCode::MethodNotAllowed => "the endpoint does not take this method",
            ErrorCode::BadRequest => {
                "the check-in body is not `{\"device\": \"<1 to 128 characters>\"}`"
            }
            ErrorCode::UnknownTask => "no task with that name",
            ErrorCode::UnknownRound => {
                "the round number was never opened, or is not a plain decimal number"
            }
            ErrorCode::MalformedUpdate => "empty body, or not a valid safetensors file",
            ErrorCode::InvalidMetadata => {
                "`base_version`, `examples` or `token` missing or not a plain decimal number; \
                 `loss` unparsable, negative or not finite; `accuracy` outside [0, 1]; \
                 any other metadata field; an evaluation report that is not \
                 `{\"base_version\", \"examples\", \"loss\", \"accuracy\"?}`"
            }
            ErrorCode::WrongTensors => {
                "tensor names, shapes or dtypes (F32 only) differ from the model's"
            }
            ErrorCode::InvalidExamples => "`examples` is zero, negative, or above 1,000,000,000",
            ErrorCode::NotFinite => "a tensor holds NaN or an infinity",
            ErrorCode::NormTooLarge => "the update's L2 norm exceeds the task's `max_update_norm`",
            ErrorCode::MissingToken => "an upload without the `X-Starling-Token` header",
            ErrorCode::InvalidToken => {
                "the token is not an assignment of this round, or differs from the body's"
            }
            ErrorCode::StaleVersion => {
                "`base_version` is not the version this round trains (buffered mode: older than \
                 the assignment's, or newer than the current model)"
            }
            ErrorCode::RoundClosed => {
                "the round is over (committed or abandoned), or closing (goal reached or \
                 deadline passed)"
            }
            ErrorCode::TaskStopped => {
                "the task has stopped training: its privacy budget is spent (the message says \
                 how much); devices should stop asking"
            }
            ErrorCode::WrongRoundKind => {
                "an update sent to an evaluation round, or an evaluation report to a training \
                 round (the check-in's `kind` and `upload_url` say which)"
            }
            ErrorCode::TooStale => {
                "buffered mode: `base_version` is more than the task's `max_staleness` versions \
                 behind the current model; check in again for a fresh assignment"
            }
            ErrorCode::DuplicateUpdate => "this assignment already delivered its update",
            ErrorCode::WrongPhase => {
                "secure aggregation: the round is in another step than this message's (the \
                 message names it), or the task or round is not secure; a plain upload to a \
                 secure round"
            }
            ErrorCode::DuplicateMessage => {
                "secure aggregation: this assignment already sent this step's message (keys, \
                 shares, masked input or unmasking)"
            }
            ErrorCode::WrongLength => {
                "secure aggregation: a masked input or a key of another length than the round's"
            }
            ErrorCode::NotInCohort => {
                "secure aggregation: the device missed an earlier step of the round (it did \
                 not advertise keys, share them, or send its masked input in time)"
            }
            ErrorCode::InvalidShares => {
                "secure aggregation: encrypted shares not exactly one per neighbour that \
                 advertised keys, or unmasking shares of devices that are not the sender's \
                 neighbours or not called for by the survivors"
            }
            ErrorCode::InvalidKey => {
                "secure aggregation: an advertised public key of low order, with which no \
                 device could agree a secret"
            }
            ErrorCode::PayloadTooLarge => {
                "the body exceeds the limit: for an upload, the task's model size plus a \
                 header allowance; otherwise `max_body_bytes`"
            }
            ErrorCode::UriTooLong => "the URI is longer than 8 KiB",
            ErrorCode::RequestTimeout => {
                "the request headers or body did not arrive within the server's timeouts"
            }
            ErrorCode::Busy => {
                "too many uploads are in flight; come back after `Retry-After` seconds"
            }
            ErrorCode::Unavailable => "the task's engine is shutting down",
            ErrorCode::Unauthorized => {
                "an admin call without the right `X-Starling-Admin-Token`, or the admin API is \
                 off (no `server.admin_token`)"
            }
            ErrorCode::MissingCredential => {
                "a request to an enrolled task without `Authorization: Bearer <credential>`; \
                 enroll first (`POST /v1/tasks/{task}/enroll`)"
            }
            ErrorCode::InvalidCredential => {
                "the device credential was never issued for this task (forged, mistyped, or \
                 another task's)"
            }
            ErrorCode::RevokedCredential => "an operator revoked this device credential",
            ErrorCode::EnrollmentRefused => {
                "the enrollment secret is wrong, or the task's admission is `open` (no \
                 enrollment needed)"
            }
            ErrorCode::RateLimited => {
                "too many requests from this client address or credential; come back after \
                 `Retry-After` seconds"
            }
            ErrorCode::InvalidSettings => {
                "an admin call's task settings are not valid TOML for a task, or break a rule \
                 (the message names the key)"
            }
            ErrorCode::InvalidModel => {
                "an uploaded model is not a safetensors file of the task's tensors (names, \
                 shapes, F32), or holds NaN or an infinity"
            }
            ErrorCode::Conflict => {
                "the admin call conflicts with the task: it exists already, or is defined in \
                 the settings file (change it there)"
            }
            ErrorCode::UnknownVersion => {
                "no stored model version with that number (never committed, or no longer kept)"
            }
            ErrorCode::Internal => "the server failed (storage); the details are in its log",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error answer's body: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The stable code, as a string so that a client reads codes newer than itself.
    pub code: String,
    /// For people.
    pub message: String,
}

impl ErrorBody {
    /// An error answer.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.as_str().to_string(),
                message: message.into(),
            },
        }
    }

    /// The code, if this client knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::parse(&self.error.code)
    }
}

/// The body of `POST /v1/tasks/{task}/checkin` (optional: an empty body is anonymous).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckInRequest {
    /// An opaque id of 1 to [`MAX_DEVICE_ID`] characters the device chose for itself; a device
    /// that names itself gets at most one assignment per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// The longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 128;

/// What a round asks of its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    /// Train the model on local data and upload the update.
    #[default]
    Training,
    /// Federated evaluation: score the model on local data and report loss, accuracy and
    /// the example count ([`EvaluationReport`]); nothing is trained.
    Evaluation,
}

impl RoundKind {
    /// The kind as written on the wire and in the round history.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundKind::Training => "training",
            RoundKind::Evaluation => "evaluation",
        }
    }
}

/// The body of `POST /v1/tasks/{task}/rounds/{round}/evaluations`: a device's score of the
/// round's model on its local data (the upload token goes in [`TOKEN_HEADER`]). Nothing of
/// the data itself: a mean loss, a mean accuracy and how many examples they cover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationReport {
    /// The version scored (the round's).
    pub base_version: u64,
    /// Examples scored: 1 to [`crate::wire::update::MAX_EXAMPLES`].
    pub examples: u64,
    /// Mean loss over them: finite, at least 0.
    pub loss: f64,
    /// Mean accuracy over them, in [0, 1] (classifiers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// Why an [`EvaluationReport`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportError {
    /// The example count is zero or beyond the protocol's limit.
    #[error("a report must count between 1 and 1000000000 examples, got {0}")]
    Examples(u64),
    /// The loss is negative or not finite.
    #[error("`loss` must be a finite number >= 0, got {0}")]
    Loss(f64),
    /// The accuracy is outside [0, 1].
    #[error("`accuracy` must be in [0, 1], got {0}")]
    Accuracy(f64),
}

impl EvaluationReport {
    /// Checks the report's numbers.
    pub fn check(&self) -> Result<(), ReportError> {
        const _: () = assert!(crate::wire::update::MAX_EXAMPLES == 1_000_000_000);
        if self.examples == 0 || self.examples > crate::wire::update::MAX_EXAMPLES as u64 {
            return Err(ReportError::Examples(self.examples));
        }
        if !(self.loss.is_finite() && self.loss >= 0.0) {
            return Err(ReportError::Loss(self.loss));
        }
        if let Some(a) = self.accuracy {
            if !(0.0..=1.0).contains(&a) {
                return Err(ReportError::Accuracy(a));
            }
        }
        Ok(())
    }
}

/// The answer to a check-in.
// An assignment is larger than a retry (more so in a secure round); answers are made and
// read once per check-in, so boxing it would only cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CheckInAnswer {
    /// Work for a round.
    Assigned {
        /// The round.
        round: u64,
        /// Train, or evaluate ([`RoundKind`]); absent means training.
        #[serde(default)]
        kind: RoundKind,
        /// The version to train from.
        base_version: u64,
        /// The upload token (send it in [`TOKEN_HEADER`] and in the update's metadata).
        token: String,
        /// Seconds left before the round's deadline.
        deadline_secs: f64,
        /// What to do.
        plan: Plan,
        /// Where to download the model.
        model_url: String,
        /// Where to upload the update (for an evaluation round: where to post the
        /// [`EvaluationReport`]).
        upload_url: String,
        /// A secure round's parameters: the device takes part in secure aggregation's
        /// steps instead of uploading its update.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secure: Option<SecureAssignment>,
    },
    /// Come back later (pace steering); also sent as a `Retry-After` header.
    Retry {
        /// Seconds to wait.
        retry_after_secs: f64,
        /// Why.
        reason: String,
    },
}

/// What an assignment to a secure round (`[tasks.secure_aggregation]`) tells the device:
/// its place in the round and everything it needs to build the round's public
/// `secagg::protocol::Params` itself (`Params::new(round, devices, min_survivors,
/// FixedPoint::new(input_bits, devices), input_len, graph_seed)`, so the server does not
/// choose the degree or the threshold) and to encode its input (`secagg::input::InputSpec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureAssignment {
    /// The device's index in the round (0..devices).
    pub index: u64,
    /// Places in the round: the neighbourhood graph's size.
    pub devices: u64,
    /// Masked inputs the round needs.
    pub min_survivors: u64,
    /// Bits of one device's input.
    pub input_bits: u32,
    /// The neighbourhood graph's public seed, 64 hex digits.
    pub graph_seed: String,
    /// Values in the input: the model's parameters plus 4 (weight, loss, accuracy, and the
    /// accuracy's weight).
    pub input_len: u64,
    /// The L2 bound a device clips its update to.
    pub clip: f64,
    /// Local losses are clamped to [0, loss_bound].
    pub loss_bound: f64,
    /// The example count that weighs 1; absent: every device weighs 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_cap: Option<u64>,
    /// Distributed differential privacy: the μ of the Skellam noise Sk(μ) the device adds to
    /// every update value (in the ring's integer units; the ring then has room for it, see
    /// `FixedPoint::with_noise`), and it reports no loss or accuracy. Absent: no noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skellam_mu: Option<f64>,
    /// Where the round's steps live: `POST {secure_url}/keys`, `GET {secure_url}/keys`,
    /// `POST {secure_url}/shares`, `GET {secure_url}/shares`, `POST {secure_url}/input`,
    /// `GET {secure_url}/survivors`, `POST {secure_url}/unmask`.
    pub secure_url: String,
}

/// A device's two X25519 public keys, 64 hex digits each (`POST .../secagg/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureKeys {
    /// For encrypting shares to this device.
    pub encryption: String,
    /// For agreeing pairwise mask seeds.
    pub masking: String,
}

/// The neighbours' keys (`GET .../secagg/keys`), once the advertise step has closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourKeys {
    /// `(index, keys)` of each neighbour that advertised.
    pub keys: Vec<(u64, SecureKeys)>,
}

/// One encrypted share envelope, between two devices' indices; the ciphertext in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureEnvelope {
    /// The device whose secrets these are.
    pub from: u64,
    /// The neighbour it is for.
    pub to: u64,
    /// ChaCha20-Poly1305 ciphertext, hex.
    pub ciphertext: String,
}

/// A device's envelopes (`POST .../secagg/shares`), or those addressed to it (`GET`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureEnvelopes {
    /// The envelopes.
    pub envelopes: Vec<SecureEnvelope>,
}

/// The devices whose masked inputs are in the sum (`GET .../secagg/survivors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Survivors {
    /// Their indices, ascending.
    pub survivors: Vec<u64>,
}

/// One Shamir share of a neighbour's secret: `(owner, x, y in hex)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureShare {
    /// The device whose secret it is.
    pub owner: u64,
    /// The share's point.
    pub x: u8,
    /// The share's value, 64 hex digits.
    pub y: String,
}

/// What a survivor reveals (`POST .../secagg/unmask`): shares of the survivors' self-mask
/// seeds and of the dropped devices' mask keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureUnmasking {
    /// Shares of self-mask seeds.
    pub seeds: Vec<SecureShare>,
    /// Shares of mask keys.
    pub keys: Vec<SecureShare>,
}

/// The answer to a secure step's message or poll that is not ready yet (HTTP 202 for a
/// poll): come back later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureWait {
    /// Always `"wait"`.
    pub status: String,
    /// The step the round is in.
    pub phase: String,
    /// Seconds to wait before asking again.
    pub retry_after_secs: f64,
}

/// The answer to a secure step's accepted message (HTTP 202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureReceipt {
    /// Always `"accepted"`.
    pub status: String,
    /// The step it was taken in.
    pub phase: String,
}

/// The answer to an accepted upload (HTTP 202).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadReceipt {
    /// Always `"accepted"`.
    pub status: String,
    /// The round the update went into.
    pub round: u64,
    /// Updates folded into that round so far, this one included.
    pub updates_in_round: u64,
}

/// The body of `POST /v1/admin/tasks/{task}/rollback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The stored version to go back to.
    pub version: u64,
}

/// The answer to a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackAnswer {
    /// The task.
    pub task: String,
    /// The version whose parameters were restored.
    pub restored: u64,
    /// The new version, which holds them.
    pub version: u64,
}

/// The body of `POST /v1/tasks/{task}/enroll`: the enrollment secret the operator gave the
/// device (a string, a QR code, a link), presented once for a device credential.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The task's enrollment secret.
    pub secret: String,
    /// A label for operators (`"pixel-7 in the lab"`), at most [`MAX_DEVICE_ID`] characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("secret", &"<redacted>")
            .field("label", &self.label)
            .finish()
    }
}

/// The answer to an enrollment (HTTP 201): the device's id and its credential, shown this
/// once (the server keeps only its SHA-256 digest).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollAnswer {
    /// The task.
    pub task: String,
    /// The device's id, chosen by the server; operators list and revoke devices by it.
    pub device: String,
    /// The credential: send it as `Authorization: Bearer <credential>`.
    pub credential: String,
}

impl std::fmt::Debug for EnrollAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollAnswer")
            .field("task", &self.task)
            .field("device", &self.device)
            .field("credential", &"<redacted>")
            .finish()
    }
}

/// 32 bytes from 64 hex digits (`None` for anything else).
pub fn bytes32(hex: &str) -> Option<[u8; 32]> {
    from_hex(hex).and_then(|b| <[u8; 32]>::try_from(b).ok())
}

impl From<&AdvertiseKeys> for SecureKeys {
    fn from(k: &AdvertiseKeys) -> Self {
        Self {
            encryption: to_hex(&k.encryption),
            masking: to_hex(&k.masking),
        }
    }
}

impl SecureKeys {
    /// The keys, or which of them is not 64 hex digits.
    pub fn decode(&self) -> Result<AdvertiseKeys, &'static str> {
        Ok(AdvertiseKeys {
            encryption: bytes32(&self.encryption).ok_or("`encryption` is not 64 hex digits")?,
            masking: bytes32(&self.masking).ok_or("`masking` is not 64 hex digits")?,
        })
    }
}

impl From<&Envelope> for SecureEnvelope {
    fn from(e: &Envelope) -> Self {
        Self {
            from: e.from as u64,
            to: e.to as u64,
            ciphertext: to_hex(&e.ciphertext),
        }
    }
}

impl SecureEnvelope {
    /// The envelope, or why it is unusable.
    pub fn decode(&self) -> Result<Envelope, &'static str> {
        Ok(Envelope {
            from: usize::try_from(self.from).map_err(|_| "an index out of range")?,
            to: usize::try_from(self.to).map_err(|_| "an index out of range")?,
            ciphertext: from_hex(&self.ciphertext).ok_or("a ciphertext that is not hex")?,
        })
    }
}

impl From<&Unmasking> for SecureUnmasking {
    fn from(u: &Unmasking) -> Self {
        let shares =
            |v: &[(usize, Share)]| v.iter().map(|(o, s)| SecureShare::new(*o, s)).collect();
        Self {
            seeds: shares(&u.seeds),
            keys: shares(&u.keys),
        }
    }
}

impl SecureShare {
    /// `owner`'s share `s`.
    pub fn new(owner: usize, s: &Share) -> Self {
        Self {
            owner: owner as u64,
            x: s.x,
            y: to_hex(&s.y),
        }
    }

    /// The owner and the share, or why it is unusable.
    pub fn decode(&self) -> Result<(usize, Share), &'static str> {
        Ok((
            usize::try_from(self.owner).map_err(|_| "an index out of range")?,
            Share {
                x: self.x,
                y: bytes32(&self.y).ok_or("a share that is not 64 hex digits")?,
            },
        ))
    }
}

/// Bytes as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Hex (either case) as bytes; `None` for an odd length or a non-hex digit.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Parses a decimal number as the protocol writes it: ASCII digits only, no sign, no leading
/// zero (except `0` itself), so that `+10`, `010` and ` 1` are not numbers.
pub fn parse_canonical_u64(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_report_is_checked_number_by_number() {
        let ok = EvaluationReport {
            base_version: 3,
            examples: 10,
            loss: 0.25,
            accuracy: Some(0.5),
        };
        assert_eq!(ok.check(), Ok(()));
        for (bad, err) in [
            (
                EvaluationReport {
                    examples: 0,
                    ..ok.clone()
                },
                ReportError::Examples(0),
            ),
            (
                EvaluationReport {
                    examples: 1_000_000_001,
                    ..ok.clone()
                },
                ReportError::Examples(1_000_000_001),
            ),
            (
                EvaluationReport {
                    loss: -1.0,
                    ..ok.clone()
                },
                ReportError::Loss(-1.0),
            ),
            (
                EvaluationReport {
                    loss: f64::INFINITY,
                    ..ok.clone()
                },
                ReportError::Loss(f64::INFINITY),
            ),
            (
                EvaluationReport {
                    accuracy: Some(1.5),
                    ..ok.clone()
                },
                ReportError::Accuracy(1.5),
            ),
        ] {
            assert_eq!(bad.check(), Err(err));
        }
        let nan = EvaluationReport {
            loss: f64::NAN,
            ..ok.clone()
        };
        assert!(matches!(nan.check(), Err(ReportError::Loss(l)) if l.is_nan()));
        // Anything beyond the four fields is refused when parsed.
        assert!(serde_json::from_str::<EvaluationReport>(
            r#"{"base_version": 1, "examples": 2, "loss": 0.5, "data": [1, 2]}"#
        )
        .is_err());
    }

    #[test]
    fn every_code_round_trips_and_has_an_error_status() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::json!(c.as_str())
            );
            assert!((400..600).contains(&c.status()), "{c}");
            assert!(!c.description().is_empty());
        }
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "codes are distinct");
    }

    #[test]
    fn canonical_numbers_only() {
        assert_eq!(parse_canonical_u64("0"), Some(0));
        assert_eq!(parse_canonical_u64("17"), Some(17));
        for bad in [
            "",
            "+10",
            "010",
            "-1",
            " 1",
            "1 ",
            "1e3",
            "%31",
            "18446744073709551616",
        ] {
            assert_eq!(parse_canonical_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn secure_wire_types_round_trip_and_refuse_bad_hex() {
        let keys = AdvertiseKeys {
            encryption: [1; 32],
            masking: [2; 32],
        };
        let wire = SecureKeys::from(&keys);
        assert_eq!(wire.encryption, "01".repeat(32));
        assert_eq!(wire.decode().unwrap(), keys);
        let short = SecureKeys {
            masking: "02".repeat(31),
            ..wire
        };
        assert_eq!(
            short.decode().unwrap_err(),
            "`masking` is not 64 hex digits"
        );
        let e = Envelope {
            from: 3,
            to: 4,
            ciphertext: vec![0xab, 0xcd],
        };
        let wire = SecureEnvelope::from(&e);
        assert_eq!(wire.ciphertext, "abcd");
        assert_eq!(wire.decode().unwrap(), e);
        let bad = SecureEnvelope {
            ciphertext: "xyz".into(),
            ..wire
        };
        assert!(bad.decode().is_err());
        let share = Share { x: 7, y: [9; 32] };
        let wire = SecureShare::new(5, &share);
        assert_eq!(wire.decode().unwrap(), (5, share));
        let bad = SecureShare {
            y: "09".into(),
            ..wire
        };
        assert!(bad.decode().is_err());
        assert_eq!(bytes32(&"ff".repeat(32)), Some([0xff; 32]));
        assert_eq!(bytes32("ff"), None);
    }

    #[test]
    fn check_in_answers_are_tagged_by_status() {
        let retry: CheckInAnswer = serde_json::from_str(
            r#"{"status":"retry","retry_after_secs":5.5,"reason":"the round is full"}"#,
        )
        .unwrap();
        assert!(matches!(retry, CheckInAnswer::Retry { .. }));
        let empty: CheckInRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty.device, None);
        assert!(serde_json::from_str::<CheckInRequest>(r#"{"photo":"x"}"#).is_err());
    }
}
