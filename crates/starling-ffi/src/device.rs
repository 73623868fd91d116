//! The safe layer under the C ABI (and under starling-jni): a [`Device`] owns a small
//! current-thread tokio runtime and a [`Session`] over HTTP, and runs each step to the end on
//! the calling thread. Every failure is a [`Failure`]: one of the [`Status`] codes the
//! bindings return, the error's message, and the server's code name when the server refused.
//! Nothing here is unsafe; the bindings only translate pointers and handles.

#![deny(unsafe_code)]

use std::path::Path;

use starling_client::data::load_csv;
use starling_client::session::{Outcome, Session, Step};
use starling_client::{ClientError, HttpTransport};
use starling_core::data::TargetColumn;
use starling_core::wire::checkpoint;
use starling_core::wire::protocol::RoundKind;
use starling_core::{Conditions, Parameters};

/// What a call ended with: the `STARLING_*` status codes of the C header (the JNI binding
/// carries the same numbers in `StarlingException.getStatus()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// An argument was missing (NULL), not UTF-8, or otherwise unusable.
    InvalidArgument = 1,
    /// The server answered with an error; its code name says which.
    Refused = 2,
    /// The server could not be reached (or stayed unreachable): worth trying later.
    Unreachable = 3,
    /// TLS failed: the certificate was refused, or the CA file is unusable.
    Tls = 4,
    /// The local data (a CSV file, submitted weights) is unusable.
    Data = 5,
    /// The step was asked for out of order, or the saved session is unusable.
    State = 6,
    /// The server answered something this client does not understand.
    Protocol = 7,
    /// Local training failed.
    Train = 8,
    /// A bug: Rust panicked inside the call. The session's folder is still consistent (each
    /// file is replaced atomically); free the session and open it again.
    Panic = 9,
}

/// A failed call: its status, message and (for a refusal) the server's code name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The status.
    pub status: Status,
    /// What went wrong, in words.
    pub message: String,
    /// The server's error code (`"missing_credential"`, ...) when it refused; else empty.
    pub code: String,
}

impl Failure {
    /// A failure without a server code.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: String::new(),
        }
    }

    /// An invalid argument.
    pub fn argument(message: impl Into<String>) -> Self {
        Self::new(Status::InvalidArgument, message)
    }

    /// A panic, with its payload's message when it is a string.
    pub fn panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Self::new(Status::Panic, format!("internal error (panic): {what}"))
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            ClientError::Refused { code_name, .. } => (Status::Refused, code_name),
            ClientError::Unreachable(_) | ClientError::GaveUp { .. } => {
                (Status::Unreachable, String::new())
            }
            ClientError::Tls(_) => (Status::Tls, String::new()),
            ClientError::Data(_) => (Status::Data, String::new()),
            ClientError::State(_) => (Status::State, String::new()),
            ClientError::Protocol(_) => (Status::Protocol, String::new()),
            ClientError::Train(_) => (Status::Train, String::new()),
        };
        Self {
            status,
            message,
            code,
        }
    }
}

/// A step's outcome, flattened for C and Java: the fields a kind does not use are zero
/// (`loss` NaN, `updates_in_round` -1).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Which outcome.
    pub kind: Kind,
    /// The round (assigned, delivered).
    pub round: u64,
    /// Whether the assigned round is an evaluation round (assigned).
    pub evaluation: bool,
    /// The model's version (downloaded).
    pub version: u64,
    /// Examples trained on or scored (trained, scored).
    pub examples: u64,
    /// The local loss (trained, scored), NaN when unknown.
    pub loss: f64,
    /// Updates in the round so far (delivered), -1 when an earlier try delivered it.
    pub updates_in_round: i64,
    /// Seconds to wait (wait).
    pub wait_secs: f64,
    /// Why (not eligible, wait, dropped); else empty.
    pub reason: String,
}

/// The kinds of [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The conditions do not meet the task's requirements; nothing was sent.
    NotEligible,
    /// The server asked the device to come back in `wait_secs`.
    Wait,
    /// Checked in: an assignment.
    Assigned,
    /// The model is saved locally.
    Downloaded,
    /// Trained: the update is saved.
    Trained,
    /// Scored the model (an evaluation round).
    Scored,
    /// The server took the update.
    Delivered,
    /// The round no longer takes the contribution; the session is idle again.
    Dropped,
}

impl Kind {
    /// The kind's name, as the Java enum spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NotEligible => "NOT_ELIGIBLE",
            Kind::Wait => "WAIT",
            Kind::Assigned => "ASSIGNED",
            Kind::Downloaded => "DOWNLOADED",
            Kind::Trained => "TRAINED",
            Kind::Scored => "SCORED",
            Kind::Delivered => "DELIVERED",
            Kind::Dropped => "DROPPED",
        }
    }
}

impl From<Outcome> for Record {
    fn from(o: Outcome) -> Self {
        let empty = |kind| Record {
            kind,
            round: 0,
            evaluation: false,
            version: 0,
            examples: 0,
            loss: f64::NAN,
            updates_in_round: -1,
            wait_secs: 0.0,
            reason: String::new(),
        };
        match o {
            Outcome::NotEligible { reason } => Record {
                reason,
                ..empty(Kind::NotEligible)
            },
            Outcome::Wait { secs, reason } => Record {
                wait_secs: secs,
                reason,
                ..empty(Kind::Wait)
            },
            Outcome::Assigned { round, kind } => Record {
                round,
                evaluation: kind == RoundKind::Evaluation,
                ..empty(Kind::Assigned)
            },
            Outcome::Downloaded { version } => Record {
                version,
                ..empty(Kind::Downloaded)
            },
            Outcome::Trained { examples, loss } => Record {
                examples,
                loss: loss.map_or(f64::NAN, f64::from),
                ..empty(Kind::Trained)
            },
            Outcome::Scored { report } => Record {
                examples: report.examples,
                loss: report.loss,
                ..empty(Kind::Scored)
            },
            Outcome::Delivered {
                round,
                updates_in_round,
            } => Record {
                round,
                updates_in_round: updates_in_round.map_or(-1, |n| n as i64),
                ..empty(Kind::Delivered)
            },
            Outcome::Dropped { reason } => Record {
                reason,
                ..empty(Kind::Dropped)
            },
        }
    }
}

