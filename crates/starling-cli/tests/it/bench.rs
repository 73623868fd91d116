//! `starling bench train` as compare.sh (bench/pytorch) runs it: tiny settings, the JSON's
//! shape and positive figures (no timing assertions).

use serde_json::Value;

use crate::common::{fails, starling};

fn train(args: &[&str]) -> Value {
    let out = starling()
        .args(["bench", "train", "--seconds", "0.05", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn bench_train_reports_positive_examples_per_second_per_trainer() {
    for (model, params, threads) in [
        ("mlp", 199_210, 1),
        ("cnn", 1_663_370, 2),
        ("lstm", 818_137, 1),
    ] {
        let v = train(&["--model", model, "--threads", &threads.to_string()]);
        assert!(v["machine"].is_object(), "{v}");
        let t = &v["train"];
        assert_eq!(t["model"], model, "{v}");
        assert_eq!(t["parameters"], params, "{v}");
        assert_eq!(t["batch"], 10, "{v}");
        assert_eq!(t["threads"], threads, "{v}");
        assert!(t["steps"].as_u64().unwrap() > 0, "{v}");
        assert!(t["secs"].as_f64().unwrap() > 0.0, "{v}");
        assert!(t["examples_per_sec"].as_f64().unwrap() > 0.0, "{v}");
        let per = t["per_thread"].as_array().unwrap();
        assert_eq!(per.len(), threads, "{v}");
        assert!(per.iter().all(|x| x.as_f64().unwrap() > 0.0), "{v}");
    }
}

#[test]
fn bench_train_refuses_an_unknown_model() {
    let err = fails(starling().args(["bench", "train", "--model", "gru", "--seconds", "0.01"]));
    assert!(
        err.contains("unknown model `gru` (mlp, cnn, lstm)"),
        "{err}"
    );
}
