//! The admin API (`/v1/admin/...`): operating a running server. Every call needs the admin
//! token (`server.admin_token` or `STARLING_ADMIN_TOKEN`) in `X-Starling-Admin-Token`, checked
//! before a byte of the body is read; without a configured token the admin API is off. The
//! token is compared by digest and never logged.
//!
//! - `POST /v1/admin/tasks` (TOML task settings; `?paused=true` to create it paused) and
//!   `PUT /v1/admin/tasks/{task}` (new settings) and `DELETE /v1/admin/tasks/{task}`: tasks at
//!   run time ([`crate::registry`]). A task of your own model (`model = "external"`) is
//!   created with a JSON body, `{"settings": TOML, "initial_model": base64 safetensors}`.
//! - `POST /v1/admin/tasks/{task}/pause` and `/resume`.
//! - `PUT /v1/admin/tasks/{task}/model`: a safetensors file of the task's tensors becomes its
//!   next version (an initial model of the operator's own).
//! - `POST /v1/admin/tasks/{task}/rollback`: back to a stored version.
//! - `GET /v1/admin/tasks/{task}/devices` and `/credentials`; `POST
//!   /v1/admin/tasks/{task}/devices/{device}/revoke`.

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use starling_core::wire::params::Parameters;
use starling_core::wire::protocol::{
    ErrorCode, RollbackAnswer, RollbackRequest, ADMIN_TOKEN_HEADER,
};

use crate::api::{read_body, read_control_body, shown, task_json, ApiError, AppState, BodyError};
use crate::engine::EngineError;
use crate::registry::RegistryError;

/// The admin routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/tasks", post(create_task))
        .route(
            "/v1/admin/tasks/{task}",
            put(replace_task).delete(delete_task),
        )
        .route("/v1/admin/tasks/{task}/pause", post(pause))
        .route("/v1/admin/tasks/{task}/resume", post(resume))
        .route("/v1/admin/tasks/{task}/model", put(install_model))
        .route("/v1/admin/tasks/{task}/rollback", post(rollback))
        .route("/v1/admin/tasks/{task}/devices", get(devices))
        .route("/v1/admin/tasks/{task}/credentials", get(credentials))
        .route(
            "/v1/admin/tasks/{task}/devices/{device}/revoke",
            post(revoke),
        )
}

/// Lets an admin call through only with the admin token. Both tokens are hashed before they
/// are compared, so the comparison's timing reveals nothing about the token; neither is
/// ever logged.
fn check_admin(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.admin_token else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the admin API is off: set server.admin_token (or STARLING_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(ADMIN_TOKEN_HEADER)
        .map_or(&[][..], HeaderValue::as_bytes);
    if Sha256::digest(given) == Sha256::digest(token.expose().as_bytes()) {
        Ok(())
    } else {
        tracing::warn!("admin call refused: missing or wrong admin token");
        Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the X-Starling-Admin-Token header is missing or wrong",
        ))
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::new(ErrorCode::InvalidSettings, m),
            RegistryError::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
            RegistryError::Unknown(name) => ApiError::new(
                ErrorCode::UnknownTask,
                format!("no task named `{}`", shown(&name)),
            ),
            RegistryError::Engine(e) => e.into(),
            RegistryError::Store(e) => EngineError::from(e).into(),
        }
    }
}

/// The query of `POST /v1/admin/tasks`.
#[derive(Debug, serde::Deserialize)]
struct CreateQuery {
    /// Create the task paused.
    #[serde(default)]
    paused: bool,
}

/// The largest body of a task created with its initial model (base64 in JSON): 256 MiB. Only
/// an operator holding the admin token gets to send one.
const MAX_ADMIN_MODEL_BODY: usize = 256 << 20;

/// A body that carries a model, read under `limit` bytes; `what` names it in the messages,
/// and a body that breaks off is refused with `unreadable`.
async fn read_model_body(
    s: &AppState,
    request: Request,
    limit: usize,
    what: &str,
    unreadable: ErrorCode,
) -> Result<Vec<u8>, ApiError> {
    read_body(request.into_body(), limit, s.limits.body_timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} has at most {limit} bytes"),
            ),
            BodyError::TimedOut => ApiError::new(
                ErrorCode::RequestTimeout,
                format!("{what} did not arrive in time"),
            ),
            BodyError::Disconnected | BodyError::Malformed(_) => {
                ApiError::new(unreadable, format!("{what} could not be read"))
            }
        })
}

/// The JSON body of `POST /v1/admin/tasks` for a task of an external model.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWithModel {
    /// The task settings, as TOML.
    settings: String,
    /// The initial model: a safetensors file, base64 (standard alphabet, padded).
    initial_model: String,
}

/// The settings and initial model of `POST /v1/admin/tasks`: TOML text, or the JSON form
/// that carries an external model's initial model.
async fn create_body(
    s: &AppState,
    request: Request,
) -> Result<(String, Option<Vec<u8>>), ApiError> {
    let json = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Ok((settings_text(s, request).await?, None));
    }
    let body = read_model_body(
        s,
        request,
        MAX_ADMIN_MODEL_BODY,
        "a task with its initial model",
        ErrorCode::BadRequest,
    )
    .await?;
    let form: CreateWithModel = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidSettings,
            format!(
                "a JSON task is {{\"settings\": TOML text, \"initial_model\": base64 \
                 safetensors}}: {e}"
            ),
        )
    })?;
    use base64::Engine as _;
    let model = base64::engine::general_purpose::STANDARD
        .decode(form.initial_model.trim())
        .map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidSettings,
                format!("initial_model is not base64 (standard alphabet, padded): {e}"),
            )
        })?;
    Ok((form.settings, Some(model)))
}

