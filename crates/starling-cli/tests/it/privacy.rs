//! `starling privacy epsilon` and `starling privacy plan` as a user runs them, checked
//! against the core's committed dp-accounting reference table.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

use crate::common::starling;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../starling-core/tests/fixtures/dp_epsilon_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn run(args: &[&str]) -> Output {
    starling().arg("privacy").args(args).output().unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn epsilon_prints_dp_accountings_number() {
    let reference = reference();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["sampling_rate"] == 0.01
                && c["noise_multiplier"] == 1.0
                && c["steps"] == 1000
                && c["delta"] == 1e-5
        })
        .expect("the reference has q = 0.01, z = 1, T = 1000, δ = 1e-5");
    let expected = case["epsilon"].as_f64().unwrap();
    let args = [
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sampling-rate",
        "0.01",
        "--steps",
        "1000",
        "--delta",
        "1e-5",
    ];

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out: Value = serde_json::from_str(stdout_of(&run(&json_args)).trim()).unwrap();
    let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["epsilon"]);
    let eps = out["epsilon"].as_f64().unwrap();
    assert!(
        (eps - expected).abs() <= 0.01 * expected,
        "{eps} vs dp-accounting's {expected}"
    );

    let line = stdout_of(&run(&args));
    assert_eq!(line.lines().count(), 1, "{line}");
    let order = case["order"].as_f64().unwrap();
    assert!(
        line.starts_with("ε = ")
            && line.contains("at δ = 1e-5")
            && line.contains(&format!("(order {order})"))
            && line.contains("for 1000 steps of q = 0.01, z = 1"),
        "{line}"
    );
    let shown: f64 = line["ε = ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((shown - expected).abs() <= 0.01 * expected, "{line}");

    // Scientific notation for the steps.
    let out = stdout_of(&run(&[
        "epsilon",
        "--noise-multiplier",
        "1",
        "--sampling-rate",
        "0.01",
        "--steps",
        "1e3",
        "--delta",
        "1e-5",
        "--json",
    ]));
    let again: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(again["epsilon"].as_f64().unwrap(), eps);
}

#[test]
fn plan_finds_dp_accountings_noise_multiplier() {
    let reference = reference();
    let plan = &reference["plans"][0];
    let (epsilon, delta, q, steps) = (
        plan["epsilon"].to_string(),
        plan["delta"].as_f64().unwrap(),
        plan["sampling_rate"].to_string(),
        plan["steps"].to_string(),
    );
    let delta = format!("{delta:e}");
    let expected = plan["noise_multiplier"].as_f64().unwrap();
    let args = [
        "plan",
        "--epsilon",
        &epsilon,
        "--delta",
        &delta,
        "--sampling-rate",
        &q,
        "--steps",
        &steps,
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out: Value = serde_json::from_str(stdout_of(&run(&json_args)).trim()).unwrap();
    let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["noise_multiplier"]);
    let z = out["noise_multiplier"].as_f64().unwrap();
    assert!(
        (z - expected).abs() <= 1e-5,
        "{z} vs dp-accounting's {expected}"
    );

    // The planned noise keeps the budget, by `starling privacy epsilon`'s own account.
    let out = stdout_of(&run(&[
        "epsilon",
        "--noise-multiplier",
        &z.to_string(),
        "--sampling-rate",
        &q,
        "--steps",
        &steps,
        "--delta",
        &delta,
        "--json",
    ]));
    let spent: Value = serde_json::from_str(out.trim()).unwrap();
    let target: f64 = epsilon.parse().unwrap();
    assert!(spent["epsilon"].as_f64().unwrap() <= target, "{spent}");

    let line = stdout_of(&run(&args));
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with("z = ") && line.contains(&format!("keeps ε ≤ {target}")),
        "{line}"
    );
    let shown: f64 = line["z = ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(shown >= z && shown - z <= 1e-6, "{line}");
}

#[test]
fn bad_input_exits_2_with_a_reason() {
    for (args, reason) in [
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "0",
                "--sampling-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ][..],
            "noise multiplier must be positive",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "1.5",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "sampling rate must be in [0, 1]",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sampling-rate",
                "0.1",
                "--steps",
                "2.5",
                "--delta",
                "1e-5",
            ],
            "not a whole number of steps",
        ),
        (
            &[
                "plan",
                "--epsilon",
                "1",
                "--delta",
                "1",
                "--sampling-rate",
                "0.1",
                "--steps",
                "10",
            ],
            "delta must be in (0, 1)",
        ),
        (
            &[
                "plan",
                "--epsilon",
                "-2",
                "--delta",
                "1e-5",
                "--sampling-rate",
                "0.1",
                "--steps",
                "10",
            ],
            "target epsilon must be positive",
        ),
        (
            &["plan", "--epsilon", "1", "--delta", "1e-5", "--steps", "10"],
            "--sampling-rate",
        ),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
}
