//! The HTTP face of secure aggregation's steps (`[tasks.secure_aggregation]`), under
//! `/v1/tasks/{task}/rounds/{round}/secagg/`. Every call names the assignment by its
//! `X-Starling-Token` header (and, in an enrolled task, the device by its credential):
//!
//! | call | step |
//! |---|---|
//! | `POST keys` ([`SecureKeys`]) | advertise keys |
//! | `GET keys` ([`NeighbourKeys`], or 202 [`SecureWait`]) | before sharing |
//! | `POST shares` ([`SecureEnvelopes`]) | share keys |
//! | `GET shares` ([`SecureEnvelopes`] addressed to the device, or 202 [`SecureWait`]) | before the masked input |
//! | `POST input` (`application/octet-stream`: the masked input, u32 little-endian) | masked input |
//! | `GET survivors` ([`Survivors`], or 202 [`SecureWait`]) | before unmasking |
//! | `POST unmask` ([`SecureUnmasking`]) | unmask |
//!
//! JSON bodies are read under `max_body_bytes`; a masked input's `Content-Length` must be
//! exactly 4 bytes per value of the round before a byte of it is read (`wrong_length`
//! otherwise; 413 above it). Handlers only translate: the round's logic is the engine's
//! ([`crate::engine::secagg`]).

use std::collections::BTreeMap;

use axum::body::HttpBody;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use starling_core::secagg::protocol::{AdvertiseKeys, Envelope, Unmasking};
use starling_core::secagg::shamir::Share;
use starling_core::wire::protocol::{
    from_hex, parse_canonical_u64, ErrorCode, NeighbourKeys, SecureEnvelope, SecureEnvelopes,
    SecureKeys, SecureReceipt, SecureShare, SecureUnmasking, SecureWait, Survivors,
};

use crate::api::{
    authenticate, limit_address, read_body, read_control_body, shown, token_header, ApiError,
    AppState, BodyError,
};
use crate::engine::secagg::{SecureAnswer, SecureRequest};
use crate::engine::TaskHandle;

pub(crate) fn router() -> Router<AppState> {
    const BASE: &str = "/v1/tasks/{task}/rounds/{round}/secagg";
    Router::new()
        .route(&format!("{BASE}/keys"), get(get_keys).post(post_keys))
        .route(&format!("{BASE}/shares"), get(get_shares).post(post_shares))
        .route(&format!("{BASE}/input"), axum::routing::post(post_input))
        .route(&format!("{BASE}/survivors"), get(get_survivors))
        .route(&format!("{BASE}/unmask"), axum::routing::post(post_unmask))
}

fn bad(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

/// The task, round, token and device of a secure call, checked before any body is read.
struct Call {
    task: TaskHandle,
    round: u64,
    token: String,
    device: Option<String>,
}

fn call(s: &AppState, task: &str, round: &str, request: &Request) -> Result<Call, ApiError> {
    limit_address(s, request)?;
    let t = s.task(task)?;
    let round_number = parse_canonical_u64(round).ok_or_else(|| {
        bad(
            ErrorCode::UnknownRound,
            format!(
                "`{}` is not a round number (plain decimal digits, no sign or leading zero)",
                shown(round)
            ),
        )
    })?;
    if t.secure_input_len().is_none() {
        return Err(bad(
            ErrorCode::WrongPhase,
            format!("task `{}` does not use secure aggregation", t.name()),
        ));
    }
    let token = token_header(request.headers())?;
    let device = authenticate(s, &t, request.headers(), false)?;
    Ok(Call {
        task: t,
        round: round_number,
        token,
        device,
    })
}

async fn send(c: &Call, request: SecureRequest) -> Result<SecureAnswer, ApiError> {
    Ok(c.task
        .secure(c.round, &c.token, c.device.as_deref(), request)
        .await?)
}

fn answer(a: SecureAnswer, phase: &'static str) -> Response {
    match a {
        SecureAnswer::Accepted => (
            StatusCode::ACCEPTED,
            Json(SecureReceipt {
                status: "accepted".into(),
                phase: phase.into(),
            }),
        )
            .into_response(),
        SecureAnswer::Wait { step, after } => (
            StatusCode::ACCEPTED,
            Json(SecureWait {
                status: "wait".into(),
                phase: step.as_str().into(),
                retry_after_secs: after.as_secs_f64(),
            }),
        )
            .into_response(),
        SecureAnswer::Keys(keys) => Json(NeighbourKeys {
            keys: keys
                .iter()
                .map(|(&i, k)| (i as u64, SecureKeys::from(k)))
                .collect(),
        })
        .into_response(),
        SecureAnswer::Envelopes(envelopes) => Json(SecureEnvelopes {
            envelopes: envelopes.iter().map(SecureEnvelope::from).collect(),
        })
        .into_response(),
        SecureAnswer::Survivors(set) => Json(Survivors {
            survivors: set.into_iter().map(|i| i as u64).collect(),
        })
        .into_response(),
    }
}

async fn json_body<T: serde::de::DeserializeOwned>(
    s: &AppState,
    request: Request,
    what: &str,
) -> Result<T, ApiError> {
    let body = read_control_body(s, request.into_body(), what, ErrorCode::BadRequest).await?;
    serde_json::from_slice(&body).map_err(|e| bad(ErrorCode::BadRequest, format!("{what}: {e}")))
}

fn key32(hex: &str, what: &str) -> Result<[u8; 32], ApiError> {
    from_hex(hex)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            bad(
                ErrorCode::WrongLength,
                format!("{what} must be 64 hex digits"),
            )
        })
}

