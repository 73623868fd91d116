//! The Starling device SDK for Python: the extension module `starling._native`, which the
//! pure-Python package `starling` (in `python/starling/`) re-exports. It wraps
//! [`starling_client::Session`], the resumable device session, for a host that trains with
//! NumPy, PyTorch or anything else that yields arrays:
//!
//! - `Device`: one session over HTTP, saved in a folder; each step one method, the network and
//!   training steps run with the GIL released, on one Tokio runtime the module shares.
//! - `Outcome`: what a step did, as a `kind` and the fields of that kind.
//! - `StarlingError`: every failure, with the error's `kind` and, for a server's refusal, its
//!   `code` name and HTTP `status`; a panic in Rust is one too, never a crash.
//! - `enroll`: a credential for an enrolled task.
//!
//! Arrays cross as float32 NumPy arrays keyed by tensor name; weights a host submits are
//! checked here against the downloaded model (the names, the shapes, finite values) before
//! anything is sent. The Python API is documented in `python/starling/__init__.py` and in the
//! README's "SDK: Python".

// PyO3's `#[pymodule]`, `#[pyclass]` and `#[pymethods]` expand to `unsafe` FFI glue (the
// module init function, type objects, argument parsing). The workspace denies `unsafe`; this
// crate allows it for that generated code only and writes none of its own.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::OnceLock;

use numpy::{AllowTypeChange, PyArray1, PyArrayLikeDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use starling_client::session::{Outcome as StepOutcome, Session};
use starling_client::{ClientError, HttpTransport};
use starling_core::data::TargetColumn;
use starling_core::wire::protocol::RoundKind;
use starling_core::{Conditions, Parameters, Tensor};

create_exception!(
    starling,
    StarlingError,
    PyException,
    "Any failure of the Starling SDK. `kind` names it (`refused`, `unreachable`, `protocol`, \
     `tls`, `data`, `state`, `train`, `gave_up`, `internal`); for a server's refusal, `code` is \
     the server's error code name (e.g. `invalid_credential`) and `status` the HTTP status; \
     both are None otherwise."
);

/// Why a call failed, before it becomes a `StarlingError` (built once the GIL is held again).
#[derive(Debug)]
enum Failure {
    Client(ClientError),
    /// A panic in Rust: a bug, reported as an error rather than a crash.
    Panic(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn data_error(message: String) -> Failure {
    Failure::Client(ClientError::Data(message))
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> Self {
        let (kind, message, code, status) = match f {
            Failure::Panic(m) => (
                "internal",
                format!("internal error (a bug in Starling): {m}"),
                None,
                None,
            ),
            Failure::Client(e) => {
                let (kind, code, status) = match &e {
                    ClientError::Refused {
                        status, code_name, ..
                    } => ("refused", Some(code_name.clone()), Some(*status)),
                    ClientError::Unreachable(_) => ("unreachable", None, None),
                    ClientError::Protocol(_) => ("protocol", None, None),
                    ClientError::Tls(_) => ("tls", None, None),
                    ClientError::Data(_) => ("data", None, None),
                    ClientError::State(_) => ("state", None, None),
                    ClientError::Train(_) => ("train", None, None),
                    ClientError::GaveUp { .. } => ("gave_up", None, None),
                };
                (kind, e.to_string(), code, status)
            }
        };
        Python::attach(|py| {
            let err = StarlingError::new_err(message);
            let value = err.value(py);
            // Setting attributes on a fresh exception object cannot fail in practice; if it
            // did, the error still carries its message.
            let _ = value.setattr("kind", kind);
            let _ = value.setattr("code", code);
            let _ = value.setattr("status", status);
            err
        })
    }
}

/// Runs `f`, turning a panic into [`Failure::Panic`].
fn guarded<T>(f: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        Err(Failure::Panic(message))
    })
}

/// The runtime every device's network calls run on: one for the module, so that the HTTP
/// clients' pooled connections outlive any one call.
fn runtime() -> Result<&'static tokio::runtime::Runtime, Failure> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("starling-io")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Failure::Client(ClientError::State(format!("cannot start a runtime: {e}"))))
}

