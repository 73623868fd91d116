//! The HTTP API (v1): JSON for control, safetensors for tensors. Answers are the types of
//! [`starling_core::wire::protocol`]: [`CheckInAnswer`], [`UploadReceipt`], and for every refusal an
//! [`ErrorBody`] whose HTTP status is its [`ErrorCode`]'s ([`ErrorCode::status`]), never chosen
//! here. Handlers translate between HTTP and the round engine and hold no logic of their own,
//! beyond refusing what can be refused before a body is read.
//!
//! An upload is checked in this order, all before a byte of its body is read (so that an
//! `Expect: 100-continue` client is answered without being asked for the body): the task, the
//! round number (a canonical decimal on the *raw* path, so `+10`, `010` and `%31` are not round
//! numbers), the [`TOKEN_HEADER`], the declared `Content-Length` against the task's
//! [`TaskHandle::max_upload_bytes`], a slot among `max_uploads_in_flight` (none free: 503
//! `busy` with `Retry-After`), and the engine's [`TaskHandle::admit_upload`]. Only then is the
//! body read, within the same size limit (chunked bodies too) and `body_timeout_secs`, each
//! received chunk wiped once copied when this side holds it alone, and handed to
//! [`TaskHandle::upload`]. A client that hangs up mid-body is counted as
//! `client_disconnected`, not as a refusal.
//!
//! Errors that axum produces itself (a 405, a path it cannot decode) are turned into an
//! [`ErrorBody`] by the `json_errors` layer; the serving loop (`net.rs`) refuses URIs over
//! [`MAX_URI_BYTES`] before routing. Hyper's own answers to requests it cannot parse (400 for a
//! malformed request line or header, 431 for a head over the read buffer, 414 for a URI over
//! 64 KiB) are written before any service runs and carry no body; they cannot be made JSON
//! from here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use starling_core::wire::protocol::{
    parse_canonical_u64, to_hex, CheckInAnswer, CheckInRequest, EnrollAnswer, EnrollRequest,
    ErrorBody, ErrorCode, EvaluationReport, RoundKind, SecureAssignment, UploadReceipt,
    CREDENTIAL_SCHEME, MAX_DEVICE_ID, TOKEN_HEADER, VERSION_HEADER,
};
use tokio::sync::Semaphore;

use crate::credentials::{CredentialError, Credentials};
use crate::engine::{self, Caller, CheckIn, EngineError, Receipt, TaskHandle, Upload};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimits;
use crate::registry::Tasks;
use crate::settings::{Admission, Secret, SecureAggregationPolicy};
use crate::store::Store;

/// The longest request URI answered; longer ones get 414 `uri_too_long` (hyper's own limit,
/// which answers without a body, is far larger).
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The tasks hosted.
    pub tasks: Arc<Tasks>,
    /// The device credentials of enrolled tasks.
    pub credentials: Arc<Credentials>,
    /// Process-wide counters.
    pub metrics: Arc<Metrics>,
    /// The store (round history).
    pub store: Store,
    /// Limits on request bodies.
    pub limits: BodyLimits,
    /// Slots for upload bodies being received or checked (`max_uploads_in_flight`).
    pub uploads: Arc<Semaphore>,
    /// The admin API's token; `None` turns the admin API off.
    pub admin_token: Option<Secret>,
    /// Rate limits per client address and per device credential.
    pub rate_limits: Arc<RateLimits>,
    /// The header a proxy names the client's address in (`client_address_header`).
    pub client_address_header: Option<axum::http::HeaderName>,
}

/// Limits on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The largest body of every request but an upload (`max_body_bytes`); an upload's limit
    /// is its task's [`TaskHandle::max_upload_bytes`].
    pub max_body_bytes: usize,
    /// The time a client has to send a whole body (`body_timeout_secs`).
    pub body_timeout: Duration,
}

impl AppState {
    pub(crate) fn task(&self, name: &str) -> Result<TaskHandle, ApiError> {
        self.tasks.get(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownTask,
                format!("no task named `{}`", shown(name)),
            )
        })
    }
}

/// At most 64 characters of something the client sent, for a message.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// An error answer: a code (which fixes the status) and a message for people.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error answer with this code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// This error with a `Retry-After` header.
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 503 `busy` with `Retry-After: 1`.
    fn busy() -> Self {
        Self {
            retry_after_secs: Some(1),
            ..Self::new(ErrorCode::Busy, server_message(ErrorCode::Busy))
        }
    }
}