fn index(i: u64) -> Result<usize, ApiError> {
    usize::try_from(i).map_err(|_| bad(ErrorCode::InvalidShares, "an index out of range"))
}

async fn post_keys(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    let keys: SecureKeys = json_body(&s, request, "keys").await?;
    let keys = AdvertiseKeys {
        encryption: key32(&keys.encryption, "`encryption`")?,
        masking: key32(&keys.masking, "`masking`")?,
    };
    let a = send(&c, SecureRequest::AdvertiseKeys(keys)).await?;
    Ok(answer(a, "advertise_keys"))
}

async fn get_keys(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    Ok(answer(
        send(&c, SecureRequest::GetKeys).await?,
        "share_keys",
    ))
}

async fn post_shares(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    let body: SecureEnvelopes = json_body(&s, request, "shares").await?;
    let envelopes = body
        .envelopes
        .into_iter()
        .map(|e| {
            Ok(Envelope {
                from: index(e.from)?,
                to: index(e.to)?,
                ciphertext: from_hex(&e.ciphertext)
                    .ok_or_else(|| bad(ErrorCode::BadRequest, "a ciphertext that is not hex"))?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let a = send(&c, SecureRequest::ShareKeys(envelopes)).await?;
    Ok(answer(a, "share_keys"))
}

async fn get_shares(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    Ok(answer(
        send(&c, SecureRequest::GetEnvelopes).await?,
        "masked_input",
    ))
}

async fn post_input(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    let len = c.task.secure_input_len().expect("checked in `call`");
    let limit = len * 4;
    let wrong = |got: String| {
        bad(
            ErrorCode::WrongLength,
            format!("a masked input of this round is {limit} bytes ({len} u32 LE); got {got}"),
        )
    };
    match request.body().size_hint().exact() {
        Some(n) if n > limit as u64 => {
            return Err(bad(
                ErrorCode::PayloadTooLarge,
                format!("a masked input of this round is {limit} bytes"),
            ))
        }
        Some(n) if n != limit as u64 => return Err(wrong(format!("{n} bytes"))),
        _ => {}
    }
    let body = match read_body(request.into_body(), limit, s.limits.body_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            return Err(bad(
                ErrorCode::PayloadTooLarge,
                format!("a masked input of this round is {limit} bytes"),
            ))
        }
        Err(BodyError::TimedOut) => {
            return Err(bad(
                ErrorCode::RequestTimeout,
                "the masked input did not arrive in time",
            ))
        }
        Err(BodyError::Disconnected | BodyError::Malformed(_)) => {
            return Err(bad(ErrorCode::BadRequest, "the masked input ended early"))
        }
    };
    if body.len() != limit {
        return Err(wrong(format!("{} bytes", body.len())));
    }
    let y: Vec<u32> = body
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    drop(body);
    let a = send(&c, SecureRequest::MaskedInput(y)).await?;
    Ok(answer(a, "masked_input"))
}

async fn get_survivors(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    Ok(answer(
        send(&c, SecureRequest::GetSurvivors).await?,
        "unmask",
    ))
}

fn shares(list: Vec<SecureShare>) -> Result<Vec<(usize, Share)>, ApiError> {
    let mut seen = BTreeMap::new();
    for sh in list {
        let owner = index(sh.owner)?;
        let y = key32(&sh.y, "a share's `y`")?;
        if seen.insert(owner, Share { x: sh.x, y }).is_some() {
            return Err(bad(
                ErrorCode::InvalidShares,
                format!("two shares of device {owner}'s secret"),
            ));
        }
    }
    Ok(seen.into_iter().collect())
}

async fn post_unmask(
    State(s): State<AppState>,
    Path((task, round)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let c = call(&s, &task, &round, &request)?;
    let body: SecureUnmasking = json_body(&s, request, "unmasking").await?;
    let u = Unmasking {
        from: 0, // set by the engine from the assignment
        seeds: shares(body.seeds)?,
        keys: shares(body.keys)?,
    };
    let a = send(&c, SecureRequest::Unmask(u)).await?;
    Ok(answer(a, "unmask"))
}
