//! The operator dashboard end to end: the real server on 127.0.0.1:0 with a classifier task
//! (`logistic`, federated evaluation every three rounds, an admin token), two native devices
//! (`starling_client::Device` over HTTP) training it for seven committed rounds, and
//! `/dashboard` in headless Chromium at desktop and phone sizes. The page's curves must be the
//! server's round records point for point, the open round's progress and a refused upload must
//! appear while the page is open, a rollback from the page must move the server's version, a
//! wrong token must show `unauthorized`, and a stopped server must be reported.
//!
//! Screenshots go to `target/screenshots/dashboard-{desktop,phone}.png`; with
//! `STARLING_UPDATE_SCREENSHOTS=1` they are also copied to `docs/img/` for the README.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fantoccini::{Client, Locator};
use serde_json::{json, Value};
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::TargetColumn;
use starling_core::{trainer::train, wire::checkpoint, Dataset, Model, Plan};
use starling_server::settings::{plan_table, RoundPolicy, Secret, TaskSettings};

use crate::browser::{
    bounded, screenshot, screenshots_dir, text, wait_for, Browser, Server, Viewport, ONE_BROWSER,
};

const TASK: &str = "classes";
const ADMIN_TOKEN: &str = "dashboard-test-admin-token";
/// Committed training rounds the devices run; with an evaluation round after every three.
const TRAINING_ROUNDS: u64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_live_task_and_rolls_it_back() -> Result<()> {
    bounded(dashboard()).await
}

/// The page and its files, each with the same-origin-only policy and an `ETag` that
/// revalidates; an unknown file is a JSON 404.
#[tokio::test]
async fn the_dashboard_is_served_with_its_policy() -> Result<()> {
    let server = start_server().await?;
    for (path, content_type) in [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
    ] {
        let r = server.http.get(server.url(path)).send().await?;
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        let csp = header("content-security-policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{path}: {csp}"
        );
        let etag = header("etag");
        let again = server
            .http
            .get(server.url(path))
            .header("if-none-match", &etag)
            .send()
            .await?;
        assert_eq!(again.status(), reqwest::StatusCode::NOT_MODIFIED, "{path}");
    }
    let html = server
        .http
        .get(server.url("/dashboard"))
        .send()
        .await?
        .text()
        .await?;
    assert!(html.contains("/dashboard/dashboard.js") && html.contains("/dashboard/dashboard.css"));
    let missing = server
        .http
        .get(server.url("/dashboard/nope.js"))
        .send()
        .await?;
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let e: Value = missing.json().await?;
    assert_eq!(e["error"]["code"], "not_found", "{e}");
    server.running.stop().await?;
    Ok(())
}

fn plan() -> Plan {
    Plan {
        epochs: 1,
        batch_size: 10,
        learning_rate: 0.2,
        ..Plan::default()
    }
}

/// A device's points: two features, the class is which side of a line they fall on (each
/// device sees another slice of the plane).
fn device_data(seed: u64) -> Result<Dataset> {
    let csv: String = (0..120u64)
        .map(|i| {
            let x = ((i * 37 + seed * 11) % 200) as f32 / 50.0 - 2.0;
            let y = ((i + seed * 7) as f32 * 0.37).sin();
            format!("{x},{y},{}\n", u8::from(x + 0.5 * y > 0.2))
        })
        .collect();
    Ok(Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last)?)
}

async fn start_server() -> Result<Server> {
    let task = TaskSettings {
        name: TASK.into(),
        model: "logistic".into(),
        inputs: 2,
        outputs: 2,
        plan: Some(plan_table(&plan())),
        rounds: RoundPolicy {
            goal: 2,
            min: 2,
            deadline_secs: 300.0,
            overcommit: 2.0,
            retry_secs: 0.2,
        },
        // Test-sized rounds, every device on 127.0.0.1: said explicitly.
        min_cohort: 2,
        max_assignments_per_address: 100,
        evaluate_every: 3,
        ..TaskSettings::default()
    };
    Server::start_settings(task, |s| {
        s.server.admin_token = Some(Secret::new(ADMIN_TOKEN));
    })
    .await
}