/// The message of a 5xx answer: generic, the details go to the log.
fn server_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Busy => "too many uploads are in flight; try again after Retry-After seconds",
        ErrorCode::Unavailable => "the task is shutting down; try again later",
        _ => "internal error; the details are in the server's log",
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = e.code();
        if code.status() >= 500 {
            if code == ErrorCode::Internal {
                tracing::error!(error = %e, %code, "request failed");
            } else {
                tracing::warn!(error = %e, %code, "request refused");
            }
            return ApiError::new(code, server_message(code));
        }
        ApiError::new(code, e.to_string())
    }
}

impl From<CredentialError> for ApiError {
    fn from(e: CredentialError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The router of the whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(crate::web::router())
        .merge(crate::dashboard::router())
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{task}", get(get_task))
        .route("/v1/tasks/{task}/model", get(get_model))
        .route("/v1/tasks/{task}/checkin", post(check_in))
        .route("/v1/tasks/{task}/enroll", post(enroll))
        .route("/v1/tasks/{task}/rounds", get(rounds))
        .route("/v1/tasks/{task}/privacy", get(privacy))
        .route("/v1/tasks/{task}/rounds/{round}/updates", post(upload))
        .route(
            "/v1/tasks/{task}/rounds/{round}/evaluations",
            post(evaluation),
        )
        .merge(crate::secure_api::router())
        .merge(crate::admin::router())
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::map_response(json_errors))
        .with_state(state)
}

/// Refuses a URI longer than [`MAX_URI_BYTES`]; the serving loop calls this before routing.
pub(crate) fn check_uri(uri: &Uri) -> Result<(), ApiError> {
    let len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if len > MAX_URI_BYTES {
        return Err(ApiError::new(
            ErrorCode::UriTooLong,
            format!("the URI has {len} bytes; the server reads at most {MAX_URI_BYTES}"),
        ));
    }
    Ok(())
}

/// The code of an error answer that axum (not a handler) produced, by its status.
fn code_for_status(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::URI_TOO_LONG => ErrorCode::UriTooLong,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    }
}

/// Turns an error answer that is not JSON (axum's 405, its extractors' rejections) into an
/// [`ErrorBody`] with the status of the matching code, keeping its other headers (`Allow`).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = code_for_status(status);
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let message = if code.status() >= 500 {
        tracing::error!(%status, message = text.as_deref().unwrap_or(""), "request failed");
        server_message(code).to_string()
    } else {
        text.unwrap_or_else(|| code.description().to_string())
    };
    let mut answer = ApiError::new(code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see /v1/openapi.json",
    )
}

async fn health(State(s): State<AppState>) -> Json<Value> {
    Json(json!({"status": "ok", "tasks": s.tasks.len()}))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

pub(crate) fn task_json(t: &TaskHandle) -> Value {
    let st = t.status();
    let params: Value = st
        .model
        .params
        .iter()
        .map(|(n, v)| {
            let value = if v.len() == 1 {
                json!(v.data()[0])
            } else {
                json!(v.data())
            };
            (n.to_string(), value)
        })
        .take(8)
        .collect::<serde_json::Map<_, _>>()
        .into();
    json!({
        "name": t.name(),
        "version": st.model.version,
        "round": st.round,
        "spec": t.spec(),
        "plan": t.plan(),
        "parameter_count": t.spec().layout().numel(),
        "mode": if t.buffered().is_some() { "buffered" } else { "rounds" },
        "buffered": t.buffered(),
        "secure_aggregation": t.secure_aggregation(),
        "status": if st.stopped.is_some() {
            "stopped"
        } else if st.paused {
            "paused"
        } else {
            "training"
        },
        "stopped_reason": st.stopped,
        "admission": t.admission().as_str(),
        "privacy": t.privacy().map(|p| json!({
            "budget": {"epsilon": p.epsilon, "delta": p.delta},
            "epsilon_spent": st.epsilon_spent,
        })),
        // Small models (the demo's W and b) are shown inline; large ones are downloaded.
        "parameters": if t.spec().layout().numel() <= 64 { params } else { Value::Null },
    })
}

async fn list_tasks(State(s): State<AppState>) -> Json<Value> {
    Json(Value::Array(s.tasks.all().iter().map(task_json).collect()))
}

async fn get_task(
    State(s): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(task_json(&s.task(&task)?)))
}