/// Runs `f` without the GIL (network and training), guarded against panics.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Failure> + Send) -> PyResult<T> {
    py.detach(|| guarded(f)).map_err(PyErr::from)
}

/// A transport to `server`, trusting `ca_cert` too when given: PEM bytes, or the path of a PEM
/// file.
fn transport(server: &str, ca_cert: Option<&Bound<'_, PyAny>>) -> PyResult<HttpTransport> {
    let Some(ca) = ca_cert else {
        return Ok(HttpTransport::new(server));
    };
    let pem = if let Ok(bytes) = ca.cast::<PyBytes>() {
        bytes.as_bytes().to_vec()
    } else {
        let path: PathBuf = ca.extract()?;
        std::fs::read(&path).map_err(|e| {
            data_error(format!(
                "cannot read the CA certificate {}: {e}",
                path.display()
            ))
        })?
    };
    Ok(HttpTransport::with_ca_certificates(server, &pem).map_err(Failure::from)?)
}

/// What a step did: `kind` is one of `assigned`, `wait`, `not_eligible`, `downloaded`,
/// `trained`, `scored`, `delivered`, `dropped`; the fields of that kind are set, the others
/// are None.
#[pyclass(module = "starling._native", frozen, get_all, eq)]
#[derive(Debug, Clone, Default, PartialEq)]
struct Outcome {
    /// What happened.
    kind: String,
    /// `assigned`: the round; `delivered`: the round the update went into.
    round: Option<u64>,
    /// `assigned`: `training` or `evaluation`.
    round_kind: Option<String>,
    /// `downloaded`: the model's version; `scored`: the version scored.
    version: Option<u64>,
    /// `trained`, `scored`: the examples.
    examples: Option<u64>,
    /// `trained`, `scored`: the local loss, when known.
    loss: Option<f64>,
    /// `scored`: the accuracy, when known.
    accuracy: Option<f64>,
    /// `wait`: seconds to wait before checking in again.
    secs: Option<f64>,
    /// `wait`, `not_eligible`, `dropped`: why.
    reason: Option<String>,
    /// `delivered`: updates in the round so far (None when an earlier try delivered it).
    updates_in_round: Option<u64>,
}

fn round_kind_name(kind: RoundKind) -> &'static str {
    match kind {
        RoundKind::Training => "training",
        RoundKind::Evaluation => "evaluation",
    }
}

impl From<StepOutcome> for Outcome {
    fn from(o: StepOutcome) -> Self {
        let kind = |k: &str| k.to_string();
        match o {
            StepOutcome::NotEligible { reason } => Outcome {
                kind: kind("not_eligible"),
                reason: Some(reason),
                ..Outcome::default()
            },
            StepOutcome::Wait { secs, reason } => Outcome {
                kind: kind("wait"),
                secs: Some(secs),
                reason: Some(reason),
                ..Outcome::default()
            },
            StepOutcome::Assigned { round, kind: k } => Outcome {
                kind: kind("assigned"),
                round: Some(round),
                round_kind: Some(round_kind_name(k).to_string()),
                ..Outcome::default()
            },
            StepOutcome::Downloaded { version } => Outcome {
                kind: kind("downloaded"),
                version: Some(version),
                ..Outcome::default()
            },
            StepOutcome::Trained { examples, loss } => Outcome {
                kind: kind("trained"),
                examples: Some(examples),
                loss: loss.map(f64::from),
                ..Outcome::default()
            },
            StepOutcome::Scored { report } => Outcome {
                kind: kind("scored"),
                version: Some(report.base_version),
                examples: Some(report.examples),
                loss: Some(report.loss),
                accuracy: report.accuracy,
                ..Outcome::default()
            },
            StepOutcome::Delivered {
                round,
                updates_in_round,
            } => Outcome {
                kind: kind("delivered"),
                round: Some(round),
                updates_in_round,
                ..Outcome::default()
            },
            StepOutcome::Dropped { reason } => Outcome {
                kind: kind("dropped"),
                reason: Some(reason),
                ..Outcome::default()
            },
        }
    }
}

