//! The HTTP API (v1): JSON for control, safetensors for tensors, every error as
//! `{"error": {"code", "message"}}` with a fitting status. Handlers translate between HTTP and
//! the round engine and hold no logic of their own.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::engine::{CheckIn, EngineError, TaskHandle};
use crate::metrics::Metrics;
use crate::store::Store;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The tasks hosted.
    pub tasks: Arc<Vec<TaskHandle>>,
    /// Process-wide counters.
    pub metrics: Arc<Metrics>,
    /// The store (round history).
    pub store: Store,
}

impl AppState {
    fn task(&self, name: &str) -> Result<&TaskHandle, ApiError> {
        self.tasks.iter().find(|t| t.name() == name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_task",
                format!("no task named `{name}`"),
            )
        })
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Update(_)
                if e.code() == "malformed_update" || e.code() == "invalid_metadata" =>
            {
                StatusCode::BAD_REQUEST
            }
            EngineError::Update(_) => StatusCode::UNPROCESSABLE_ENTITY,
            EngineError::UnknownRound(_) => StatusCode::NOT_FOUND,
            EngineError::RoundClosed(_)
            | EngineError::StaleVersion { .. }
            | EngineError::Duplicate => StatusCode::CONFLICT,
            EngineError::UnknownToken(_) => StatusCode::FORBIDDEN,
            EngineError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
            let message = if status == StatusCode::SERVICE_UNAVAILABLE {
                "the server is shutting down"
            } else {
                "internal error"
            };
            return ApiError::new(status, e.code(), message);
        }
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        (self.status, body).into_response()
    }
}

/// The router of the whole API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .merge(crate::web::router())
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{task}", get(get_task))
        .route("/v1/tasks/{task}/model", get(get_model))
        .route("/v1/tasks/{task}/checkin", post(check_in))
        .route("/v1/tasks/{task}/rounds", get(rounds))
        .route("/v1/tasks/{task}/rounds/{round}/updates", post(upload))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
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

fn task_json(t: &TaskHandle) -> Value {
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
        // Small models (the demo's W and b) are shown inline; large ones are downloaded.
        "parameters": if t.spec().layout().numel() <= 64 { params } else { Value::Null },
    })
}

async fn list_tasks(State(s): State<AppState>) -> Json<Value> {
    Json(Value::Array(s.tasks.iter().map(task_json).collect()))
}

async fn get_task(
    State(s): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(task_json(s.task(&task)?)))
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
            header::HeaderName::from_static("x-starling-version"),
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

/// The optional body of a check-in.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckInBody {
    /// An opaque id the device chose for itself (at most one assignment per round).
    device: Option<String>,
}

async fn check_in(
    State(s): State<AppState>,
    Path(task): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t = s.task(&task)?;
    let body = body.map_err(|r| ApiError::new(r.status(), "bad_request", r.body_text()))?;
    let device = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let b: CheckInBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("check-in body: {e}"),
            )
        })?;
        if b.device
            .as_ref()
            .is_some_and(|d| d.is_empty() || d.len() > 128)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "a device id has 1 to 128 characters",
            ));
        }
        b.device
    };
    Ok(match t.check_in(device).await? {
        CheckIn::Assigned(a) => Json(json!({
            "status": "assigned",
            "round": a.round,
            "base_version": a.base_version,
            "token": a.token,
            "deadline_secs": a.deadline_in.as_secs_f64(),
            "plan": a.plan,
            "model_url": format!("/v1/tasks/{task}/model"),
            "upload_url": format!("/v1/tasks/{task}/rounds/{}/updates", a.round),
        }))
        .into_response(),
        CheckIn::Retry { after, reason } => (
            StatusCode::OK,
            [(header::RETRY_AFTER, after.as_secs_f64().ceil().to_string())],
            Json(json!({
                "status": "retry",
                "retry_after_secs": after.as_secs_f64(),
                "reason": reason,
            })),
        )
            .into_response(),
    })
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

async fn upload(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Refusals before the engine sees the update are counted here; the engine counts its own.
    let (t, round, body) =
        check_upload(&s, &task, &round, body).inspect_err(|e| s.metrics.count_refusal(e.code))?;
    let receipt = t.upload(round, body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({"status": "accepted", "round": receipt.round, "updates_in_round": receipt.updates_in_round}),
        ),
    ))
}

/// What can be checked of an upload before the engine: the task, the round number, the body.
fn check_upload<'s>(
    s: &'s AppState,
    task: &str,
    round: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<(&'s TaskHandle, u64, Bytes), ApiError> {
    let t = s.task(task)?;
    let round: u64 = round.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_round",
            format!("`{round}` is not a round number"),
        )
    })?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                r.body_text(),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_update", r.body_text())
        }
    })?;
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_update",
            "the update body is empty; send a safetensors file",
        ));
    }
    Ok((t, round, body))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.tasks),
    )
}
