//! A secure round (`[tasks.secure_aggregation]`) with the device app in headless Chromium
//! beside native devices: the page loads secure aggregation's own module only for the
//! secure round, goes through the four steps over HTTP with `starling device`'s code on the
//! other side of the round, and the round commits what plain FedAvg of the same updates
//! makes, within the quantisation error.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fantoccini::Locator;
use serde_json::Value;
use starling_client::{Device, DeviceOptions, HttpTransport};
use starling_core::data::{synthetic_line, TargetColumn};
use starling_core::trainer::train::{self, Progress};
use starling_core::wire::{checkpoint, params::f32s_from_le, update};
use starling_core::{Dataset, Model, Plan};
use starling_server::settings::{plan_table, RoundPolicy, SecureAggregationPolicy, TaskSettings};

use crate::browser::{
    bounded, enter_points, open_app, screenshot, scroll_to, wait_for, Browser, Server, Viewport,
    ONE_BROWSER,
};

/// Native devices beside the browser; the round needs every one of them.
const NATIVE: usize = 2;
const DEVICES: usize = NATIVE + 1;
/// The example count that weighs 1.
const CAP: u64 = 40;
const CLIP: f64 = 10.0;

fn plan() -> Plan {
    Plan {
        epochs: 20,
        batch_size: 2,
        learning_rate: 0.05,
        ..Plan::default()
    }
}

fn native_data(i: usize) -> Dataset {
    synthetic_line(2.0, 1.0, (0.0, 1.0), 20 + 5 * i, 0.1, i as u64 + 1)
}

/// The browser's status texts as they change, with the secure step beside each, so the
/// test can tell what the person was shown.
const RECORD_STATUS: &str = "window.seen = []; \
     const s = document.getElementById('status'); \
     new MutationObserver(() => window.seen.push((s.dataset.secure || '') + ' ' + s.textContent)) \
       .observe(s, {childList: true, characterData: true, subtree: true, attributes: true}); \
     return true;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_and_native_devices_complete_a_secure_round() -> Result<()> {
    bounded(secure_round()).await
}

