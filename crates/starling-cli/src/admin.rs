//! `starling admin`: operate a running server through its admin API, authenticated with the
//! admin token (`STARLING_ADMIN_TOKEN`, never a flag, so it stays out of shell history and
//! process lists): tasks created, changed, paused, resumed and deleted at run time, a model of
//! the operator's own installed, rollbacks, the round history, devices and their credentials.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use base64::Engine as _;
use serde_json::Value;
use starling_core::wire::protocol::{
    ErrorBody, RollbackAnswer, RollbackRequest, ADMIN_TOKEN_HEADER,
};

/// `starling admin` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// Create a task from a TOML file of its settings (the keys of one `[[tasks]]` entry);
    /// with --model, its initial model comes from a safetensors file (the task is created
    /// paused, the model installed, then the task resumed, so no device trains the seed's).
    /// A task of your own model (`model = "external"`) needs --model: the file defines it.
    Create {
        #[command(flatten)]
        server: ServerArgs,
        /// The task's settings (TOML).
        #[arg(long, value_name = "FILE")]
        settings: PathBuf,
        /// The initial model: a safetensors file of the task's tensors (F32).
        #[arg(long, value_name = "FILE")]
        model: Option<PathBuf>,
        /// Leave the task paused (resume it with `starling admin resume`).
        #[arg(long)]
        paused: bool,
    },
    /// Replace a task's settings (plan, round policy, admission...) with a TOML file's; the
    /// open round ends and the task goes on from its latest version. Tasks of the settings
    /// file are changed there instead.
    Update {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
        /// The task's new settings (TOML).
        #[arg(long, value_name = "FILE")]
        settings: PathBuf,
    },
    /// Delete a task created through the admin API, with its versions, history and
    /// credentials.
    Delete {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// Pause a task: check-ins are told to come back later.
    Pause {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// Resume a paused task.
    Resume {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// Install a model of your own (a safetensors file of the task's tensors) as the task's
    /// next version.
    Model {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
        /// The safetensors file.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Roll a task back to an earlier committed version: the open round is abandoned and the
    /// old parameters become a new version.
    Rollback {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
        /// The stored version to go back to.
        #[arg(long)]
        version: u64,
    },
    /// A task's round history.
    Rounds {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// An enrolled task's devices and their activity.
    Devices {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// The credentials issued for an enrolled task (with a digest prefix to match a leaked
    /// credential: `printf %s CREDENTIAL | sha256sum`).
    Credentials {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
    },
    /// Revoke a device's credential: its next request is refused.
    Revoke {
        #[command(flatten)]
        server: ServerArgs,
        /// The task.
        #[arg(long)]
        task: String,
        /// The device's id (from `starling admin devices`).
        #[arg(long)]
        device: String,
    },
}

/// How to reach the server.
#[derive(clap::Args)]
pub(crate) struct ServerArgs {
    /// The server's base URL (http:// or https://).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "STARLING_SERVER")]
    server: String,
    /// Also trust the CA certificate(s) in this PEM file for an https:// server (a private
    /// CA's), beside the built-in (webpki) and the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Print the server's answer as JSON.
    #[arg(long)]
    json: bool,
}

/// An admin API client.
struct Admin {
    base: String,
    token: String,
    http: reqwest::Client,
    json: bool,
}

impl Admin {
    fn new(a: &ServerArgs, token: &str) -> anyhow::Result<Self> {
        let pem = match &a.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read --ca-cert {}", path.display()))?,
            ),
            None => None,
        };
        let http = starling_client::transport::http_client(pem.as_deref())
            .with_context(|| "--ca-cert".to_string())?;
        Ok(Self {
            base: a.server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
            json: a.json,
        })
    }

    /// Sends a request to `path` and returns the answer's JSON, or the server's refusal as
    /// an error (`code (status): message`).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header(ADMIN_TOKEN_HEADER, &self.token);
        if let Some((content_type, bytes)) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(bytes);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the answer")?;
        if !status.is_success() {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => bail!(
                    "{} ({}): {}",
                    e.error.code,
                    status.as_u16(),
                    e.error.message
                ),
                Err(_) => bail!("the server answered {status}"),
            }
        }
        serde_json::from_slice(&bytes).context("the server's answer is not JSON")
    }

    /// Prints `answer` as JSON with --json, else `text`.
    fn print(&self, answer: &Value, text: impl FnOnce(&Value) -> String) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string(answer)?);
        } else {
            println!("{}", text(answer));
        }
        Ok(())
    }
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Whether task settings (TOML) say `model = "external"`; the server judges the rest.
fn is_external(settings: &[u8]) -> bool {
    std::str::from_utf8(settings)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.get("model").and_then(|m| m.as_str()) == Some("external"))
}