async fn get_model(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = s.task(&task)?;
    let model = t.status().model;
    let etag = format!("\"{}\"", model.version);
    let etag_value = HeaderValue::from_str(&etag).expect("digits and quotes are a valid header");
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let common = [
        (header::ETAG, etag_value),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::HeaderName::from_static(VERSION_HEADER),
            HeaderValue::from(model.version),
        ),
    ];
    if fresh {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    Ok((
        StatusCode::OK,
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        model.body,
    )
        .into_response())
}

async fn check_in(
    State(s): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let t = s.task(&task)?;
    let address = client_address(&s, &request);
    limit_address(&s, &request)?;
    let credential_device = authenticate(&s, &t, request.headers(), true)?;
    let body = read_control_body(
        &s,
        request.into_body(),
        "check-in body",
        ErrorCode::BadRequest,
    )
    .await?;
    let device = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let request: CheckInRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("check-in body: {e}")))?;
        if request
            .device
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > MAX_DEVICE_ID)
        {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("a device id has 1 to {MAX_DEVICE_ID} characters"),
            ));
        }
        request.device
    };
    // An enrolled device is known by its credential, whatever id it names itself.
    let device = credential_device.or(device);
    let name = t.name();
    Ok(match t.check_in(Caller { device, address }).await? {
        CheckIn::Assigned(a) => Json(CheckInAnswer::Assigned {
            round: a.round,
            kind: a.kind,
            base_version: a.base_version,
            token: a.token,
            deadline_secs: a.deadline_in.as_secs_f64(),
            plan: a.plan,
            model_url: format!("/v1/tasks/{name}/model"),
            upload_url: match a.kind {
                RoundKind::Training => format!("/v1/tasks/{name}/rounds/{}/updates", a.round),
                RoundKind::Evaluation => {
                    format!("/v1/tasks/{name}/rounds/{}/evaluations", a.round)
                }
            },
            secure: a.secure.map(|seat| SecureAssignment {
                index: seat.index as u64,
                devices: seat.params.devices as u64,
                min_survivors: seat.params.min_survivors as u64,
                input_bits: seat.params.fixed_point.input_bits,
                graph_seed: to_hex(&seat.params.graph_seed),
                input_len: seat.params.len as u64,
                clip: seat.spec.clip,
                loss_bound: seat.spec.loss_bound,
                weight_cap: seat.spec.weight_cap,
                skellam_mu: seat.spec.noise_mu,
                secure_url: format!("/v1/tasks/{name}/rounds/{}/secagg", a.round),
            }),
        })
        .into_response(),
        CheckIn::Retry { after, reason } => (
            StatusCode::OK,
            [(header::RETRY_AFTER, after.as_secs_f64().ceil().to_string())],
            Json(CheckInAnswer::Retry {
                retry_after_secs: after.as_secs_f64(),
                reason: reason.to_string(),
            }),
        )
            .into_response(),
    })
}

/// `GET /v1/tasks/{task}/privacy`: the task's privacy policy, its budget, the ε spent so
/// far, whether it still trains, and the ledger: one entry per committed round.
async fn privacy(
    State(s): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = s.task(&task)?;
    let st = t.status();
    let Some(policy) = t.privacy() else {
        return Ok(Json(json!({"task": t.name(), "enabled": false})));
    };
    let history = s.store.rounds(t.name()).await.map_err(EngineError::from)?;
    let ledger: Vec<Value> = history
        .iter()
        .filter_map(|r| {
            r.privacy.as_ref().map(|p| {
                json!({
                    "round": r.round,
                    "version": r.version,
                    "mechanism": p.mechanism,
                    "clip": p.clip,
                    "noise_multiplier": p.noise_multiplier,
                    "cohort": p.cohort,
                    "participants": r.participants,
                    "sampling_rate": p.sampling_rate,
                    "epsilon": p.epsilon,
                    "delta": p.delta,
                })
            })
        })
        .collect();
    Ok(Json(json!({
        "task": t.name(),
        "enabled": true,
        "mechanism": match t.secure_aggregation() {
            Some(_) => engine::privacy::DISTRIBUTED_MECHANISM,
            None => engine::privacy::MECHANISM,
        },
        "clip": policy.clip,
        "noise_multiplier": policy.noise_multiplier,
        "population": policy.population,
        // Under secure aggregation up to every place of a round may be in its sum.
        "sampling_rate": match t.secure_aggregation() {
            Some(_) => (SecureAggregationPolicy::places(t.policy()) as f64
                / policy.population as f64)
                .min(1.0),
            None => policy.sampling_rate(t.policy().goal),
        },
        "budget": {"epsilon": policy.epsilon, "delta": policy.delta},
        "epsilon_spent": st.epsilon_spent,
        "status": if st.stopped.is_some() { "stopped" } else { "training" },
        "stopped_reason": st.stopped,
        "ledger": ledger,
    })))
}

