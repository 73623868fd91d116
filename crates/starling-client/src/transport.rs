//! The device's side of the protocol as a trait, so the same device loop runs over any
//! transport; and [`HttpTransport`], its HTTP implementation. Requests and answers are the
//! types of [`starling_core::wire::protocol`], the protocol's one definition.
//!
//! A transport reports what happened and decides nothing: every error answer becomes
//! [`ClientError::Refused`] (its [`ErrorBody`] parsed, its `Retry-After` read), a failure to
//! reach the server or to read its answer becomes [`ClientError::Unreachable`], and the device
//! loop chooses what to retry.

use std::time::Duration;

use bytes::Bytes;
use starling_core::wire::protocol::{CheckInRequest, ErrorBody, EvaluationReport, TOKEN_HEADER};

pub use starling_core::wire::protocol::{CheckInAnswer, UploadReceipt};

use crate::ClientError;

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
    /// Bounds every later request: `connect` for opening a connection, `request` for the
    /// whole exchange, from connecting until the answer's body is read. A transport without
    /// connections ignores `connect`. [`crate::Device::new`] calls this with its options.
    fn set_timeouts(&mut self, connect: Duration, request: Duration);
    /// Asks for work on behalf of the device that calls itself `device`.
    fn check_in(
        &self,
        task: &str,
        device: &str,
    ) -> impl std::future::Future<Output = Result<CheckInAnswer, ClientError>> + Send;
    /// Downloads the current checkpoint; `None` when it is still `cached_version`.
    fn download(
        &self,
        task: &str,
        cached_version: Option<u64>,
    ) -> impl std::future::Future<Output = Result<Option<ModelDownload>, ClientError>> + Send;
    /// Uploads an encoded update to a round, with the assignment's token (which the server
    /// checks before it reads the body).
    fn upload(
        &self,
        task: &str,
        round: u64,
        token: &str,
        body: Bytes,
    ) -> impl std::future::Future<Output = Result<UploadReceipt, ClientError>> + Send;
    /// Posts an evaluation round's report (the model's example count, mean loss and accuracy
    /// on the local data) with the assignment's token.
    fn evaluate(
        &self,
        task: &str,
        round: u64,
        token: &str,
        report: &EvaluationReport,
    ) -> impl std::future::Future<Output = Result<UploadReceipt, ClientError>> + Send;
}

/// The connect timeout of [`HttpTransport::new`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The request timeout of [`HttpTransport::new`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP transport.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    base: String,
    client: reqwest::Client,
}

fn client(connect: Duration, request: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .timeout(request)
        .build()
        .expect("a plain HTTP client always builds")
}

impl HttpTransport {
    /// A transport to the server at `base` (`http://host:port`), with the default timeouts
    /// ([`DEFAULT_CONNECT_TIMEOUT`], [`DEFAULT_REQUEST_TIMEOUT`]).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            client: client(DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn unreachable(e: reqwest::Error) -> ClientError {
    let what = if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    ClientError::Unreachable(format!("{what}: {e}"))
}

/// `Retry-After` in its delay-seconds form (a fraction is accepted); the HTTP-date form is
/// ignored.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let secs: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)))
}

/// An error answer as a [`ClientError::Refused`].
async fn refusal(resp: reqwest::Response) -> ClientError {
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return unreachable(e),
    };
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => ClientError::Refused {
            status,
            code: b.code(),
            code_name: b.error.code,
            message: b.error.message,
            retry_after,
        },
        Err(_) => ClientError::Refused {
            status,
            code: None,
            code_name: format!("http_{status}"),
            message: format!("HTTP {status} without an error body"),
            retry_after,
        },
    }
}

/// The body of a successful answer, parsed as `T`.
async fn answer<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    what: &str,
) -> Result<T, ClientError> {
    let body = resp.bytes().await.map_err(unreachable)?;
    serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("{what}: {e}")))
}

impl Transport for HttpTransport {
    fn set_timeouts(&mut self, connect: Duration, request: Duration) {
        self.client = client(connect, request);
    }

    async fn check_in(&self, task: &str, device: &str) -> Result<CheckInAnswer, ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/checkin")))
            .json(&CheckInRequest {
                device: Some(device.to_string()),
            })
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        answer(resp, "check-in answer").await
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

    async fn upload(
        &self,
        task: &str,
        round: u64,
        token: &str,
        body: Bytes,
    ) -> Result<UploadReceipt, ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/rounds/{round}/updates")))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(TOKEN_HEADER, token)
            .body(body)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        answer(resp, "upload receipt").await
    }

    async fn evaluate(
        &self,
        task: &str,
        round: u64,
        token: &str,
        report: &EvaluationReport,
    ) -> Result<UploadReceipt, ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/rounds/{round}/evaluations")))
            .header(TOKEN_HEADER, token)
            .json(report)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        answer(resp, "evaluation receipt").await
    }
}
