//! The simulator on small synthetic data: reproducibility, learning, drop-outs and
//! stragglers on the virtual clock, server strategies and FedProx, results files, and loader
//! and configuration errors.

use rand::{Rng, SeedableRng};
use starling_core::{trainer::builtin, Dataset, Plan};
use starling_sim::data::{self, Partition};
use starling_sim::{Federation, RoundMetrics, Sample, SimConfig};

/// Four Gaussian blobs in 8 dimensions, labelled by blob.
fn blobs(n: usize, seed: u64) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let c = rng.random_range(0..4usize);
        for j in 0..8 {
            let center = if j % 4 == c { 1.0 } else { 0.0 };
            x.push(center + rng.random_range(-1.0f32..1.0));
        }
        y.push(c as f32);
    }
    Dataset::new(x, y, 8, 1).unwrap()
}

fn federation(how: Partition, devices: usize) -> Federation {
    let train = blobs(2000, 1);
    let parts = data::partition_dataset(&train, how, devices, 4, 7).unwrap();
    Federation::from_partition(&train, &parts, blobs(500, 2)).unwrap()
}

fn config(rounds: u32) -> SimConfig {
    let plan = Plan {
        epochs: 1,
        batch_size: 10,
        learning_rate: 0.1,
        ..Plan::default()
    };
    SimConfig::new(
        builtin::logistic(8, 4),
        plan,
        Sample::Fraction(0.2),
        rounds,
        42,
    )
}

fn run(config: &SimConfig, fed: &Federation) -> starling_sim::SimReport {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(config, fed, |_| {}))
        .unwrap()
}

/// Everything but the wall clock.
fn deterministic(rounds: &[RoundMetrics]) -> Vec<RoundMetrics> {
    rounds
        .iter()
        .map(|r| RoundMetrics {
            wall_secs: 0.0,
            ..r.clone()
        })
        .collect()
}

#[test]
fn same_seed_same_numbers_and_the_model_learns() {
    let fed = federation(Partition::Iid, 50);
    let mut c = config(8);
    c.dropout = 0.2;
    let a = run(&c, &fed);
    let b = run(&c, &fed);
    assert_eq!(deterministic(&a.rounds), deterministic(&b.rounds));
    assert_eq!(a.rounds.len(), 8);
    let first = a.rounds[0].test_accuracy.unwrap();
    let last = a.final_accuracy.unwrap();
    assert!(last > 0.8 && last >= first, "accuracy {first} -> {last}");
    assert!(
        a.final_loss.unwrap() < a.rounds[0].test_loss,
        "test loss falls"
    );
    assert!(a
        .rounds
        .iter()
        .all(|r| r.sampled == 10 && r.bytes_up > 0 && r.bytes_down > 0));
    // Devices report their local accuracy; the round records its example-weighted mean.
    assert!(a
        .rounds
        .iter()
        .all(|r| r.train_accuracy.is_some_and(|x| (0.0..=1.0).contains(&x))));
    // Another seed draws other devices.
    c.seed = 43;
    let d = run(&c, &fed);
    assert_ne!(deterministic(&a.rounds), deterministic(&d.rounds));
}

#[test]
fn drop_outs_and_stragglers_miss_rounds_on_the_virtual_clock() {
    let fed = federation(Partition::Dirichlet { alpha: 0.5 }, 40);
    let mut c = config(6);
    c.dropout = 0.3;
    c.stragglers = 0.3;
    let r = run(&c, &fed);
    let dropped: usize = r.rounds.iter().map(|m| m.dropped).sum();
    let slow: usize = r.rounds.iter().map(|m| m.stragglers).sum();
    assert!(
        dropped > 0 && slow > 0,
        "dropped {dropped}, stragglers {slow}"
    );
    for m in &r.rounds {
        // A straggler with little data can still make the deadline; a dropped device never does.
        assert!(m.reported <= m.sampled - m.dropped);
        assert_eq!(m.committed, m.reported > 0);
    }
    // Rounds that waited for missing devices ran to the deadline: the virtual clock moved
    // further than in a run where everyone reports.
    let clean = run(&config(6), &fed);
    assert!(r.rounds.last().unwrap().virtual_secs > clean.rounds.last().unwrap().virtual_secs);
}

#[test]
fn results_files_are_written() {
    let fed = federation(
        Partition::Shards {
            shards_per_device: 2,
        },
        20,
    );
    let r = run(&config(3), &fed);
    let dir = tempfile::tempdir().unwrap();
    let files = r.write(dir.path()).unwrap();
    assert_eq!(files.len(), 3);
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("round,version,committed"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["rounds"].as_array().unwrap().len(), 3);
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    assert!(svg.contains("test accuracy"));
}

#[test]
fn bad_configurations_and_missing_files_are_named() {
    let fed = federation(Partition::Iid, 10);
    let mut c = config(1);
    c.sample = Sample::Count(11);
    let err = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(&c, &fed, |_| {}))
        .unwrap_err();
    assert!(err.to_string().contains("cannot sample"), "{err}");
    let err = data::load_idx_dir(std::path::Path::new("/nonexistent/mnist")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/mnist"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(dir.path().join(f), b"\x00\x00\x08\x03truncated").unwrap();
    }
    let err = data::load_idx_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
    let err = data::load_csv(std::path::Path::new("/nonexistent.csv")).unwrap_err();
    assert!(
        err.to_string().contains("cannot read /nonexistent.csv"),
        "{err}"
    );
}

