//! The device's side of the protocol as a trait, so the same device loop runs over any
//! transport; and [`HttpTransport`], its HTTP implementation. Requests and answers are the
//! types of [`starling_core::wire::protocol`], the protocol's one definition.
//!
//! A transport reports what happened and decides nothing: every error answer becomes
//! [`ClientError::Refused`] (its [`ErrorBody`] parsed, its `Retry-After` read), a failure to
//! reach the server or to read its answer becomes [`ClientError::Unreachable`], a failed TLS
//! handshake (a certificate refused, a server that does not speak TLS) becomes
//! [`ClientError::Tls`], and the device loop chooses what to retry.
//!
//! [`HttpTransport`] speaks `http://` and `https://` (rustls, with `ring`). It trusts the
//! Mozilla roots of `webpki-roots`, the system's roots (`rustls-native-certs`: the OS store,
//! or `SSL_CERT_FILE` / `SSL_CERT_DIR`), and the certificates given to
//! [`HttpTransport::with_ca_certificates`] (a private CA's, `starling device --ca-cert`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use starling_core::wire::protocol::{
    CheckInRequest, EnrollAnswer, EnrollRequest, ErrorBody, EvaluationReport, NeighbourKeys,
    SecureEnvelopes, SecureKeys, SecureUnmasking, SecureWait, Survivors, CREDENTIAL_SCHEME,
    TOKEN_HEADER,
};

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

/// One call of a secure round's steps (under the assignment's `secure_url`).
#[derive(Debug, Clone)]
pub enum SecureCall {
    /// `POST keys`.
    PostKeys(SecureKeys),
    /// `GET keys`.
    GetKeys,
    /// `POST shares`.
    PostShares(SecureEnvelopes),
    /// `GET shares`.
    GetShares,
    /// `POST input`: the masked input, u32 little-endian.
    PostInput(Bytes),
    /// `GET survivors`.
    GetSurvivors,
    /// `POST unmask`.
    PostUnmask(SecureUnmasking),
}

/// The server's answer to a [`SecureCall`].
#[derive(Debug, Clone, PartialEq)]
pub enum SecureReply {
    /// The message was taken.
    Accepted,
    /// Not ready yet: ask again after this long.
    Wait(Duration),
    /// The neighbours' keys.
    Keys(NeighbourKeys),
    /// The envelopes for this device.
    Envelopes(SecureEnvelopes),
    /// The survivors.
    Survivors(Survivors),
}

/// Reads a secure call's ready answer.
type ReadyParser = fn(&[u8]) -> Result<SecureReply, String>;

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
    /// The task's current plan (what an assignment would ask, and the device conditions it
    /// requires), read without checking in.
    fn plan(
        &self,
        task: &str,
    ) -> impl std::future::Future<Output = Result<starling_core::Plan, ClientError>> + Send;
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
    /// One call of a secure round's steps, at `secure_url` (the assignment's), with the
    /// assignment's token.
    fn secure(
        &self,
        secure_url: &str,
        token: &str,
        call: SecureCall,
    ) -> impl std::future::Future<Output = Result<SecureReply, ClientError>> + Send;
}

/// The connect timeout of [`HttpTransport::new`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The request timeout of [`HttpTransport::new`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP transport.
#[derive(Clone)]
pub struct HttpTransport {
    base: String,
    tls: Arc<ClientConfig>,
    client: reqwest::Client,
    /// `Bearer <credential>` for an enrolled task.
    authorization: Option<Arc<str>>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("base", &self.base)
            .field(
                "credential",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn client(tls: &ClientConfig, connect: Duration, request: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .connect_timeout(connect)
        .timeout(request)
        .build()
        .expect("a client with a rustls config always builds")
}

/// The roots every transport trusts: `webpki-roots` and the system's, read once per process.
fn built_in_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let system = rustls_native_certs::load_native_certs();
        for e in &system.errors {
            tracing::debug!(error = %e, "cannot read some of the system's root certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(system.certs);
        tracing::debug!(added, ignored, "system root certificates");
        roots
    })
}

/// The built-in roots plus the CA certificates in `pem` (one or more PEM sections).
fn roots_with(pem: &[u8]) -> Result<RootCertStore, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("the CA certificate is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(
            "no CA certificate found: expected PEM (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let mut roots = built_in_roots().clone();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| ClientError::Tls(format!("CA certificate {} is unusable: {e}", i + 1)))?;
    }
    Ok(roots)
}

