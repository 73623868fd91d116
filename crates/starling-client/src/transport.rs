//! The device's side of the protocol as a trait, so the same device loop runs over HTTP, in
//! memory (simulation) and in the browser; and [`HttpTransport`], its HTTP implementation.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use starling_core::Plan;

use crate::ClientError;

/// The server's answer to a check-in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum CheckInReply {
    /// Work for a round.
    Assigned {
        /// The round.
        round: u64,
        /// The version to train from.
        base_version: u64,
        /// The upload token.
        token: String,
        /// Seconds left before the deadline.
        deadline_secs: f64,
        /// What to do.
        plan: Plan,
    },
    /// Come back later.
    Retry {
        /// Seconds to wait.
        retry_after_secs: f64,
        /// Why.
        reason: String,
    },
}

/// A downloaded checkpoint.
#[derive(Debug, Clone)]
pub struct ModelDownload {
    /// Its version.
    pub version: u64,
    /// The safetensors body (spec and version in its metadata).
    pub body: Bytes,
}

/// The protocol, as the device sees it.
pub trait Transport: Send + Sync {
    /// Asks for work on behalf of the device that calls itself `device`.
    fn check_in(
        &self,
        task: &str,
        device: &str,
    ) -> impl std::future::Future<Output = Result<CheckInReply, ClientError>> + Send;
    /// Downloads the current checkpoint; `None` when it is still `cached_version`.
    fn download(
        &self,
        task: &str,
        cached_version: Option<u64>,
    ) -> impl std::future::Future<Output = Result<Option<ModelDownload>, ClientError>> + Send;
    /// Uploads an encoded update to a round.
    fn upload(
        &self,
        task: &str,
        round: u64,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), ClientError>> + Send;
}

/// The HTTP transport.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    base: String,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl HttpTransport {
    /// A transport to the server at `base` (`http://host:port`).
    pub fn new(base: &str) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            base: base.trim_end_matches('/').to_string(),
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn unreachable(e: reqwest::Error) -> ClientError {
    ClientError::Unreachable(e.to_string())
}

async fn refusal(resp: reqwest::Response) -> ClientError {
    let status = resp.status().as_u16();
    match resp.json::<ErrorBody>().await {
        Ok(b) => ClientError::Refused {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) if status >= 500 => ClientError::Unreachable(format!("server error {status}")),
        Err(_) => ClientError::Protocol(format!("HTTP {status} without an error body")),
    }
}

impl Transport for HttpTransport {
    async fn check_in(&self, task: &str, device: &str) -> Result<CheckInReply, ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/checkin")))
            .json(&serde_json::json!({ "device": device }))
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(format!("check-in answer: {e}")))
    }

    async fn download(
        &self,
        task: &str,
        cached: Option<u64>,
    ) -> Result<Option<ModelDownload>, ClientError> {
        let mut req = self
            .client
            .get(self.url(&format!("/v1/tasks/{task}/model")));
        if let Some(v) = cached {
            req = req.header(reqwest::header::IF_NONE_MATCH, format!("\"{v}\""));
        }
        let resp = req.send().await.map_err(unreachable)?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        let version = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim_matches('"').parse().ok())
            .ok_or_else(|| ClientError::Protocol("model without a version ETag".into()))?;
        let body = resp.bytes().await.map_err(unreachable)?;
        Ok(Some(ModelDownload { version, body }))
    }

    async fn upload(&self, task: &str, round: u64, body: Vec<u8>) -> Result<(), ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/rounds/{round}/updates")))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(unreachable)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(refusal(resp).await)
        }
    }
}