async fn rounds(
    State(s): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let t = s.task(&task)?;
    let history = s.store.rounds(t.name()).await.map_err(EngineError::from)?;
    Ok(Json(
        json!({"task": t.name(), "current": t.status().round, "rounds": history}),
    ))
}

async fn upload(State(s): State<AppState>, request: Request) -> Response {
    // A body the server refuses before reading it stays unread on the connection: the answer
    // says `Connection: close`, so the client does not send its next request after it.
    let has_body = request.body().size_hint().exact() != Some(0);
    let read = std::sync::atomic::AtomicBool::new(false);
    match receive_upload(&s, request, &read).await {
        Ok(receipt) => (
            StatusCode::ACCEPTED,
            Json(UploadReceipt {
                status: "accepted".into(),
                round: receipt.round,
                updates_in_round: receipt.updates_in_round,
            }),
        )
            .into_response(),
        Err(e) => {
            let mut response = e.into_response();
            if has_body && !read.load(std::sync::atomic::Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    }
}

/// `POST /v1/tasks/{task}/rounds/{round}/evaluations`: a device's [`EvaluationReport`] for
/// an evaluation round, with its token in the header. A small JSON body, read under
/// `max_body_bytes` like a check-in's.
async fn evaluation(
    State(s): State<AppState>,
    Path((task, round_text)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let t = s.task(&task)?;
    let round = parse_canonical_u64(&round_text).ok_or_else(|| {
        ApiError::new(
            ErrorCode::UnknownRound,
            format!(
                "`{}` is not a round number (plain decimal digits, no sign or leading zero)",
                shown(&round_text)
            ),
        )
    })?;
    let token = token_header(request.headers())?;
    limit_address(&s, &request)?;
    let device = authenticate(&s, &t, request.headers(), false)?;
    let body = read_control_body(
        &s,
        request.into_body(),
        "evaluation report",
        ErrorCode::InvalidMetadata,
    )
    .await?;
    let report: EvaluationReport = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidMetadata,
            format!(
                "an evaluation report is {{\"base_version\", \"examples\", \"loss\", \
                 \"accuracy\"?}}: {e}"
            ),
        )
    })?;
    let receipt = t.evaluate(round, &token, device.as_deref(), report).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(UploadReceipt {
            status: "accepted".into(),
            round: receipt.round,
            updates_in_round: receipt.updates_in_round,
        }),
    )
        .into_response())
}

/// The raw (still percent-encoded) `i`th segment of the request's path.
fn raw_segment(uri: &Uri, i: usize) -> &str {
    uri.path().split('/').nth(i).unwrap_or("")
}

/// Counts an upload as `client_disconnected` if it is dropped while armed: hyper drops a
/// request's handler when its connection fails, which is how most hang-ups mid-body end.
struct HangUpWatch<'m> {
    metrics: &'m Metrics,
    armed: bool,
}

impl Drop for HangUpWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.count_client_disconnected();
        }
    }
}