/// Two devices train together until each has `TRAINING_ROUNDS` accepted updates, answering
/// the evaluation rounds in between.
async fn train_rounds(server: &Server) -> Result<()> {
    let run = |i: u64| {
        let url = server.running.url();
        async move {
            let mut device = Device::new(
                HttpTransport::new(&url),
                device_data(i)?,
                DeviceOptions {
                    task: TASK.into(),
                    rounds: Some(TRAINING_ROUNDS),
                    device_id: format!("device-{i}"),
                    ..DeviceOptions::default()
                },
            );
            anyhow::Ok(device.run(|_| {}).await?)
        }
    };
    let (a, b) = tokio::join!(run(1), run(2));
    for report in [a?, b?] {
        assert_eq!(report.contributions, TRAINING_ROUNDS, "{report:?}");
        assert!(report.evaluations >= 1, "{report:?}");
    }
    // The last receipt comes before its round's commit.
    let mut status = server.running.tasks[0].subscribe();
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.model.version == TRAINING_ROUNDS),
    )
    .await
    .context("the last round commits")??;
    Ok(())
}

/// `(round, value)` of the points of one series of a chart, as the page's data attributes
/// say (the attribute is JS's shortest round-trip form of the number it drew).
async fn chart_points(c: &Client, chart: &str, series: &str) -> Result<Vec<(u64, f64)>> {
    let raw = c
        .execute(
            "return [...document.querySelectorAll(`#${arguments[0]} [data-series=\"${arguments[1]}\"][data-round]`)]\
               .map(p => [p.dataset.round, p.dataset.value]);",
            vec![json!(chart), json!(series)],
        )
        .await?;
    raw.as_array()
        .context("an array")?
        .iter()
        .map(|p| {
            let round = p[0].as_str().context("round")?.parse()?;
            let value = p[1].as_str().context("value")?.parse()?;
            Ok((round, value))
        })
        .collect()
}

