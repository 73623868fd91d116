//! The device app end to end: the real server on 127.0.0.1:0 serves the page, headless
//! Chromium (Debian's `chromium` and `chromium-driver`, installed by `scripts/setup.sh`)
//! opens it in a phone-sized and a desktop-sized viewport, a person's data points go in, the
//! page trains in WebAssembly, contributes, and shows the new global model. Screenshots land
//! in `target/screenshots/`.
//!
//! Without Chromium or chromedriver these tests fail, saying to run `scripts/setup.sh`.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::{synthetic_line, TargetColumn};
use starling_core::trainer::spec::ModelSpec;
use starling_core::{trainer::train, wire::checkpoint, Dataset, Model, Plan};
use starling_server::settings::{BufferedPolicy, RoundPolicy, TaskSettings};
use starling_server::{Running, Settings};

/// One browser at a time: the machine has two cores, and each test already runs a server.
pub(crate) static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
pub(crate) enum Viewport {
    /// 390x844 CSS pixels, device pixel ratio 3, touch: a current phone.
    Phone,
    /// 1280x800.
    Desktop,
}

impl Viewport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Viewport::Phone => "phone",
            Viewport::Desktop => "desktop",
        }
    }
}

fn find_tool(env: &str, candidates: &[&str]) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        if Path::new(&p).is_file() {
            return Ok(PathBuf::from(p));
        }
        bail!("${env} is {p}, which does not exist: run scripts/setup.sh or fix ${env}");
    }
    for c in candidates {
        if Path::new(c).is_file() {
            return Ok(PathBuf::from(c));
        }
    }
    bail!(
        "{} not found (looked at ${env} and {}): run scripts/setup.sh, which installs Debian's \
         chromium and chromium-driver",
        candidates[0],
        candidates.join(", ")
    )
}

/// Runs a test body with a time limit; on expiry the body is dropped, and with it the
/// browser and the server.
pub(crate) async fn bounded(body: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(300), body)
        .await
        .context("the test took longer than 300 s")?
}