#[test]
fn server_strategies_and_fedprox_run_reproducibly_and_differ_from_fedavg() {
    let fed = federation(Partition::Iid, 30);
    let fedavg = run(&config(4), &fed);
    let with = |name: &str, server_lr: Option<f64>, mu: f32| {
        let mut c = config(4);
        c.strategy = starling_sim::strategy(name, server_lr).unwrap();
        c.plan.mu = mu;
        c
    };
    for c in [
        with("fedadam", None, 0.0),
        with("fedavgm", None, 0.0),
        with("fedavg", None, 0.5),
    ] {
        let a = run(&c, &fed);
        let b = run(&c, &fed);
        let what = format!("{:?}, mu {}", c.strategy, c.plan.mu);
        assert_eq!(a.rounds.len(), 4, "{what}");
        assert!(a.rounds.iter().all(|r| r.committed), "{what}");
        assert_eq!(deterministic(&a.rounds), deterministic(&b.rounds), "{what}");
        assert_ne!(
            deterministic(&a.rounds),
            deterministic(&fedavg.rounds),
            "{what} vs fedavg"
        );
    }
    // The explicit defaults are the default configuration's numbers.
    let same = run(&with("fedavg", Some(1.0), 0.0), &fed);
    assert_eq!(deterministic(&same.rounds), deterministic(&fedavg.rounds));
    // A server learning rate given replaces the strategy's default.
    assert_eq!(
        starling_sim::strategy("fedadam", Some(0.05)).unwrap(),
        starling_core::aggregate::StrategyConfig::FedAdam {
            server_lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            tau: 0.001
        }
    );
    // results.json records the strategy with its parameters, and mu.
    let r = run(&with("fedavgm", Some(0.5), 0.25), &fed);
    let dir = tempfile::tempdir().unwrap();
    r.write(dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["config"]["strategy"],
        serde_json::json!({"name": "fedavgm", "server_lr": 0.5, "momentum": 0.9})
    );
    assert_eq!(json["config"]["plan"]["mu"], serde_json::json!(0.25));
}

#[test]
fn bad_strategies_and_mus_are_clear_errors() {
    let err = starling_sim::strategy("fedsgd", None).unwrap_err();
    assert!(
        err.to_string().contains("unknown strategy `fedsgd`")
            && err.to_string().contains("fedadam"),
        "{err}"
    );
    for lr in [0.0, -1.0, f64::NAN] {
        let err = starling_sim::strategy("fedadam", Some(lr)).unwrap_err();
        assert!(
            err.to_string().contains("server_lr must be positive"),
            "{err}"
        );
    }
    let fed = federation(Partition::Iid, 10);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A configuration built in code is validated too.
    let mut c = config(1);
    c.strategy = starling_core::aggregate::StrategyConfig::FedAvgM {
        server_lr: 1.0,
        momentum: 1.5,
    };
    let err = runtime
        .block_on(starling_sim::run(&c, &fed, |_| {}))
        .unwrap_err();
    assert!(
        err.to_string().contains("momentum must be in [0, 1)"),
        "{err}"
    );
    let mut c = config(1);
    c.plan.mu = -0.5;
    let err = runtime
        .block_on(starling_sim::run(&c, &fed, |_| {}))
        .unwrap_err();
    assert!(err.to_string().contains("mu must be"), "{err}");
}

/// FedProx's partial work: stragglers that would miss the deadline report on time with the
/// share of their data they had time for, counted with its real size; without it they miss
/// the round.
#[test]
fn stragglers_do_partial_work_with_their_real_example_count() {
    let fed = federation(Partition::Iid, 20);
    let mut dropping = config(3);
    dropping.stragglers = 0.9;
    let mut partial = dropping.clone();
    partial.partial_work = true;
    let (d, p) = (run(&dropping, &fed), run(&partial, &fed));
    // The same devices are sampled each round whatever their fates.
    let clean = run(&config(3), &fed);
    for ((a, b), c) in d.rounds.iter().zip(&p.rounds).zip(&clean.rounds) {
        assert_eq!(
            a.stragglers, b.stragglers,
            "the same fates from the same seed"
        );
        assert!(a.stragglers > 0);
        assert_eq!(b.reported, b.sampled, "with partial work everyone reports");
        assert!(
            a.reported < b.reported,
            "without it stragglers miss the round"
        );
        // A straggler 10x slower, against a deadline of 3x an average device's time, trains
        // on about 30% of its data and reports just that many examples.
        assert!(
            a.examples < b.examples && b.examples < c.examples,
            "{} < {} < {}",
            a.examples,
            b.examples,
            c.examples
        );
    }
    assert_eq!(
        deterministic(&run(&partial, &fed).rounds),
        deterministic(&p.rounds),
        "partial work is seeded too"
    );
}