/// Checks, reads and hands over one upload; see the module's docs for the order.
async fn receive_upload(
    s: &AppState,
    request: Request,
    read: &std::sync::atomic::AtomicBool,
) -> Result<Receipt, ApiError> {
    // Refusals before `TaskHandle::upload` are counted here; the engine counts its own.
    let refuse = |e: ApiError| {
        s.metrics.count_refusal(e.code());
        e
    };
    limit_address(s, &request).map_err(refuse)?;
    let (parts, body) = request.into_parts();
    // The route is /v1/tasks/{task}/rounds/{round}/updates.
    let t = s.task(raw_segment(&parts.uri, 3)).map_err(refuse)?;
    let round_text = raw_segment(&parts.uri, 5);
    let round = parse_canonical_u64(round_text).ok_or_else(|| {
        refuse(ApiError::new(
            ErrorCode::UnknownRound,
            format!(
                "`{}` is not a round number (plain decimal digits, no sign or leading zero)",
                shown(round_text)
            ),
        ))
    })?;
    let token = token_header(&parts.headers).map_err(refuse)?;
    let device = authenticate(s, &t, &parts.headers, false).map_err(refuse)?;
    let limit = t.max_upload_bytes();
    let declared = body.size_hint().exact();
    if let Some(n) = declared {
        if n > limit as u64 {
            return Err(refuse(too_large(limit)));
        }
        if n == 0 {
            return Err(refuse(empty_upload()));
        }
    }
    let Ok(_slot) = s.uploads.clone().try_acquire_owned() else {
        tracing::debug!(task = t.name(), round, "upload refused: too many in flight");
        return Err(refuse(ApiError::busy()));
    };
    let _in_flight = s.metrics.track_upload();
    t.admit_upload(round, &token, device.as_deref())
        .await
        .map_err(|e| refuse(e.into()))?;

    let mut hang_up = HangUpWatch {
        metrics: &s.metrics,
        armed: true,
    };
    let received = read_body(body, limit, s.limits.body_timeout).await;
    hang_up.armed = false;
    read.store(
        matches!(received, Ok(_) | Err(BodyError::Malformed(_))),
        std::sync::atomic::Ordering::Relaxed,
    );
    let body = match received {
        Ok(body) => body,
        Err(BodyError::TooLarge) => return Err(refuse(too_large(limit))),
        Err(BodyError::TimedOut) => {
            return Err(refuse(ApiError::new(
                ErrorCode::RequestTimeout,
                format!(
                    "the update did not arrive within {} s",
                    s.limits.body_timeout.as_secs_f64()
                ),
            )))
        }
        Err(BodyError::Disconnected) => {
            // Nobody will read this answer; the hang-up is counted, not the refusal.
            s.metrics.count_client_disconnected();
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the connection closed before the whole body arrived",
            ));
        }
        Err(BodyError::Malformed(m)) => {
            return Err(refuse(ApiError::new(
                ErrorCode::MalformedUpdate,
                format!("the body could not be read: {m}"),
            )))
        }
    };
    if body.is_empty() {
        return Err(refuse(empty_upload()));
    }
    Ok(t.upload(
        round,
        Upload {
            token: Some(token),
            body,
        },
    )
    .await?)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("an update of this task has at most {limit} bytes"),
    )
}

fn empty_upload() -> ApiError {
    ApiError::new(
        ErrorCode::MalformedUpdate,
        "the update body is empty; send a safetensors file",
    )
}

/// Why a body was not read whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over the limit, declared or counted.
    TooLarge,
    /// Not whole within the timeout.
    TimedOut,
    /// The client hung up (or its connection failed) before the end.
    Disconnected,
    /// Not valid HTTP framing (a broken chunked encoding).
    Malformed(String),
}

impl BodyError {
    fn from_transport(e: axum::Error) -> Self {
        let inner = e.into_inner();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*inner);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                ) {
                    return BodyError::Malformed(io.to_string());
                }
            }
            source = e.source();
        }
        BodyError::Disconnected
    }
}

/// Reads a whole body of at most `limit` bytes within `timeout` into one buffer, allocated
/// once from `Content-Length` when there is one. (The `starling` binary's allocator zeroes
/// every buffer this frees, the HTTP library's included.)
/// The assignment's token from the `X-Starling-Token` header.
pub(crate) fn token_header(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get(TOKEN_HEADER).map(HeaderValue::to_str) {
        None => Err(ApiError::new(
            ErrorCode::MissingToken,
            "send the assignment's token in the X-Starling-Token header",
        )),
        Some(Err(_)) => Err(ApiError::new(
            ErrorCode::InvalidToken,
            "the X-Starling-Token header is not a token",
        )),
        Some(Ok(t)) => Ok(t.to_string()),
    }
}