/// A device session with its own runtime: what a `StarlingSession*` (C) or a `Device`
/// (Java) holds. Not for two threads at once (the bindings hand it to one caller at a time).
#[derive(Debug)]
pub struct Device {
    // Dropped before the runtime it ran on.
    session: Session<HttpTransport>,
    runtime: tokio::runtime::Runtime,
}

/// A transport to `server`, trusting the CA certificates in the PEM file `ca_pem` too.
fn transport(server: &str, ca_pem: Option<&Path>) -> Result<HttpTransport, Failure> {
    match ca_pem {
        None => Ok(HttpTransport::new(server)),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Failure::new(
                    Status::Tls,
                    format!("cannot read the CA certificates {}: {e}", path.display()),
                )
            })?;
            Ok(HttpTransport::with_ca_certificates(server, &pem)?)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Status::State, format!("cannot start a runtime: {e}")))
}

/// Reads the CSV file at `path` (numbers; the target is the last column).
fn load(path: &Path) -> Result<starling_core::Dataset, Failure> {
    Ok(load_csv(path, &TargetColumn::Last)?)
}

/// Enrolls a device in an enrolled task with the task's enrollment secret, answering its
/// credential (shown this once: keep it privately, and pass it to [`Device::open`]).
pub fn enroll(
    server: &str,
    task: &str,
    secret: &str,
    label: Option<&str>,
    ca_pem: Option<&Path>,
) -> Result<String, Failure> {
    let t = transport(server, ca_pem)?;
    let answer = runtime()?.block_on(t.enroll(task, secret, label))?;
    Ok(answer.credential)
}

impl Device {
    /// Opens (or creates) the session of `task` saved in `dir`, against `server`.
    pub fn open(
        server: &str,
        task: &str,
        dir: &Path,
        ca_pem: Option<&Path>,
        credential: Option<&str>,
    ) -> Result<Self, Failure> {
        let mut t = transport(server, ca_pem)?;
        if let Some(c) = credential {
            t = t.with_credential(c);
        }
        let runtime = runtime()?;
        let session = Session::open(t, task, dir)?;
        Ok(Self { session, runtime })
    }

    /// The step the session is at: `"idle"`, `"assigned"`, `"downloaded"` or `"ready"`.
    pub fn step(&self) -> &'static str {
        self.session.step().name()
    }

    /// Checks in when `conditions` meet the task's requirements. Step `idle`.
    pub fn check_in(&mut self, conditions: &Conditions) -> Result<Record, Failure> {
        let o = self.runtime.block_on(self.session.check_in(conditions))?;
        Ok(o.into())
    }

    /// Downloads the assignment's model. Step `assigned`.
    pub fn download(&mut self) -> Result<Record, Failure> {
        Ok(self.runtime.block_on(self.session.download())?.into())
    }

    /// Trains with the built-in trainer on the CSV file at `csv` (read first, whatever the
    /// step). Step `downloaded`.
    pub fn train_csv(&mut self, csv: &Path) -> Result<Record, Failure> {
        let data = load(csv)?;
        Ok(self.session.train(&data)?.into())
    }

    /// The downloaded checkpoint as safetensors: its tensors by name, with the task, version
    /// and model spec (JSON) in the metadata. Step `downloaded` or `ready`.
    pub fn model(&self) -> Result<Vec<u8>, Failure> {
        let c = self.session.model()?;
        Ok(checkpoint::encode(&c.task, c.version, &c.spec, &c.params))
    }

    /// A host's own training: `safetensors` holds the new weights (the model's tensors, by
    /// name, F32), trained on `examples` examples with the local `loss` (NaN: unknown). Step
    /// `downloaded`.
    pub fn submit_params(
        &mut self,
        safetensors: &[u8],
        examples: u64,
        loss: f32,
    ) -> Result<Record, Failure> {
        let layout = self.session.model()?.spec.layout();
        let (params, _) =
            Parameters::from_safetensors_with_layout(safetensors, &layout).map_err(|e| {
                Failure::new(
                    Status::Data,
                    format!("the weights do not fit the task's model: {e}"),
                )
            })?;
        let loss = Some(loss).filter(|l| l.is_finite());
        Ok(self.session.submit_params(&params, examples, loss)?.into())
    }

    /// Uploads the update. Step `ready`.
    pub fn upload(&mut self) -> Result<Record, Failure> {
        Ok(self.runtime.block_on(self.session.upload())?.into())
    }

    /// Runs the next step, training with the built-in trainer on the CSV file at `csv`
    /// (read only when the next step trains).
    pub fn advance(&mut self, csv: &Path, conditions: &Conditions) -> Result<Record, Failure> {
        match self.session.step() {
            Step::Idle => self.check_in(conditions),
            Step::Assigned { .. } => self.download(),
            Step::Downloaded { .. } => self.train_csv(csv),
            Step::Ready { .. } => self.upload(),
        }
    }

    /// Drops whatever is in hand; the session is idle again.
    pub fn reset(&mut self) -> Result<(), Failure> {
        Ok(self.session.reset()?)
    }
}