/// `(round, field)` of the server's records of `status` that have `field`.
fn records(history: &Value, status: &str, field: &str) -> Vec<(u64, f64)> {
    history["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["status"] == status)
        .filter_map(|r| Some((r["round"].as_u64()?, r[field].as_f64()?)))
        .collect()
}

async fn attr(c: &Client, css: &str, name: &str) -> Result<String> {
    c.find(Locator::Css(css))
        .await
        .with_context(|| format!("no {css} on the page"))?
        .attr(name)
        .await?
        .with_context(|| format!("{css} has no {name}"))
}

/// The page's charts and round table are the server's records, point for point.
async fn charts_match_the_records(c: &Client, server: &Server) -> Result<Value> {
    let history = server.json(&format!("/v1/tasks/{TASK}/rounds")).await?;
    let trained = records(&history, "committed", "mean_loss");
    let evaluated = records(&history, "evaluated", "mean_loss");
    ensure!(
        trained.len() as u64 == TRAINING_ROUNDS && !evaluated.is_empty(),
        "{history}"
    );
    wait_for(
        c,
        &format!(
            "document.querySelectorAll('#loss-chart circle[data-series=\"training\"]').length === {} \
             && document.querySelectorAll('#loss-chart circle[data-series=\"evaluation\"]').length === {}",
            trained.len(),
            evaluated.len()
        ),
        "the loss chart to show every committed and evaluation round",
    )
    .await?;
    assert_eq!(chart_points(c, "loss-chart", "training").await?, trained);
    assert_eq!(
        chart_points(c, "loss-chart", "evaluation").await?,
        evaluated
    );
    assert_eq!(
        chart_points(c, "accuracy-chart", "training").await?,
        records(&history, "committed", "mean_accuracy")
    );
    assert_eq!(
        chart_points(c, "accuracy-chart", "evaluation").await?,
        records(&history, "evaluated", "mean_accuracy")
    );
    assert_eq!(
        attr(c, "#loss-svg", "data-points").await?,
        (trained.len() + evaluated.len()).to_string()
    );
    let participants = chart_points(c, "participants-chart", "training").await?;
    assert_eq!(participants, records(&history, "committed", "participants"));
    // The loss went down over the rounds: the curve is a learning curve.
    let (first, last) = (trained[0].1, trained[trained.len() - 1].1);
    assert!(last < first, "loss {first} -> {last}");
    let label = attr(c, "#loss-svg", "aria-labelledby").await?;
    assert_eq!(label, "loss-title loss-desc");
    let rows = c
        .execute(
            "return document.querySelectorAll('#rounds-body tr[data-round]').length;",
            vec![],
        )
        .await?;
    let all = history["rounds"].as_array().map_or(0, Vec::len);
    assert_eq!(rows.as_u64(), Some(all.min(20) as u64));
    Ok(history)
}

/// The open round's progress as the page shows it: `(round, updates, goal)`.
async fn page_progress(c: &Client) -> Result<(String, String, String)> {
    let card = format!(".task[data-task='{TASK}']");
    Ok((
        attr(c, &format!("{card} .round"), "data-round").await?,
        attr(c, &format!("{card} progress"), "data-updates").await?,
        attr(c, &format!("{card} progress"), "data-goal").await?,
    ))
}

async fn wait_progress(c: &Client, round: u64, updates: u64) -> Result<()> {
    wait_for(
        c,
        &format!(
            "(() => {{ const r = document.querySelector(\".task[data-task='{TASK}'] .round\"); \
               const p = r && r.querySelector('progress'); \
               return p && r.dataset.round === '{round}' && p.dataset.updates === '{updates}' \
                 && p.value === {updates} && p.max === 2; }})()"
        ),
        &format!("round {round} to show {updates} of 2 updates"),
    )
    .await
}

/// A device of our own: an assignment in the open round and its trained update, as
/// `(upload URL, token, body)`.
async fn assigned_update(server: &Server, device: &str) -> Result<(String, String, Vec<u8>)> {
    let assignment: Value = server
        .http
        .post(server.url(&format!("/v1/tasks/{TASK}/checkin")))
        .json(&json!({ "device": device }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(assignment["status"], "assigned", "{assignment}");
    assert_eq!(assignment["kind"], "training", "{assignment}");
    let model = server
        .http
        .get(server.url(&format!("/v1/tasks/{TASK}/model")))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let checkpoint = checkpoint::decode(&model)?;
    let token = assignment["token"].as_str().context("token")?.to_string();
    let (body, _) = train::local_update(
        &Model::new(checkpoint.spec)?,
        &checkpoint.params,
        &device_data(3)?,
        &plan(),
        checkpoint.version,
        token.clone(),
        |_| {},
    )?;
    let url = server.url(assignment["upload_url"].as_str().context("upload_url")?);
    Ok((url, token, body))
}

/// Uploads `body` with `token` in the header; the answer's status and JSON.
async fn upload(server: &Server, url: &str, token: &str, body: Vec<u8>) -> Result<(u16, Value)> {
    let answer = server
        .http
        .post(url)
        .header("x-starling-token", token)
        .body(body)
        .send()
        .await?;
    Ok((answer.status().as_u16(), answer.json().await?))
}

/// Enters `token` in the admin form and rolls back to `version`.
async fn roll_back_from_the_page(c: &Client, token: &str, version: u64) -> Result<()> {
    let input = c.find(Locator::Css("#token")).await?;
    input.clear().await?;
    input.send_keys(token).await?;
    c.find(Locator::Css("#use-token")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('token-state').textContent.includes('token is set')",
        "the page to take the token",
    )
    .await?;
    let field = c.find(Locator::Css("#rollback-version")).await?;
    field.clear().await?;
    field.send_keys(&version.to_string()).await?;
    c.execute(
        "const r = document.getElementById('admin-result'); r.textContent = ''; \
         delete r.dataset.ok; delete r.dataset.code; return true;",
        vec![],
    )
    .await?;
    c.find(Locator::Css("#rollback")).await?.click().await?;
    wait_for(
        c,
        "(() => { const d = document.getElementById('admin-result').dataset; \
           return d.ok === 'true' || d.code !== undefined; })()",
        "the rollback's answer",
    )
    .await
}

/// The whole page in one desktop screenshot: the window as tall as the document.
async fn full_page_screenshot(c: &Client, name: &str) -> Result<()> {
    let size = c
        .execute(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight];",
            vec![],
        )
        .await?;
    let height = size[0].as_u64().context("height")? + size[1].as_u64().unwrap_or(0);
    c.set_window_size(1280, height.clamp(800, 2400) as u32)
        .await?;
    c.execute("window.scrollTo(0, 0); return true;", vec![])
        .await?;
    // The charts are drawn at their box's width: wait until they fit it again.
    wait_for(
        c,
        "(() => { const host = document.getElementById('loss-chart'); \
           const svg = document.getElementById('loss-svg'); \
           return svg && Number(svg.getAttribute('width')) === Math.max(240, Math.floor(host.clientWidth)); })()",
        "the charts to fit the window",
    )
    .await?;
    screenshot(c, name).await
}

/// With `STARLING_UPDATE_SCREENSHOTS=1`, the README's copy of a screenshot.
fn publish_screenshot(name: &str) -> Result<()> {
    if std::env::var("STARLING_UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
        return Ok(());
    }
    let from = screenshots_dir().join(format!("{name}.png"));
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/img");
    std::fs::create_dir_all(&docs)?;
    std::fs::copy(&from, docs.join(format!("{name}.png")))
        .with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

async fn dashboard() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let server = start_server().await?;
    train_rounds(&server).await?;
    let task = server.json(&format!("/v1/tasks/{TASK}")).await?;
    let version = task["version"].as_u64().context("version")?;
    assert_eq!(version, TRAINING_ROUNDS, "{task}");
    let open = task["round"]["round"].as_u64().context("round")?;
    assert_eq!(task["round"]["kind"], "training", "{task}");
    assert_eq!(task["round"]["updates"], 0, "{task}");

    // Desktop.
    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    c.goto(&server.url("/dashboard")).await?;
    wait_for(
        c,
        "document.body.dataset.ready === 'true'",
        "the dashboard to load",
    )
    .await?;
    charts_match_the_records(c, &server).await?;
    wait_progress(c, open, 0).await?;
    assert_eq!(
        page_progress(c).await?,
        (open.to_string(), "0".into(), "2".into())
    );
    assert_eq!(
        attr(c, &format!(".task[data-task='{TASK}']"), "data-version").await?,
        version.to_string()
    );
    c.find(Locator::Css("#no-refusals")).await?;

    // While the page is open: an upload with a wrong token (refused), then the real one.
    let (url, token, body) = assigned_update(&server, "operator-probe").await?;
    let (status, answer) = upload(&server, &url, "not-the-assignment-token", body.clone()).await?;
    assert_eq!(
        answer["error"]["code"], "invalid_token",
        "{status} {answer}"
    );
    let (status, answer) = upload(&server, &url, &token, body).await?;
    assert_eq!(status, 202, "{answer}");
    wait_for(
        c,
        "document.querySelector('#refusals tr[data-code=\"invalid_token\"][data-count=\"1\"]') !== null",
        "the refused upload to be counted",
    )
    .await?;
    wait_progress(c, open, 1).await?;
    let totals = text(c, "#update-totals").await?;
    let accepted = 2 * TRAINING_ROUNDS + 1;
    assert!(
        totals.contains(&format!("{accepted} updates accepted, 1 refused")),
        "{totals}"
    );
    let conn = text(c, "#conn").await?;
    assert_eq!(conn, "live");

    // The admin section: a wrong token is refused, the right one rolls back.
    roll_back_from_the_page(c, "a-wrong-token-of-some-length", 3).await?;
    assert_eq!(attr(c, "#admin-result", "data-code").await?, "unauthorized");
    let said = text(c, "#admin-result").await?;
    assert!(said.contains("unauthorized: "), "{said}");
    assert_eq!(
        server.json(&format!("/v1/tasks/{TASK}")).await?["version"],
        version
    );
    roll_back_from_the_page(c, ADMIN_TOKEN, 3).await?;
    let said = text(c, "#admin-result").await?;
    ensure!(
        attr(c, "#admin-result", "data-ok").await.is_ok(),
        "the rollback failed: {said}"
    );
    let task = server.json(&format!("/v1/tasks/{TASK}")).await?;
    assert_eq!(task["version"], version + 1, "{task}");
    assert_eq!(
        attr(c, "#admin-result", "data-version").await?,
        (version + 1).to_string()
    );
    assert!(
        said.contains(&format!("version 3 restored as version {}", version + 1)),
        "{said}"
    );
    let history = server.json(&format!("/v1/tasks/{TASK}/rounds")).await?;
    let last = history["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .context("a record")?;
    assert_eq!(last["reason"], "rolled_back", "{last}");
    // The page follows: the new version on the card, the rollback in the table.
    wait_for(
        c,
        &format!(
            "document.querySelector(\".task[data-task='{TASK}']\").dataset.version === '{}' \
             && document.querySelector('#rounds-body tr[data-round=\"{}\"][data-status=\"abandoned\"]') !== null",
            version + 1,
            last["round"]
        ),
        "the page to show the rolled-back version",
    )
    .await?;
    let row = text(
        c,
        &format!("#rounds-body tr[data-round=\"{}\"]", last["round"]),
    )
    .await?;
    assert!(row.contains("rolled_back"), "{row}");
    // The device list answers: an open task has no enrolled devices.
    wait_for(
        c,
        "document.getElementById('devices-open') !== null",
        "the device list of an open task",
    )
    .await?;
    // Pause and resume from the page: the server's task follows each click.
    for (button, status) in [("#pause", "paused"), ("#resume", "training")] {
        c.execute(
            "const r = document.getElementById('admin-result'); r.textContent = ''; \
             delete r.dataset.ok; delete r.dataset.code; return true;",
            vec![],
        )
        .await?;
        c.find(Locator::Css(button)).await?.click().await?;
        wait_for(
            c,
            "document.getElementById('admin-result').dataset.ok === 'true'",
            "the pause or resume answer",
        )
        .await?;
        let now = server.json(&format!("/v1/tasks/{TASK}")).await?;
        assert_eq!(now["status"], status, "{now}");
    }
    // The round after the rollback's takes an update; the page follows.
    let open = task["round"]["round"].as_u64().context("round")?;
    let (url, token, body) = assigned_update(&server, "operator-probe-2").await?;
    let (status, answer) = upload(&server, &url, &token, body).await?;
    assert_eq!(status, 202, "{answer}");
    wait_progress(c, open, 1).await?;
    full_page_screenshot(c, "dashboard-desktop").await?;
    browser.close().await;

    // Phone: the same data, nothing wider than the screen.
    let browser = Browser::start(Viewport::Phone).await?;
    let c = browser.client();
    c.goto(&server.url("/dashboard")).await?;
    wait_for(
        c,
        "document.body.dataset.ready === 'true'",
        "the dashboard to load",
    )
    .await?;
    charts_match_the_records(c, &server).await?;
    let width = c
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth];",
            vec![],
        )
        .await?;
    assert_eq!(width[1], 390, "{width}");
    assert!(
        width[0].as_u64() <= width[1].as_u64(),
        "the page is wider than the phone: {width}"
    );
    let svg_width: u64 = attr(c, "#loss-svg", "width").await?.parse()?;
    assert!(svg_width <= 390, "{svg_width}");
    screenshot(c, "dashboard-phone").await?;

    // The server goes away: the page says so and keeps what it showed.
    server.running.stop().await?;
    wait_for(
        c,
        "document.getElementById('conn').dataset.state === 'down' \
         && !document.getElementById('banner').hidden",
        "the page to report the server unreachable",
    )
    .await?;
    let banner = text(c, "#banner").await?;
    assert!(banner.contains("Cannot read the server"), "{banner}");
    c.find(Locator::Css("#loss-chart circle")).await?;
    browser.close().await;

    for name in ["dashboard-desktop", "dashboard-phone"] {
        publish_screenshot(name)?;
    }
    Ok(())
}