/// Chromium driven through chromedriver, both started by this test in their own process
/// group so that everything ends with the test.
pub(crate) struct Browser {
    client: Option<Client>,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub(crate) async fn start(viewport: Viewport) -> Result<Self> {
        let chromium = find_tool(
            "STARLING_CHROMIUM",
            &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        )?;
        let chromedriver = find_tool("STARLING_CHROMEDRIVER", &["/usr/bin/chromedriver"])?;
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = {
            use std::os::unix::process::CommandExt;
            let mut cmd = Command::new(&chromedriver);
            cmd.arg(format!("--port={port}"));
            // STARLING_CHROMEDRIVER_LOG=file: chromedriver's verbose log, for debugging.
            if let Ok(log) = std::env::var("STARLING_CHROMEDRIVER_LOG") {
                cmd.args(["--verbose", &format!("--log-path={log}")]);
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {}", chromedriver.display()))?
        };
        let profile = tempfile::tempdir()?;
        let mut browser = Browser {
            client: None,
            driver,
            _profile: profile,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("chromedriver did not listen on port {port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-breakpad".into(),
            "--disable-crash-reporter".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let mut options = json!({"binary": chromium});
        match viewport {
            Viewport::Phone => {
                options["mobileEmulation"] = json!({
                    "deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 3.0, "touch": true},
                    "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 \
                                  (KHTML, like Gecko) Chrome/126.0 Mobile Safari/537.36",
                });
            }
            Viewport::Desktop => args.push("--window-size=1280,800".into()),
        }
        options["args"] = json!(args);
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("cannot open a Chromium session through chromedriver")?;
        if let Viewport::Desktop = viewport {
            client.set_window_size(1280, 800).await?;
        }
        browser.client = Some(client);
        Ok(browser)
    }

    pub(crate) fn client(&self) -> &Client {
        self.client.as_ref().expect("started")
    }

    pub(crate) async fn close(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
    }
}

pub(crate) struct Server {
    pub(crate) running: Running,
    pub(crate) http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(goal: u32, plan: Plan) -> Result<Self> {
        Self::start_with(goal, plan, |_| {}).await
    }

    /// [`Server::start`]'s task, changed by `adjust` first.
    async fn start_with(
        goal: u32,
        plan: Plan,
        adjust: impl FnOnce(&mut TaskSettings),
    ) -> Result<Self> {
        let mut task = TaskSettings {
            plan: Some(starling_server::settings::plan_table(&plan)),
            rounds: RoundPolicy {
                goal,
                min: goal,
                deadline_secs: 300.0,
                overcommit: 2.0,
                retry_secs: 1.0,
            },
            // Test-sized rounds, every device on 127.0.0.1: said explicitly.
            min_cohort: goal,
            max_assignments_per_address: 100,
            ..TaskSettings::default()
        };
        adjust(&mut task);
        Self::start_task(task).await
    }

    async fn start_task(task: TaskSettings) -> Result<Self> {
        Self::start_settings(task, |_| {}).await
    }

    /// A server with this one task, its settings changed by `adjust` first.
    pub(crate) async fn start_settings(
        task: TaskSettings,
        adjust: impl FnOnce(&mut Settings),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::default();
        settings.server.data_dir = dir.path().to_path_buf();
        settings.tasks = vec![task];
        adjust(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(Server {
            running: starling_server::spawn(settings, listener).await?,
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.url())
    }

    pub(crate) async fn json(&self, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(self.url(path))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub(crate) async fn model_bytes(&self) -> Result<Vec<u8>> {
        let r = self
            .http
            .get(self.url("/v1/tasks/linear/model"))
            .send()
            .await?;
        Ok(r.error_for_status()?.bytes().await?.to_vec())
    }
}

fn demo_plan() -> Plan {
    Plan {
        epochs: 20,
        batch_size: 2,
        learning_rate: 0.05,
        ..Plan::default()
    }
}

pub(crate) fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots")
}

pub(crate) async fn screenshot(c: &Client, name: &str) -> Result<()> {
    let dir = screenshots_dir();
    std::fs::create_dir_all(&dir)?;
    let png = c.screenshot().await?;
    std::fs::write(dir.join(format!("{name}.png")), png)?;
    Ok(())
}

pub(crate) async fn scroll_to(c: &Client, css: &str) -> Result<()> {
    c.execute(
        "document.querySelector(arguments[0]).scrollIntoView({block: 'start'}); return true;",
        vec![json!(css)],
    )
    .await?;
    Ok(())
}

/// What the page says, for failure messages.
async fn page_messages(c: &Client) -> String {
    c.execute(
        "return ['banner', 'data-status', 'status', 'conn', 'admin-result'].map(id => \
           id + ': ' + (document.getElementById(id) || {}).textContent).join(' | ');",
        vec![],
    )
    .await
    .map(|v| v.as_str().unwrap_or_default().to_string())
    .unwrap_or_default()
}

/// Waits until the JS expression `cond` is true.
pub(crate) async fn wait_for(c: &Client, cond: &str, what: &str) -> Result<()> {
    let script = format!("return Boolean({cond});");
    let started = Instant::now();
    loop {
        if c.execute(&script, vec![]).await? == json!(true) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "timed out waiting for {what}; the page says: {}",
                page_messages(c).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn text(c: &Client, css: &str) -> Result<String> {
    Ok(c.find(Locator::Css(css)).await?.text().await?)
}

/// The values of parameter `name` as the page shows them (full precision).
async fn page_param(c: &Client, name: &str) -> Result<Vec<f32>> {
    let el = c
        .find(Locator::Css(&format!("td[data-param='{name}']")))
        .await?;
    let values: Vec<f64> =
        serde_json::from_str(&el.attr("data-values").await?.unwrap_or_default())?;
    Ok(values.into_iter().map(|v| v as f32).collect())
}

/// The server's scalar parameter `name` from `GET /v1/tasks/linear`.
fn server_param(task: &Value, name: &str) -> f32 {
    task["parameters"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no scalar parameter {name} in {task}")) as f32
}

pub(crate) async fn open_app(c: &Client, server: &Server, path: &str, version: u64) -> Result<()> {
    c.goto(&server.url(path)).await?;
    wait_for(
        c,
        &format!(
            "document.body.dataset.ready === 'true' && \
             document.getElementById('version').dataset.version === '{version}'"
        ),
        "the page to load the task",
    )
    .await
}

/// Types into the CSV box (after clearing it) the way a person would.
async fn type_csv(c: &Client, csv: &str) -> Result<()> {
    let area = c.find(Locator::Css("#csv")).await?;
    area.clear().await?;
    if !csv.is_empty() {
        area.send_keys(csv).await?;
    }
    Ok(())
}

/// Unusable data is refused with a message that says why.
async fn refuses_unusable_data(c: &Client) -> Result<()> {
    for (csv, expected) in [
        ("", "no data points"),
        ("1,2\n3,abc\n", "`abc` is not a number"),
        ("1,abc\n", "holds something other than numbers"),
        (
            "1,2,3\n4,5,6\n",
            "takes 1 feature column(s), the data has 2",
        ),
        ("1,2\n3,4,5\n", "line 2 has 3 values"),
    ] {
        type_csv(c, csv).await?;
        c.find(Locator::Css("#train")).await?.click().await?;
        let cond = format!(
            "document.getElementById('data-status').textContent.includes({})",
            json!(expected)
        );
        wait_for(c, &cond, &format!("the message `{expected}`")).await?;
        let status = text(c, "#status").await?;
        assert!(status.contains("usable data"), "{status}");
    }
    type_csv(c, "").await
}

/// Enters points: three through the point form, two more typed into the CSV box.
pub(crate) async fn enter_points(c: &Client) -> Result<usize> {
    for (x, y) in [("-1", "-1.1"), ("0.5", "2.05"), ("1.5", "3.9")] {
        c.find(Locator::Css("#col0")).await?.send_keys(x).await?;
        c.find(Locator::Css("#col1")).await?.send_keys(y).await?;
        c.find(Locator::Css("#add-point")).await?.click().await?;
    }
    c.find(Locator::Css("#csv"))
        .await?
        .send_keys("2,5.1\n-2,-2.9\n")
        .await?;
    wait_for(
        c,
        "document.getElementById('data-status').textContent.includes('5 points ready')",
        "5 points to be ready",
    )
    .await?;
    Ok(5)
}

/// Trains on the device (no upload) and checks that the loss went down.
async fn trial_run(c: &Client) -> Result<()> {
    c.find(Locator::Css("#train")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('loss-after').dataset.loss !== undefined",
        "the trial run to finish",
    )
    .await?;
    let before: f64 = text(c, "#loss-before").await?.parse()?;
    let after: f64 = text(c, "#loss-after").await?.parse()?;
    assert!(after < before, "loss {before} -> {after}");
    let progress = c
        .execute(
            "const p = document.getElementById('progress'); return p.value / p.max;",
            vec![],
        )
        .await?;
    assert_eq!(progress.as_f64(), Some(1.0));
    Ok(())
}

/// Contributes and waits until the page shows the committed version `version`.
async fn contribute(c: &Client, round: u64, version: u64) -> Result<()> {
    c.find(Locator::Css("#contribute")).await?.click().await?;
    wait_for(
        c,
        &format!("document.getElementById('status').dataset.accepted === '{round}'"),
        "the server to accept the update",
    )
    .await?;
    wait_for(
        c,
        &format!(
            "document.getElementById('status').dataset.committed === '{version}' && \
             document.getElementById('version').dataset.version === '{version}'"
        ),
        "the round to commit and the page to show the new model",
    )
    .await
}

/// The page's W and b are the server's.
async fn page_shows_server_model(c: &Client, server: &Server, version: u64) -> Result<()> {
    let task = server.json("/v1/tasks/linear").await?;
    assert_eq!(task["version"], version);
    assert_eq!(page_param(c, "W").await?, vec![server_param(&task, "W")]);
    assert_eq!(page_param(c, "b").await?, vec![server_param(&task, "b")]);
    Ok(())
}

async fn browser_round(viewport: Viewport, path: &str) -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(1, demo_plan()).await?;
    let browser = Browser::start(viewport).await?;
    let c = browser.client();
    let name = viewport.name();

    open_app(c, &server, path, 0).await?;
    page_shows_server_model(c, &server, 0).await?;
    assert_eq!(page_param(c, "W").await?, vec![5.0]);
    assert_eq!(page_param(c, "b").await?, vec![3.0]);
    screenshot(c, &format!("{name}-1-model")).await?;

    refuses_unusable_data(c).await?;
    screenshot(c, &format!("{name}-2-unusable-data")).await?;
    enter_points(c).await?;
    trial_run(c).await?;
    scroll_to(c, "#data-card").await?;
    screenshot(c, &format!("{name}-3-trained")).await?;

    contribute(c, 1, 1).await?;
    let status = text(c, "#status").await?;
    assert!(status.contains("committed"), "{status}");
    page_shows_server_model(c, &server, 1).await?;
    let task = server.json("/v1/tasks/linear").await?;
    assert_ne!(server_param(&task, "W"), 5.0, "the round changed the model");
    let rounds = server.json("/v1/tasks/linear/rounds").await?;
    assert_eq!(rounds["rounds"][0]["participants"], 1, "{rounds}");
    assert_eq!(rounds["rounds"][0]["examples"], 5, "{rounds}");
    scroll_to(c, "#model-card").await?;
    screenshot(c, &format!("{name}-4-committed")).await?;
    scroll_to(c, "#train-card").await?;
    screenshot(c, &format!("{name}-5-contributed")).await?;

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_viewport_trains_contributes_and_shows_the_new_model() -> Result<()> {
    bounded(browser_round(Viewport::Phone, "/")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_viewport_trains_contributes_and_shows_the_new_model() -> Result<()> {
    bounded(browser_round(Viewport::Desktop, "/app")).await
}

/// `starling demo` with browsers: one native device (the same `Device` loop `starling
/// device` runs) and one browser contribute to the same round of goal 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_and_a_native_device_share_a_round() -> Result<()> {
    bounded(mixed_round()).await
}

async fn mixed_round() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(2, demo_plan()).await?;
    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 0).await?;

    let native_points = 20;
    let data = synthetic_line(2.0, 1.0, (-2.0, 2.0), native_points, 0.1, 42);
    let mut device = Device::new(
        HttpTransport::new(&server.running.url()),
        data,
        DeviceOptions {
            rounds: Some(1),
            ..DeviceOptions::default()
        },
    );
    let report = device.run(|_| {}).await?;
    assert_eq!(report.contributions, 1);
    let task = server.json("/v1/tasks/linear").await?;
    assert_eq!(
        task["version"], 0,
        "one update of two: the round is still open"
    );
    assert_eq!(task["round"]["updates"], 1);

    let browser_points = enter_points(c).await?;
    contribute(c, 1, 1).await?;
    page_shows_server_model(c, &server, 1).await?;
    let rounds = server.json("/v1/tasks/linear/rounds").await?;
    let round = &rounds["rounds"][0];
    assert_eq!(round["participants"], 2, "{rounds}");
    assert_eq!(
        round["examples"],
        native_points + browser_points,
        "{rounds}"
    );
    assert_eq!(round["version"], 1, "{rounds}");
    scroll_to(c, "#train-card").await?;
    screenshot(c, "mixed-round").await?;

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

/// Buffered asynchronous mode (FedBuff) with a browser and native devices over HTTP: no
/// rounds to wait for; every two accepted updates make a version, and an update built on a
/// version more than `max_staleness` behind is refused with `too_stale`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_and_native_devices_train_a_buffered_task() -> Result<()> {
    bounded(buffered_task()).await
}

async fn native_contribution(server: &Server, seed: u64) -> Result<()> {
    let data = synthetic_line(2.0, 1.0, (-2.0, 2.0), 20, 0.1, seed);
    let mut device = Device::new(
        HttpTransport::new(&server.running.url()),
        data,
        DeviceOptions {
            rounds: Some(1),
            ..DeviceOptions::default()
        },
    );
    let report = device.run(|_| {}).await?;
    assert_eq!(report.contributions, 1);
    Ok(())
}

/// Polls the task until its version reaches `version` (a step follows its last receipt).
async fn wait_version(server: &Server, version: u64) -> Result<Value> {
    let started = Instant::now();
    loop {
        let task = server.json("/v1/tasks/linear").await?;
        if task["version"].as_u64() >= Some(version) {
            return Ok(task);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("version {version} never came: {task}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn buffered_task() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    // Buffers of two (min_cohort 2, said by start_with's test-sized task).
    let server = Server::start_with(2, demo_plan(), |t| {
        t.buffered = Some(BufferedPolicy {
            buffer: 2,
            concurrency: 10,
            max_staleness: 1,
            ..BufferedPolicy::default()
        });
    })
    .await?;
    let task = server.json("/v1/tasks/linear").await?;
    assert_eq!(task["mode"], "buffered", "{task}");
    // A laggard checks in on version 0 and returns only after two versions.
    let laggard: Value = server
        .http
        .post(server.url("/v1/tasks/linear/checkin"))
        .json(&json!({"device": "laggard"}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(laggard["base_version"], 0, "{laggard}");

    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 0).await?;
    native_contribution(&server, 7).await?;
    let task = server.json("/v1/tasks/linear").await?;
    assert_eq!(task["version"], 0, "one update of two: no step yet");
    assert_eq!(task["round"]["updates"], 1);
    // The browser's update is the buffer's second: version 1.
    enter_points(c).await?;
    contribute(c, 1, 1).await?;
    page_shows_server_model(c, &server, 1).await?;
    // Two more native updates: version 2 (the step follows the second receipt).
    native_contribution(&server, 8).await?;
    native_contribution(&server, 9).await?;
    let task = wait_version(&server, 2).await?;
    assert_eq!(task["version"], 2, "{task}");
    let rounds = server.json("/v1/tasks/linear/rounds").await?;
    let rounds = rounds["rounds"].as_array().context("rounds")?;
    assert_eq!(rounds.len(), 2);
    assert!(rounds
        .iter()
        .all(|r| r["participants"] == 2 && r["status"] == "committed"));

    // The laggard's update is two versions behind, one more than allowed.
    let token = laggard["token"].as_str().context("token")?;
    let model = Model::new(ModelSpec::from_json(&task["spec"].to_string())?)?;
    let params = model.spec().init_params(0);
    let data = synthetic_line(2.0, 1.0, (-2.0, 2.0), 10, 0.1, 3);
    let (body, _) = train::local_update(
        &model,
        &params,
        &data,
        &demo_plan(),
        0,
        token.to_string(),
        |_| {},
    )?;
    let r = server
        .http
        .post(server.url(laggard["upload_url"].as_str().context("upload_url")?))
        .header("x-starling-token", token)
        .body(body)
        .send()
        .await?;
    assert_eq!(r.status(), reqwest::StatusCode::CONFLICT);
    let e: Value = r.json().await?;
    assert_eq!(e["error"]["code"], "too_stale", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("2 versions behind")),
        "{e}"
    );
    assert_eq!(server.json("/v1/tasks/linear").await?["version"], 2);
    scroll_to(c, "#train-card").await?;
    screenshot(c, "buffered").await?;

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

/// Federated evaluation in the browser: in an evaluation round the page scores the round's
/// model on the person's points and sends only the count, mean loss and accuracy; the server
/// records the same loss the native core computes for those points, and the model stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_answers_an_evaluation_round_with_its_score() -> Result<()> {
    bounded(browser_evaluation()).await
}

async fn browser_evaluation() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start_with(1, demo_plan(), |t| t.evaluate_every = 1).await?;
    native_contribution(&server, 11).await?;
    let task = wait_version(&server, 1).await?;
    assert_eq!(task["round"]["kind"], "evaluation", "{task}");

    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 1).await?;
    let points = enter_points(c).await?;
    c.find(Locator::Css("#contribute")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('status').dataset.evaluated === '2'",
        "the server to take the page's evaluation report",
    )
    .await?;
    let status = text(c, "#status").await?;
    assert!(status.contains("evaluation round"), "{status}");
    screenshot(c, "evaluation").await?;

    // The native core's score of version 1 on the same points.
    let checkpoint = checkpoint::decode(&server.model_bytes().await?)?;
    assert_eq!(checkpoint.version, 1, "evaluation moved no model");
    let model = Model::new(checkpoint.spec)?;
    let csv = "-1,-1.1\n0.5,2.05\n1.5,3.9\n2,5.1\n-2,-2.9\n";
    let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last)?;
    assert_eq!(data.len(), points);
    let native = model.evaluate(
        &checkpoint.params,
        data.features(),
        data.targets(),
        data.len(),
    );

    let history = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let h = server.json("/v1/tasks/linear/rounds").await?;
            if h["rounds"].as_array().is_some_and(|r| r.len() == 2) {
                return Ok::<Value, anyhow::Error>(h);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("the evaluation round closes")??;
    let eval = &history["rounds"][1];
    assert_eq!(eval["kind"], "evaluation", "{history}");
    assert_eq!(eval["status"], "evaluated");
    assert_eq!(eval["examples"], points);
    assert_eq!(
        eval["mean_loss"].as_f64(),
        Some(f64::from(native.loss)),
        "the page's score is the core's"
    );
    assert_eq!(server.json("/v1/tasks/linear").await?["version"], 1);

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

/// Same numbers everywhere: the page's WebAssembly trainer and the native `starling-core`
/// trainer give the same parameters for the same model, data and plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_training_matches_native_training() -> Result<()> {
    bounded(same_numbers()).await
}

async fn same_numbers() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start(1, demo_plan()).await?;
    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 0).await?;

    let line = starling_core::data::to_csv(&synthetic_line(2.0, 1.0, (-2.0, 2.0), 37, 0.2, 9));
    // From JSON, as a server would load it: a 2-8-1 network with tanh.
    let mlp = ModelSpec::from_json(
        r#"{"name": "mlp", "inputs": 2, "loss": "mse", "layers": [
            {"type": "dense", "units": 8},
            {"type": "tanh"},
            {"type": "dense", "units": 1, "bias_init": {"kind": "constant", "value": 0.1}}
        ]}"#,
    )?;
    let mlp_checkpoint = checkpoint::encode("mlp", 0, &mlp, &mlp.init_params(3));
    let mut mlp_csv = String::from("a,b,y\n");
    for i in 0..50 {
        let (a, b) = ((i as f32 * 0.37).sin(), (i as f32 * 0.11).cos());
        mlp_csv.push_str(&format!("{a},{b},{}\n", a * b + 0.5 * a));
    }
    let served = server.model_bytes().await?;
    let cases: Vec<(&str, Vec<u8>, String, Plan)> = vec![
        (
            "linear, the demo plan",
            served.clone(),
            line.clone(),
            demo_plan(),
        ),
        (
            "linear, shuffled, momentum",
            served.clone(),
            line.clone(),
            Plan {
                epochs: 7,
                batch_size: 5,
                learning_rate: 0.02,
                momentum: 0.9,
                shuffle: true,
                seed: 11,
                mu: 0.0,
                partial_work: false,
                evaluate_after_training: false,
                requires: Default::default(),
            },
        ),
        (
            "linear, full batch in file order",
            served,
            line,
            Plan {
                epochs: 50,
                batch_size: 64,
                learning_rate: 0.1,
                shuffle: false,
                ..Plan::default()
            },
        ),
        (
            "MLP 2-8-1 with tanh, FedProx",
            mlp_checkpoint,
            mlp_csv,
            Plan {
                epochs: 10,
                batch_size: 8,
                learning_rate: 0.05,
                momentum: 0.5,
                shuffle: true,
                seed: 5,
                mu: 0.3,
                partial_work: false,
                evaluate_after_training: false,
                requires: Default::default(),
            },
        ),
    ];
    for (what, ckpt, csv, plan) in cases {
        let web = c
            .execute_async(
                "const [csv, plan, bytes, done] = arguments; \
                 window.starling.train(csv, plan, bytes).then(r => done({ok: r}), \
                                                             e => done({err: String(e)}));",
                vec![
                    json!(csv),
                    json!(serde_json::to_string(&plan)?),
                    json!(ckpt),
                ],
            )
            .await?;
        let web = web
            .get("ok")
            .with_context(|| format!("{what}: the page's training failed: {web}"))?;

        let decoded = checkpoint::decode(&ckpt)?;
        let model = Model::new(decoded.spec)?;
        let mut params = decoded.params;
        let data = Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last)?;
        let report = train::train(&model, &mut params, &data, &plan, |_| {})?;

        let mut worst = 0.0f32;
        for (name, tensor) in params.iter() {
            let values = web["parameters"][name]
                .as_array()
                .with_context(|| format!("{what}: no parameter {name} in {web}"))?;
            assert_eq!(values.len(), tensor.len(), "{what}: {name}");
            for (w, &n) in values.iter().zip(tensor.data()) {
                let w = w.as_f64().context("a number")? as f32;
                // Float32 rounding: native builds may fuse multiply-adds or sum in another
                // order (SIMD GEMM kernels); the difference stays within a few ulps.
                let rel = (w - n).abs() / n.abs().max(1.0);
                worst = worst.max(rel);
                assert!(rel <= 1e-5, "{what}: {name}: web {w} vs native {n}");
            }
        }
        let web_loss = web["lossAfter"].as_f64().context("lossAfter")? as f32;
        let rel = (web_loss - report.after.loss).abs() / report.after.loss.abs().max(1.0);
        assert!(
            rel <= 1e-5,
            "{what}: loss web {web_loss} vs native {}",
            report.after.loss
        );
        eprintln!("{what}: largest relative difference {worst:e}");
    }

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

/// FedProx's partial work in the page: a plan whose training would take far longer than the
/// round's deadline allows stops on the page's clock in time to upload, and the server counts
/// the update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_short_of_time_sends_partial_work() -> Result<()> {
    bounded(partial_work_round()).await
}

async fn partial_work_round() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let deadline_secs = 6.0;
    // 10^8 one-example steps: minutes of training even for `linear` in WebAssembly.
    let plan = Plan {
        epochs: 20_000_000,
        batch_size: 1,
        learning_rate: 0.01,
        mu: 0.1,
        partial_work: true,
        ..Plan::default()
    };
    let server = Server::start_task(TaskSettings {
        plan: Some(starling_server::settings::plan_table(&plan)),
        rounds: RoundPolicy {
            goal: 1,
            min: 1,
            deadline_secs,
            overcommit: 1.0,
            retry_secs: 1.0,
        },
        // A test-sized round, every device on 127.0.0.1: said explicitly.
        min_cohort: 1,
        max_assignments_per_address: 100,
        ..TaskSettings::default()
    })
    .await?;
    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 0).await?;
    let points = enter_points(c).await?;
    let plan_text = text(c, "#plan").await?;
    assert!(plan_text.contains("stops early"), "{plan_text}");

    // A round nobody joined stays open for another period: start near the beginning of one,
    // so the page gets about 4 s of training and 1 s for the upload.
    let started = Instant::now();
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        if server.running.tasks[0].status().round.deadline_ms - now_ms >= 5000 {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the round's deadline never moved on");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.find(Locator::Css("#contribute")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('status').dataset.accepted !== undefined",
        "the server to accept the partial update",
    )
    .await?;
    let steps: u64 = c
        .execute(
            "return document.getElementById('status').dataset.steps;",
            vec![],
        )
        .await?
        .as_str()
        .context("data-steps")?
        .parse()?;
    let planned: u64 = c
        .execute(
            "return document.getElementById('status').dataset.plannedSteps;",
            vec![],
        )
        .await?
        .as_str()
        .context("data-planned-steps")?
        .parse()?;
    assert_eq!(planned, 100_000_000);
    assert!(steps >= 1 && steps < planned, "{steps} of {planned} steps");
    // The status line said so ("... stopped early to meet the round's deadline"), but in a
    // round of one the commit's message may already have replaced it.
    eprintln!("the page trained {steps} of {planned} steps");

    // The round committed with the update, weighted by the examples it trained on: every
    // point, since training got past the first epoch.
    let mut st = server.running.tasks[0].subscribe();
    let record = tokio::time::timeout(
        Duration::from_secs(30),
        st.wait_for(|s| s.last_round.is_some()),
    )
    .await??
    .last_round
    .clone()
    .context("a round record")?;
    assert_eq!(record.version, Some(1), "{record:?}");
    assert_eq!(record.participants, 1);
    assert_eq!(record.examples, points as u64);
    screenshot(c, "partial-work").await?;

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

/// An enrolled task: the page opened from the operator's link (`#enroll=<secret>`) enrolls
/// once, drops the secret from the address bar, keeps its credential, and contributes to a
/// round with an enrolled native device; reopened without the link, it is still enrolled.
#[tokio::test]
async fn a_browser_enrolls_from_a_link_and_trains_an_enrolled_task() -> Result<()> {
    bounded(enrolled_task()).await
}

async fn enrolled_task() -> Result<()> {
    use starling_server::settings::{Admission, Secret};
    const SECRET: &str = "browser-enrollment-secret-42";
    let _one = ONE_BROWSER.lock().await;
    let server = Server::start_with(2, demo_plan(), |t| {
        t.admission = Some(Admission::Enrolled);
        t.enrollment_secret = Some(Secret::new(SECRET));
    })
    .await?;
    let browser = Browser::start(Viewport::Phone).await?;
    let c = browser.client();

    // Without a credential the page says how to get one, and the server refuses it.
    open_app(c, &server, "/app/", 0).await?;
    let text = c.find(Locator::Css("#enrollment")).await?.text().await?;
    assert!(text.contains("enrolled devices only"), "{text}");

    open_app(c, &server, &format!("/app/?task=linear#enroll={SECRET}"), 0).await?;
    wait_for(
        c,
        "document.body.dataset.enrolled !== undefined",
        "the page to enroll",
    )
    .await?;
    let href = c.execute("return location.href", vec![]).await?;
    assert!(!href.to_string().contains(SECRET), "{href}");

    // The browser's update, then an enrolled native device's: the round of two commits.
    enter_points(c).await?;
    c.find(Locator::Css("#contribute")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('status').dataset.accepted === '1'",
        "the server to accept the browser's update",
    )
    .await?;
    let transport = HttpTransport::new(&server.running.url());
    let enrolled = transport.enroll("linear", SECRET, Some("native")).await?;
    let mut native = Device::new(
        transport.with_credential(&enrolled.credential),
        synthetic_line(2.0, 1.0, (-2.0, 2.0), 20, 0.1, 11),
        DeviceOptions {
            rounds: Some(1),
            ..DeviceOptions::default()
        },
    );
    assert_eq!(native.run(|_| {}).await?.contributions, 1);
    wait_for(
        c,
        "document.getElementById('status').dataset.committed === '1'",
        "the round to commit",
    )
    .await?;
    page_shows_server_model(c, &server, 1).await?;
    let rounds = server.json("/v1/tasks/linear/rounds").await?;
    assert_eq!(rounds["rounds"][0]["participants"], 2, "{rounds}");

    // Reopened without the link: still enrolled, with the credential it kept.
    open_app(c, &server, "/app/", 1).await?;
    let text = c.find(Locator::Css("#enrollment")).await?.text().await?;
    assert!(text.contains("is enrolled"), "{text}");
    screenshot(c, "enrolled").await?;
    Ok(())
}