fn task_line(t: &Value) -> String {
    format!(
        "task `{}`: {}, version {}, admission {}",
        t["name"].as_str().unwrap_or("?"),
        t["status"].as_str().unwrap_or("?"),
        t["version"],
        t["admission"].as_str().unwrap_or("?")
    )
}

fn opt(v: &Value) -> String {
    if v.is_null() {
        "-".into()
    } else {
        v.to_string()
    }
}

pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    let token = std::env::var("STARLING_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .context("set STARLING_ADMIN_TOKEN to the server's admin token")?;
    crate::runtime()?.block_on(run_async(command, &token))?;
    Ok(ExitCode::SUCCESS)
}

async fn run_async(command: Command, token: &str) -> anyhow::Result<()> {
    use reqwest::Method;
    const TOML: &str = "application/toml";
    const SAFETENSORS: &str = "application/octet-stream";
    match command {
        Command::Create {
            server,
            settings,
            model,
            paused,
        } => {
            let admin = Admin::new(&server, token)?;
            let text = read(&settings, "--settings")?;
            let model = model.map(|m| read(&m, "--model")).transpose()?;
            if is_external(&text) {
                // Your own model: it defines the task, so it travels with the settings.
                let model = model.context(
                    "model = \"external\" is defined by its initial model: pass --model FILE \
                     (a safetensors file of its F32 tensors)",
                )?;
                let body = serde_json::json!({
                    "settings": String::from_utf8_lossy(&text),
                    "initial_model": base64::engine::general_purpose::STANDARD.encode(model),
                });
                let answer = admin
                    .call(
                        Method::POST,
                        &format!("/v1/admin/tasks?paused={paused}"),
                        Some(("application/json", serde_json::to_vec(&body)?)),
                    )
                    .await?;
                return admin.print(&answer, |t| format!("created {}", task_line(t)));
            }
            let hold = paused || model.is_some();
            let created = admin
                .call(
                    Method::POST,
                    &format!("/v1/admin/tasks?paused={hold}"),
                    Some((TOML, text)),
                )
                .await?;
            let name = created["name"].as_str().unwrap_or_default().to_string();
            let mut answer = created;
            if let Some(model) = model {
                admin
                    .call(
                        Method::PUT,
                        &format!("/v1/admin/tasks/{name}/model"),
                        Some((SAFETENSORS, model)),
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "task `{name}` was created (paused) but its model was refused; fix \
                             the file and run `starling admin model`, or `starling admin delete`"
                        )
                    })?;
                answer = if paused {
                    admin
                        .call(Method::GET, &format!("/v1/tasks/{name}"), None)
                        .await?
                } else {
                    admin
                        .call(
                            Method::POST,
                            &format!("/v1/admin/tasks/{name}/resume"),
                            None,
                        )
                        .await?
                };
            }
            admin.print(&answer, |t| format!("created {}", task_line(t)))
        }
        Command::Update {
            server,
            task,
            settings,
        } => {
            let admin = Admin::new(&server, token)?;
            let text = read(&settings, "--settings")?;
            let answer = admin
                .call(
                    Method::PUT,
                    &format!("/v1/admin/tasks/{task}"),
                    Some((TOML, text)),
                )
                .await?;
            admin.print(&answer, |t| format!("updated {}", task_line(t)))
        }
        Command::Delete { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(Method::DELETE, &format!("/v1/admin/tasks/{task}"), None)
                .await?;
            admin.print(&answer, |_| format!("deleted task `{task}`"))
        }
        Command::Pause { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(Method::POST, &format!("/v1/admin/tasks/{task}/pause"), None)
                .await?;
            admin.print(&answer, task_line)
        }
        Command::Resume { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(
                    Method::POST,
                    &format!("/v1/admin/tasks/{task}/resume"),
                    None,
                )
                .await?;
            admin.print(&answer, task_line)
        }
        Command::Model { server, task, file } => {
            let admin = Admin::new(&server, token)?;
            let body = read(&file, "--file")?;
            let answer = admin
                .call(
                    Method::PUT,
                    &format!("/v1/admin/tasks/{task}/model"),
                    Some((SAFETENSORS, body)),
                )
                .await?;
            admin.print(&answer, |a| {
                format!(
                    "task `{task}` now serves the model as version {}",
                    a["version"]
                )
            })
        }
        Command::Rollback {
            server,
            task,
            version,
        } => {
            let admin = Admin::new(&server, token)?;
            let body = serde_json::to_vec(&RollbackRequest { version })?;
            let answer = admin
                .call(
                    Method::POST,
                    &format!("/v1/admin/tasks/{task}/rollback"),
                    Some(("application/json", body)),
                )
                .await?;
            let rb: RollbackAnswer = serde_json::from_value(answer.clone())
                .context("the server's answer is not a rollback answer")?;
            admin.print(&answer, |_| {
                format!(
                    "task `{}` rolled back to version {}: it is now version {}",
                    rb.task, rb.restored, rb.version
                )
            })
        }
        Command::Rounds { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(Method::GET, &format!("/v1/tasks/{task}/rounds"), None)
                .await?;
            admin.print(&answer, |a| {
                let mut out = format!(
                    "{:>6} {:>10} {:>10} {:>8} {:>13} {:>10} {:>10}  reason",
                    "round", "kind", "status", "version", "participants", "loss", "accuracy"
                );
                for r in a["rounds"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:>6} {:>10} {:>10} {:>8} {:>13} {:>10} {:>10}  {}",
                        r["round"],
                        r["kind"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        opt(&r["version"]),
                        r["participants"],
                        r["mean_loss"]
                            .as_f64()
                            .map_or("-".into(), |v| format!("{v:.6}")),
                        r["mean_accuracy"]
                            .as_f64()
                            .map_or("-".into(), |v| format!("{v:.4}")),
                        r["reason"].as_str().unwrap_or("")
                    ));
                }
                out
            })
        }
        Command::Devices { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(
                    Method::GET,
                    &format!("/v1/admin/tasks/{task}/devices"),
                    None,
                )
                .await?;
            admin.print(&answer, |a| {
                let mut out = format!("{:<20} {:>9} {:<8}  label", "device", "check-ins", "status");
                for d in a["devices"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:<20} {:>9} {:<8}  {}",
                        d["id"].as_str().unwrap_or(""),
                        d["check_ins"],
                        if d["revoked_at_ms"].is_null() {
                            "active"
                        } else {
                            "revoked"
                        },
                        d["label"].as_str().unwrap_or("")
                    ));
                }
                out
            })
        }
        Command::Credentials { server, task } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(
                    Method::GET,
                    &format!("/v1/admin/tasks/{task}/credentials"),
                    None,
                )
                .await?;
            admin.print(&answer, |a| {
                let mut out = format!("{:<20} {:<18} status", "device", "sha256 prefix");
                for c in a["credentials"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n{:<20} {:<18} {}",
                        c["device"].as_str().unwrap_or(""),
                        c["sha256_prefix"].as_str().unwrap_or(""),
                        c["status"].as_str().unwrap_or("")
                    ));
                }
                out
            })
        }
        Command::Revoke {
            server,
            task,
            device,
        } => {
            let admin = Admin::new(&server, token)?;
            let answer = admin
                .call(
                    Method::POST,
                    &format!("/v1/admin/tasks/{task}/devices/{device}/revoke"),
                    None,
                )
                .await?;
            admin.print(&answer, |_| {
                format!("device `{device}` of task `{task}`: credential revoked")
            })
        }
    }
}