#[pymethods]
impl Outcome {
    fn __repr__(&self) -> String {
        let mut fields = vec![format!("kind={:?}", self.kind)];
        let mut add = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                fields.push(format!("{name}={v}"));
            }
        };
        add("round", self.round.map(|v| v.to_string()));
        add(
            "round_kind",
            self.round_kind.as_ref().map(|v| format!("{v:?}")),
        );
        add("version", self.version.map(|v| v.to_string()));
        add("examples", self.examples.map(|v| v.to_string()));
        add("loss", self.loss.map(|v| v.to_string()));
        add("accuracy", self.accuracy.map(|v| v.to_string()));
        add("secs", self.secs.map(|v| v.to_string()));
        add("reason", self.reason.as_ref().map(|v| format!("{v:?}")));
        add(
            "updates_in_round",
            self.updates_in_round.map(|v| v.to_string()),
        );
        format!("Outcome({})", fields.join(", "))
    }
}

/// A device's session with one task on one server, saved in `state_dir` between steps (a
/// new `Device` on the same folder goes on where the last one stopped).
#[pyclass(module = "starling._native")]
struct Device {
    session: Session<HttpTransport>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.session.fmt(f)
    }
}

/// `arrays` (a dict of array-likes by tensor name) as parameters in the order and shapes of
/// `model`'s: a missing, extra or reshaped tensor is a data error.
fn parameters(
    arrays: &Bound<'_, PyDict>,
    model: &Parameters,
    what: &str,
) -> Result<Parameters, PyErr> {
    let mut given = HashSet::new();
    for key in arrays.keys() {
        let name: String = key.extract().map_err(|_| {
            data_error(format!(
                "the {what} must be keyed by tensor name (str): {key}"
            ))
        })?;
        if model.get(&name).is_none() {
            let names: Vec<&str> = model.iter().map(|(n, _)| n).collect();
            return Err(data_error(format!(
                "the {what} name a tensor `{name}` the model does not have (it has {})",
                names.join(", ")
            ))
            .into());
        }
        given.insert(name);
    }
    let mut tensors = Vec::with_capacity(model.len());
    for (name, expected) in model.iter() {
        let value = arrays
            .get_item(name)?
            .ok_or_else(|| data_error(format!("the {what} lack the tensor `{name}`")))?;
        let array: PyArrayLikeDyn<'_, f32, AllowTypeChange> = value.extract().map_err(|e| {
            data_error(format!(
                "the {what}' tensor `{name}` is not an array of numbers: {e}"
            ))
        })?;
        if array.shape() != expected.shape() {
            return Err(data_error(format!(
                "the {what}' tensor `{name}` has shape {:?}; the model's is {:?}",
                array.shape(),
                expected.shape()
            ))
            .into());
        }
        let data: Vec<f32> = array.as_array().iter().copied().collect();
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(data_error(format!(
                "the {what}' tensor `{name}` holds a value that is not finite ({} at flat index \
                 {i})",
                data[i]
            ))
            .into());
        }
        let tensor = Tensor::new(expected.shape().to_vec(), data)
            .ok_or_else(|| data_error(format!("the {what}' tensor `{name}` is malformed")))?;
        tensors.push((name.to_string(), tensor));
    }
    Ok(Parameters::new(tensors).map_err(|e| data_error(e.to_string()))?)
}