/// An HTTP client that trusts what a device trusts (the built-in roots, and the CA
/// certificates in `ca_pem` if given), with the default timeouts: for tools that speak to the
/// server beside the device protocol, such as `starling admin`.
pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, ClientError> {
    let roots = match ca_pem {
        Some(pem) => roots_with(pem)?,
        None => built_in_roots().clone(),
    };
    Ok(client(
        &tls_config(roots),
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_REQUEST_TIMEOUT,
    ))
}

/// A rustls client config trusting `roots` (ring; TLS 1.2 and 1.3).
fn tls_config(roots: RootCertStore) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl HttpTransport {
    /// A transport to the server at `base` (`http://host:port` or `https://host:port`), with
    /// the default timeouts ([`DEFAULT_CONNECT_TIMEOUT`], [`DEFAULT_REQUEST_TIMEOUT`]), trusting
    /// the built-in roots (see the module docs).
    pub fn new(base: &str) -> Self {
        Self::with_roots(base, built_in_roots().clone())
    }

    /// Like [`HttpTransport::new`], and also trusting the CA certificates in `pem` (one or
    /// more `-----BEGIN CERTIFICATE-----` sections: a private CA's). Fails with
    /// [`ClientError::Tls`] when `pem` holds no certificate or one that is not a valid X.509
    /// certificate.
    pub fn with_ca_certificates(base: &str, pem: &[u8]) -> Result<Self, ClientError> {
        Ok(Self::with_roots(base, roots_with(pem)?))
    }

    fn with_roots(base: &str, roots: RootCertStore) -> Self {
        let tls = tls_config(roots);
        Self {
            base: base.trim_end_matches('/').to_string(),
            client: client(&tls, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT),
            tls,
            authorization: None,
        }
    }

    /// This transport presenting a device credential (from [`HttpTransport::enroll`]) with
    /// every check-in, upload and evaluation report, as an enrolled task requires.
    pub fn with_credential(mut self, credential: &str) -> Self {
        self.authorization = Some(format!("{CREDENTIAL_SCHEME} {credential}").into());
        self
    }

    /// Enrolls this device in an enrolled task with the task's enrollment secret: the answer
    /// holds the device's id and its credential, which the server shows this once. Keep the
    /// credential (privately) and pass it to [`HttpTransport::with_credential`].
    pub async fn enroll(
        &self,
        task: &str,
        secret: &str,
        label: Option<&str>,
    ) -> Result<EnrollAnswer, ClientError> {
        let resp = self
            .client
            .post(self.url(&format!("/v1/tasks/{task}/enroll")))
            .json(&EnrollRequest {
                secret: secret.to_string(),
                label: label.map(str::to_string),
            })
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        answer(resp, "enrollment answer").await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A POST with the device's credential, if it has one.
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.client.post(self.url(path));
        match &self.authorization {
            Some(a) => req.header(reqwest::header::AUTHORIZATION, &**a),
            None => req,
        }
    }
}

/// A request's failure: a failed TLS handshake ([`ClientError::Tls`], not worth repeating),
/// or else the server unreachable (with the innermost cause, which reqwest's message leaves
/// out).
fn unreachable(e: reqwest::Error) -> ClientError {
    if let Some(tls) = causes(&e).find_map(|c| c.downcast_ref::<rustls::Error>()) {
        return ClientError::Tls(tls_message(tls));
    }
    let what = if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    match causes(&e).skip(1).last() {
        Some(cause) => ClientError::Unreachable(format!("{what}: {e}: {cause}")),
        None => ClientError::Unreachable(format!("{what}: {e}")),
    }
}