/// A small control body (a check-in's, an evaluation report), read under `max_body_bytes`
/// and `body_timeout_secs`; `what` names it in the errors, and a body that ends early or
/// cannot be read is answered with `malformed`.
pub(crate) async fn read_control_body(
    s: &AppState,
    body: Body,
    what: &str,
    malformed: ErrorCode,
) -> Result<Vec<u8>, ApiError> {
    let limit = s.limits.max_body_bytes;
    read_body(body, limit, s.limits.body_timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the {what} may have at most {limit} bytes"),
            ),
            BodyError::TimedOut => ApiError::new(
                ErrorCode::RequestTimeout,
                format!("the {what} did not arrive in time"),
            ),
            BodyError::Disconnected => ApiError::new(malformed, format!("the {what} ended early")),
            BodyError::Malformed(m) => ApiError::new(malformed, format!("{what}: {m}")),
        })
}

pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, BodyError> {
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut buffer = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(limit));
    let read = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(BodyError::from_transport)?.into_data() else {
                continue; // trailers
            };
            if buffer.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buffer.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(buffer),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.tasks.all()),
    )
}

/// The device an enrolled task's request comes from, by its credential
/// (`Authorization: Bearer <credential>`); `None` for an open task, whose devices carry none.
/// A check-in (`check_in`) is counted in the device's activity.
pub(crate) fn authenticate(
    s: &AppState,
    t: &TaskHandle,
    headers: &HeaderMap,
    check_in: bool,
) -> Result<Option<String>, ApiError> {
    if t.admission() == Admission::Open {
        return Ok(None);
    }
    let credential = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(CREDENTIAL_SCHEME))
        .map(|(_, c)| c.trim());
    let device = s.credentials.authenticate(t.name(), credential, check_in)?;
    s.rate_limits
        .check_credential(&s.metrics, t.name(), &device)?;
    Ok(Some(device))
}

/// Counts a device's request against its address's rate limit.
pub(crate) fn limit_address(s: &AppState, request: &Request) -> Result<(), ApiError> {
    s.rate_limits
        .check_address(&s.metrics, client_address(s, request))
}

/// `POST /v1/tasks/{task}/enroll`: a device presents the task's enrollment secret once and
/// gets its own credential (201). An open task takes no enrollment.
async fn enroll(
    State(s): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let t = s.task(&task)?;
    if t.admission() == Admission::Open {
        return Err(ApiError::new(
            ErrorCode::EnrollmentRefused,
            format!(
                "task `{}` is open to every device: no enrollment needed",
                t.name()
            ),
        ));
    }
    limit_address(&s, &request)?;
    let address = client_address(&s, &request);
    s.rate_limits.enrollment.check(&s.metrics, address)?;
    let body = read_control_body(
        &s,
        request.into_body(),
        "enrollment body",
        ErrorCode::BadRequest,
    )
    .await?;
    let request: EnrollRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("an enrollment is {{\"secret\", \"label\"?}}: {e}"),
        )
    })?;
    if request
        .label
        .as_ref()
        .is_some_and(|l| l.is_empty() || l.len() > MAX_DEVICE_ID)
    {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("a device label has 1 to {MAX_DEVICE_ID} characters"),
        ));
    }
    if !t.enrollment_secret_matches(&request.secret) {
        if s.rate_limits.enrollment.failed(address) {
            // The first of its minute from this address: a flood is not logged line by line.
            tracing::warn!(task = t.name(), "enrollment refused: wrong secret");
        }
        return Err(ApiError::new(
            ErrorCode::EnrollmentRefused,
            format!("wrong enrollment secret for task `{}`", t.name()),
        ));
    }
    let (device, credential) = s
        .credentials
        .enroll(t.name(), request.label)
        .await
        .map_err(EngineError::from)?;
    tracing::info!(task = t.name(), %device, "device enrolled");
    Ok((
        StatusCode::CREATED,
        Json(EnrollAnswer {
            task: t.name().to_string(),
            device,
            credential,
        }),
    )
        .into_response())
}

/// The client's address: the last entry of the proxy's header when the settings name one (the
/// entry the nearest proxy added; earlier ones are the client's to forge), else the peer.
pub(crate) fn client_address(s: &AppState, request: &Request) -> Option<std::net::IpAddr> {
    let forwarded = s.client_address_header.as_ref().and_then(|name| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|a| a.trim().parse::<std::net::IpAddr>().ok())
    });
    forwarded
        .or_else(|| {
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        })
        .map(|ip| ip.to_canonical())
}