#[pymethods]
impl Device {
    /// Opens (or resumes) the session in `state_dir` with `task` on `server`.
    #[new]
    #[pyo3(signature = (server, task, state_dir, credential = None, ca_cert = None))]
    fn new(
        server: &str,
        task: &str,
        state_dir: PathBuf,
        credential: Option<&str>,
        ca_cert: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut t = transport(server, ca_cert)?;
        if let Some(c) = credential {
            t = t.with_credential(c);
        }
        let session = guarded(|| {
            let _runtime = runtime()?.enter();
            Ok(Session::open(t, task, &state_dir)?)
        })?;
        Ok(Device { session })
    }

    /// The step the session is at: `idle`, `assigned`, `downloaded` or `ready`.
    #[getter]
    fn step(&self) -> &'static str {
        self.session.step().name()
    }

    /// The task.
    #[getter]
    fn task(&self) -> String {
        self.session.task().to_string()
    }

    /// The device's id (kept in the state folder).
    #[getter]
    fn device_id(&self) -> String {
        self.session.device_id().to_string()
    }

    /// The version of the model the assignment in hand trains (or scores); None when idle.
    #[getter]
    fn version(&self) -> Option<u64> {
        self.session.step().assignment().map(|a| a.base_version)
    }

    /// The round of the assignment in hand; None when idle.
    #[getter]
    fn round(&self) -> Option<u64> {
        self.session.step().assignment().map(|a| a.round)
    }

    /// `training` or `evaluation` for the assignment in hand; None when idle.
    #[getter]
    fn round_kind(&self) -> Option<&'static str> {
        self.session
            .step()
            .assignment()
            .map(|a| round_kind_name(a.kind))
    }

    /// The assignment's plan (epochs, batch size, learning rate, ...) as a dict, for a host
    /// that trains the way the task asks; None when idle.
    #[getter]
    fn plan<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(a) = self.session.step().assignment() else {
            return Ok(None);
        };
        let json = serde_json::to_string(&a.plan)
            .map_err(|e| Failure::Client(ClientError::State(e.to_string())))?;
        Ok(Some(py.import("json")?.call_method1("loads", (json,))?))
    }

    /// Checks in when the device's conditions meet the task's requirements (a condition left
    /// None is unknown). Needs step `idle`.
    #[pyo3(signature = (charging = None, idle = None, unmetered = None, battery = None))]
    fn check_in(
        &mut self,
        py: Python<'_>,
        charging: Option<bool>,
        idle: Option<bool>,
        unmetered: Option<bool>,
        battery: Option<f32>,
    ) -> PyResult<Outcome> {
        let conditions = Conditions {
            charging,
            idle,
            unmetered,
            battery,
        };
        let session = &mut self.session;
        detached(py, || {
            Ok(runtime()?.block_on(session.check_in(&conditions))?.into())
        })
    }

    /// Downloads the assignment's model. Needs step `assigned`.
    fn download(&mut self, py: Python<'_>) -> PyResult<Outcome> {
        let session = &mut self.session;
        detached(py, || Ok(runtime()?.block_on(session.download())?.into()))
    }

    /// The downloaded model: a dict of float32 arrays by tensor name. Needs step
    /// `downloaded` or `ready`.
    fn model<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let checkpoint = guarded(|| Ok(self.session.model()?))?;
        let arrays = PyDict::new(py);
        for (name, tensor) in checkpoint.params.iter() {
            let flat = PyArray1::from_vec(py, tensor.data().to_vec());
            arrays.set_item(name, flat.reshape(tensor.shape())?)?;
        }
        Ok(arrays)
    }

    /// Submits the host's own training: exactly one of `weights` (the new weights) or `delta`
    /// (their difference from the downloaded model), each a dict of arrays by tensor name in
    /// the model's shapes; `examples` trained on; the local `loss` if known. Checked before
    /// anything is sent. Needs step `downloaded`.
    #[pyo3(signature = (weights = None, delta = None, *, examples, loss = None))]
    fn submit(
        &mut self,
        py: Python<'_>,
        weights: Option<&Bound<'_, PyDict>>,
        delta: Option<&Bound<'_, PyDict>>,
        examples: u64,
        loss: Option<f32>,
    ) -> PyResult<Outcome> {
        let model = guarded(|| Ok(self.session.model()?))?;
        let (arrays, is_delta) = match (weights, delta) {
            (Some(w), None) => (w, false),
            (None, Some(d)) => (d, true),
            _ => return Err(data_error("give exactly one of `weights` and `delta`".into()).into()),
        };
        let what = if is_delta { "delta" } else { "weights" };
        let params = parameters(arrays, &model.params, what)?;
        drop(model);
        // Encoding and checking the update is the model's size in work: without the GIL.
        let session = &mut self.session;
        detached(py, || {
            let outcome = if is_delta {
                session.submit_delta(&params, examples, loss)?
            } else {
                session.submit_params(&params, examples, loss)?
            };
            Ok(outcome.into())
        })
    }

    /// An evaluation round's score: `examples` scored, their mean `loss` and (classifiers)
    /// mean `accuracy`. Needs step `downloaded` in an evaluation round.
    #[pyo3(signature = (examples, loss, accuracy = None))]
    fn submit_evaluation(
        &mut self,
        examples: u64,
        loss: f64,
        accuracy: Option<f64>,
    ) -> PyResult<Outcome> {
        let session = &mut self.session;
        Ok(guarded(|| Ok(session.submit_evaluation(examples, loss, accuracy)?))?.into())
    }

    /// Trains the downloaded model on the CSV file at `path` with the built-in trainer and the
    /// assignment's plan (or scores it, in an evaluation round). `target` is the target
    /// column: its 0-based index or its header name; the last column by default. Needs step
    /// `downloaded`.
    #[pyo3(signature = (path, target = None))]
    fn train_csv(
        &mut self,
        py: Python<'_>,
        path: PathBuf,
        target: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Outcome> {
        let target = match target {
            None => TargetColumn::Last,
            Some(t) => match t.extract::<usize>() {
                Ok(i) => TargetColumn::Index(i),
                Err(_) => TargetColumn::Name(t.extract()?),
            },
        };
        let session = &mut self.session;
        detached(py, || {
            let data = starling_client::data::load_csv(&path, &target)?;
            Ok(session.train(&data)?.into())
        })
    }

    /// Uploads the update (or the score). Needs step `ready`.
    fn upload(&mut self, py: Python<'_>) -> PyResult<Outcome> {
        let session = &mut self.session;
        detached(py, || Ok(runtime()?.block_on(session.upload())?.into()))
    }

    /// Drops whatever is in hand and goes back to step `idle`.
    fn reset(&mut self) -> PyResult<()> {
        let session = &mut self.session;
        Ok(guarded(|| Ok(session.reset()?))?)
    }

    fn __repr__(&self) -> String {
        format!(
            "Device(task={:?}, step={:?}, state_dir={:?})",
            self.session.task(),
            self.session.step().name(),
            self.session.dir()
        )
    }
}

/// Enrolls a device in an enrolled task with the task's enrollment `secret`; answers the
/// device's credential (shown this once: keep it privately, pass it to `Device`).
#[pyfunction]
#[pyo3(signature = (server, task, secret, label = None, ca_cert = None))]
fn enroll(
    py: Python<'_>,
    server: &str,
    task: &str,
    secret: &str,
    label: Option<&str>,
    ca_cert: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let t = transport(server, ca_cert)?;
    detached(py, || {
        let answer = runtime()?.block_on(t.enroll(task, secret, label))?;
        Ok(answer.credential)
    })
}

/// A panic inside the extension, on purpose: the tests check that it arrives as a
/// `StarlingError`, not as a crash.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    detached(py, || -> Result<(), Failure> {
        panic!("on purpose, for the tests")
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let error = py.get_type::<StarlingError>();
    for attr in ["kind", "code", "status"] {
        error.setattr(attr, py.None())?;
    }
    m.add("StarlingError", error)?;
    m.add_class::<Device>()?;
    m.add_class::<Outcome>()?;
    m.add_function(wrap_pyfunction!(enroll, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