/// `e` and its chain of sources. An I/O error's `source` skips the error it wraps (rustls'
/// handshake error comes wrapped in one or two I/O errors), so the chain steps into that one
/// instead.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| match err.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        None => err.source(),
    })
}

/// What a TLS failure means, for a person.
fn tls_message(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
            "the server's certificate was refused ({e}): it is not signed by a trusted CA; for \
             a server with a private CA, trust that CA's certificate (`starling device --ca-cert \
             FILE`)"
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "the server's certificate was refused ({e}): it does not name the host in the \
                 server's URL"
            )
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate was refused ({e})")
        }
        rustls::Error::InvalidMessage(_) => format!(
            "the handshake failed ({e}): does the server speak HTTPS on this port? (a \
             plain-HTTP server takes an http:// URL)"
        ),
        _ => format!("the handshake failed ({e})"),
    }
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
        self.client = client(&self.tls, connect, request);
    }

    async fn check_in(&self, task: &str, device: &str) -> Result<CheckInAnswer, ClientError> {
        let resp = self
            .post(&format!("/v1/tasks/{task}/checkin"))
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

    async fn plan(&self, task: &str) -> Result<starling_core::Plan, ClientError> {
        let resp = self
            .client
            .get(self.url(&format!("/v1/tasks/{task}")))
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refusal(resp).await);
        }
        #[derive(serde::Deserialize)]
        struct TaskPlan {
            plan: starling_core::Plan,
        }
        let t: TaskPlan = answer(resp, "task").await?;
        Ok(t.plan)
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
            .post(&format!("/v1/tasks/{task}/rounds/{round}/updates"))
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
            .post(&format!("/v1/tasks/{task}/rounds/{round}/evaluations"))
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

    async fn secure(
        &self,
        secure_url: &str,
        token: &str,
        call: SecureCall,
    ) -> Result<SecureReply, ClientError> {
        let get = |step: &str| {
            let req = self.client.get(self.url(&format!("{secure_url}/{step}")));
            match &self.authorization {
                Some(a) => req.header(reqwest::header::AUTHORIZATION, &**a),
                None => req,
            }
        };
        let post = |step: &str| self.post(&format!("{secure_url}/{step}"));
        let (req, ready): (reqwest::RequestBuilder, ReadyParser) = match call {
            SecureCall::PostKeys(k) => (post("keys").json(&k), |_| Ok(SecureReply::Accepted)),
            SecureCall::GetKeys => (get("keys"), |b| {
                serde_json::from_slice(b)
                    .map(SecureReply::Keys)
                    .map_err(|e| e.to_string())
            }),
            SecureCall::PostShares(e) => (post("shares").json(&e), |_| Ok(SecureReply::Accepted)),
            SecureCall::GetShares => (get("shares"), |b| {
                serde_json::from_slice(b)
                    .map(SecureReply::Envelopes)
                    .map_err(|e| e.to_string())
            }),
            SecureCall::PostInput(body) => (
                post("input")
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(body),
                |_| Ok(SecureReply::Accepted),
            ),
            SecureCall::GetSurvivors => (get("survivors"), |b| {
                serde_json::from_slice(b)
                    .map(SecureReply::Survivors)
                    .map_err(|e| e.to_string())
            }),
            SecureCall::PostUnmask(u) => (post("unmask").json(&u), |_| Ok(SecureReply::Accepted)),
        };
        let resp = req
            .header(TOKEN_HEADER, token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(refusal(resp).await);
        }
        let body = resp.bytes().await.map_err(unreachable)?;
        if status == reqwest::StatusCode::ACCEPTED {
            if let Ok(w) = serde_json::from_slice::<SecureWait>(&body) {
                if w.status == "wait" {
                    let secs = if w.retry_after_secs.is_finite() {
                        w.retry_after_secs.clamp(0.0, 60.0)
                    } else {
                        1.0
                    };
                    return Ok(SecureReply::Wait(Duration::from_secs_f64(secs)));
                }
            }
        }
        ready(&body).map_err(|e| ClientError::Protocol(format!("secure step answer: {e}")))
    }
}