async fn secure_round() -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    let task = TaskSettings {
        plan: Some(plan_table(&plan())),
        rounds: RoundPolicy {
            goal: DEVICES as u32,
            min: DEVICES as u32,
            deadline_secs: 120.0,
            overcommit: 1.0,
            retry_secs: 0.2,
        },
        min_cohort: DEVICES as u32,
        max_assignments_per_address: 100,
        max_examples_per_update: CAP,
        secure_aggregation: Some(SecureAggregationPolicy {
            clip: CLIP,
            ..SecureAggregationPolicy::default()
        }),
        ..TaskSettings::default()
    };
    let server = Server::start_settings(task, |_| {}).await?;
    let served = checkpoint::decode(&server.model_bytes().await?)?;
    let browser = Browser::start(Viewport::Desktop).await?;
    let c = browser.client();
    open_app(c, &server, "/app/", 0).await?;
    let browser_points = enter_points(c).await?;
    let csv = c
        .execute("return document.getElementById('csv').value;", vec![])
        .await?
        .as_str()
        .context("the page's CSV text")?
        .to_string();
    // The secure module is not loaded for a page that has not met a secure round.
    let loaded = c
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
               .filter(n => n.includes('secure')).length;",
            vec![],
        )
        .await?;
    assert_eq!(loaded, 0, "the secure module loads only for a secure round");

    // The native devices check in first, advertise their keys and wait for the browser:
    // the advertise step closes only at three keys.
    let url = server.running.url();
    let natives: Vec<_> = (0..NATIVE)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut device = Device::new(
                    HttpTransport::new(&url),
                    native_data(i),
                    DeviceOptions {
                        rounds: Some(1),
                        request_timeout: Duration::from_secs(10),
                        ..DeviceOptions::default()
                    },
                );
                device.run(|_| {}).await
            })
        })
        .collect();
    wait_assigned(&server, NATIVE).await?;

    c.execute(RECORD_STATUS, vec![]).await?;
    c.find(Locator::Css("#contribute")).await?.click().await?;
    wait_for(
        c,
        "document.getElementById('status').dataset.secure === 'done' && \
         document.getElementById('status').dataset.accepted === '1'",
        "the browser to finish its part of the secure round",
    )
    .await?;
    for n in natives {
        let report = n.await??;
        assert_eq!(report.contributions, 1, "a native device's part");
    }
    wait_for(
        c,
        "document.getElementById('status').dataset.committed === '1' && \
         document.getElementById('version').dataset.version === '1'",
        "the secure round to commit and the page to show it",
    )
    .await?;

    // The person was told where the round was, step by step.
    let seen: Vec<String> =
        serde_json::from_value(c.execute("return window.seen;", vec![]).await?)?;
    for (step, text) in [
        ("keys", "Secure round: sharing keys"),
        ("shares", "Secure round: sending encrypted key shares"),
        ("input", "Secure round: sending the masked update"),
        (
            "unmask",
            "Secure round: helping the server remove the masks",
        ),
        ("done", "masked"),
    ] {
        assert!(
            seen.iter()
                .any(|s| s.starts_with(&format!("{step} ")) && s.contains(text)),
            "the page never said `{text}` at step {step}: {seen:#?}"
        );
    }
    let loaded: Vec<String> = serde_json::from_value(
        c.execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
               .filter(n => n.includes('secure'));",
            vec![],
        )
        .await?,
    )?;
    assert!(
        loaded
            .iter()
            .any(|n| n.ends_with("/app/starling_web_secure_bg.wasm")),
        "{loaded:?}"
    );
    scroll_to(c, "#train-card").await?;
    screenshot(c, "secure-round").await?;

    // Every device's masked input was in the sum: the browser was among the survivors.
    let rounds = server.json("/v1/tasks/linear/rounds").await?;
    let round = &rounds["rounds"][0];
    assert_eq!(round["status"], "committed", "{rounds}");
    assert_eq!(round["participants"], DEVICES, "{rounds}");
    let examples: u64 = (browser_points as u64).min(CAP)
        + (0..NATIVE)
            .map(|i| native_data(i).len() as u64)
            .sum::<u64>();
    assert_eq!(round["examples"], examples, "{rounds}");

    // Plain FedAvg of the same updates, trained here as each device trained (the browser's
    // on the page's own CSV text; its training matches native training, see browser.rs).
    let model = Model::new(served.spec.clone())?;
    let layout = served.params.layout();
    let mut datasets: Vec<Dataset> = (0..NATIVE).map(native_data).collect();
    datasets.push(Dataset::from_csv(csv.as_bytes(), &TargetColumn::Last)?);
    let mut sum = vec![0.0f64; layout.numel()];
    let mut weight = 0.0;
    for data in &datasets {
        let (body, _) = train::local_update(
            &model,
            &served.params,
            data,
            &plan(),
            0,
            String::new(),
            |_: Progress| ControlFlow::<()>::Continue(()),
        )?;
        let view = update::decode(&body, &layout, None)?;
        let w = view.meta.examples.min(CAP) as f64;
        weight += w;
        let values = view.tensors.iter().flat_map(|t| f32s_from_le(t));
        for (s, v) in sum.iter_mut().zip(values) {
            *s += w * f64::from(v);
        }
    }
    let expected: Vec<f64> = served
        .params
        .iter()
        .flat_map(|(_, t)| t.data().iter().map(|&v| f64::from(v)))
        .zip(&sum)
        .map(|(b, s)| b + s / weight)
        .collect();
    let task = server.json("/v1/tasks/linear").await?;
    let got = [param(&task, "W")?, param(&task, "b")?];
    // Each device's values within one level of clip / (2^15 - 1), its weight within one
    // level of 1: the mean moves by at most a few such levels.
    let level = CLIP / 32767.0;
    for (e, g) in expected.iter().zip(&got) {
        assert!(
            (e - g).abs() < 4.0 * level,
            "committed {g}, plain FedAvg {e}"
        );
    }
    let base_w = f64::from(served.params.at(0).data()[0]);
    assert!(
        (got[0] - base_w).abs() > 100.0 * level,
        "the model moved: {got:?}"
    );
    eprintln!("secure round: committed {got:?}, plain FedAvg {expected:?}");

    browser.close().await;
    server.running.stop().await?;
    Ok(())
}

fn param(task: &Value, name: &str) -> Result<f64> {
    task["parameters"][name]
        .as_f64()
        .with_context(|| format!("no scalar parameter {name} in {task}"))
}

/// Waits until `n` devices hold assignments in the open round.
async fn wait_assigned(server: &Server, n: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let task = server.json("/v1/tasks/linear").await?;
        if task["round"]["assigned"].as_u64() >= Some(n as u64) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{n} native devices never checked in: {task}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