async fn settings_text(s: &AppState, request: Request) -> Result<String, ApiError> {
    let body = read_control_body(
        s,
        request.into_body(),
        "task settings",
        ErrorCode::BadRequest,
    )
    .await?;
    String::from_utf8(body).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidSettings,
            "task settings are TOML text (UTF-8)",
        )
    })
}

/// `POST /v1/admin/tasks`: a new task from TOML settings (the keys of one `[[tasks]]` entry),
/// or from JSON with an external model's initial model.
async fn create_task(
    State(s): State<AppState>,
    Query(q): Query<CreateQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    check_admin(&s, request.headers())?;
    let (text, model) = create_body(&s, request).await?;
    let t = s.tasks.create(&text, model.as_deref(), q.paused).await?;
    Ok((StatusCode::CREATED, Json(task_json(&t))).into_response())
}

/// `PUT /v1/admin/tasks/{task}`: new settings for a task created through the admin API.
async fn replace_task(
    State(s): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, request.headers())?;
    let text = settings_text(&s, request).await?;
    let t = s.tasks.replace(&task, &text).await?;
    Ok(Json(task_json(&t)))
}

/// `DELETE /v1/admin/tasks/{task}`: a task created through the admin API, with its versions,
/// history and credentials.
async fn delete_task(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    s.tasks.delete(&task).await?;
    s.credentials.forget_task(&task);
    Ok(Json(json!({"deleted": task})))
}

async fn set_paused(s: &AppState, task: &str, paused: bool) -> Result<Json<Value>, ApiError> {
    let t = s.task(task)?;
    t.set_paused(paused).await?;
    Ok(Json(task_json(&t)))
}

/// `POST /v1/admin/tasks/{task}/pause`.
async fn pause(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    set_paused(&s, &task, true).await
}

/// `POST /v1/admin/tasks/{task}/resume`.
async fn resume(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    set_paused(&s, &task, false).await
}

/// `PUT /v1/admin/tasks/{task}/model`: a safetensors file of exactly the task's tensors (F32,
/// finite) becomes the task's next version.
async fn install_model(
    State(s): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, request.headers())?;
    let t = s.task(&task)?;
    let limit = t.max_upload_bytes();
    let body = read_model_body(
        &s,
        request,
        limit,
        "a model of this task",
        ErrorCode::InvalidModel,
    )
    .await?;
    let layout = t.spec().layout();
    let (params, _) = Parameters::from_safetensors_with_layout(&body, &layout).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidModel,
            format!("the model does not fit task `{}`: {e}", t.name()),
        )
    })?;
    let version = t.install(params).await?;
    Ok(Json(json!({"task": t.name(), "version": version})))
}

/// `POST /v1/admin/tasks/{task}/rollback`: the task goes back to a stored version.
async fn rollback(
    State(s): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Json<RollbackAnswer>, ApiError> {
    // The token first: nobody without it makes the server read a body.
    check_admin(&s, request.headers())?;
    let t = s.task(&task)?;
    let body = read_control_body(
        &s,
        request.into_body(),
        "rollback body",
        ErrorCode::BadRequest,
    )
    .await?;
    let request: RollbackRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("rollback body: {e}")))?;
    let version = t.rollback(request.version).await?;
    Ok(Json(RollbackAnswer {
        task: t.name().to_string(),
        restored: request.version,
        version,
    }))
}

/// `GET /v1/admin/tasks/{task}/devices`: the task's enrolled devices and their activity.
async fn devices(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    let t = s.task(&task)?;
    Ok(Json(json!({
        "task": t.name(),
        "admission": t.admission().as_str(),
        "source": s.tasks.source(t.name()).as_str(),
        "devices": s.credentials.devices(t.name()),
    })))
}

/// `GET /v1/admin/tasks/{task}/credentials`: each credential issued for the task, with the
/// first 8 bytes of its SHA-256 digest in hex, so that an operator who finds a leaked
/// credential can tell whose it is (`sha256sum`) and revoke it.
async fn credentials(
    State(s): State<AppState>,
    Path(task): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    let t = s.task(&task)?;
    let list: Vec<Value> = s
        .credentials
        .credentials(t.name())
        .into_iter()
        .map(|(device, digest_prefix, enrolled_at_ms, revoked_at_ms)| {
            json!({
                "device": device,
                "sha256_prefix": digest_prefix,
                "issued_at_ms": enrolled_at_ms,
                "revoked_at_ms": revoked_at_ms,
                "status": if revoked_at_ms.is_some() { "revoked" } else { "active" },
            })
        })
        .collect();
    Ok(Json(json!({"task": t.name(), "credentials": list})))
}

/// `POST /v1/admin/tasks/{task}/devices/{device}/revoke`: the device's credential is refused
/// from its next request on.
async fn revoke(
    State(s): State<AppState>,
    Path((task, device)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_admin(&s, &headers)?;
    let t = s.task(&task)?;
    if !s
        .credentials
        .revoke(t.name(), &device)
        .await
        .map_err(EngineError::from)?
    {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("task `{}` has no device `{}`", t.name(), shown(&device)),
        ));
    }
    tracing::warn!(task = t.name(), %device, "device credential revoked");
    Ok(Json(
        json!({"task": t.name(), "device": device, "revoked": true}),
    ))
}
