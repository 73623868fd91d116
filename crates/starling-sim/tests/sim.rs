//! The simulator on small synthetic data: reproducibility, learning, drop-outs and
//! stragglers on the virtual clock, server strategies and FedProx, training-time
//! distributions, buffered asynchronous mode (FedBuff), results files, and loader and
//! configuration errors.

use rand::{Rng, SeedableRng};
use starling_core::{trainer::builtin, Dataset, Plan};
use starling_sim::data::{self, Partition};
use starling_sim::{Buffered, Federation, Latency, RoundMetrics, Sample, SimConfig};

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
        a.final_loss.unwrap() < a.rounds[0].test_loss.unwrap(),
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

#[test]
fn latency_specs_parse_and_bad_ones_are_named() {
    let ok = [
        ("constant:2.5", Latency::Constant { secs: 2.5 }),
        ("uniform:0:4", Latency::Uniform { lo: 0.0, hi: 4.0 }),
        ("exponential:1.5", Latency::Exponential { mean: 1.5 }),
        (
            "lognormal:1.5",
            Latency::LogNormal {
                sigma: 1.5,
                median: 1.0,
            },
        ),
        (
            "LogNormal:0.5:3",
            Latency::LogNormal {
                sigma: 0.5,
                median: 3.0,
            },
        ),
    ];
    for (spec, want) in ok {
        let got: Latency = spec.parse().unwrap();
        assert_eq!(got, want, "{spec}");
        // The spec it prints (and results.json records) parses back to it.
        assert_eq!(got.to_string().parse::<Latency>().unwrap(), got, "{spec}");
        assert_eq!(
            serde_json::to_value(got).unwrap(),
            serde_json::json!(got.to_string())
        );
    }
    for (spec, says) in [
        ("normal:1", "unknown distribution `normal`"),
        ("", "unknown distribution"),
        ("lognormal", "takes one or two numbers"),
        ("lognormal:1:2:3", "takes one or two numbers"),
        ("lognormal:wide", "`wide` is not a number"),
        ("lognormal:-1", "SIGMA must be"),
        ("lognormal:1:0", "MEDIAN must be a positive number"),
        ("uniform:3", "takes two numbers"),
        ("uniform:3:1", "0 <= LO < HI"),
        ("uniform:-1:1", "0 <= LO < HI"),
        ("constant:0", "SECS must be a positive number"),
        ("constant:nan", "SECS must be a positive number"),
        ("exponential:inf", "MEAN must be a positive number"),
    ] {
        let err = spec.parse::<Latency>().unwrap_err().to_string();
        assert!(
            err.contains(&format!("invalid latency `{spec}`"))
                && err.contains(says)
                && err.contains("lognormal:SIGMA:MEDIAN"),
            "{spec}: {err}"
        );
    }
}

#[test]
fn with_a_latency_a_synchronous_round_lasts_as_long_as_its_slowest_device() {
    let fed = federation(Partition::Iid, 30);
    let mut c = config(4);
    c.latency = Some("constant:2".parse().unwrap());
    let r = run(&c, &fed);
    for (i, m) in r.rounds.iter().enumerate() {
        assert_eq!(m.reported, m.sampled);
        assert!(
            (m.virtual_secs - 2.0 * (i + 1) as f64).abs() < 1e-9,
            "{m:?}"
        );
    }
    // A heavy tail: rounds last as long as their slowest draw, seeded.
    c.latency = Some("lognormal:1.5".parse().unwrap());
    let a = run(&c, &fed);
    assert_eq!(
        deterministic(&a.rounds),
        deterministic(&run(&c, &fed).rounds)
    );
    assert!(a.rounds.iter().all(|m| m.reported == m.sampled));
    let lengths: Vec<f64> = a
        .rounds
        .iter()
        .scan(0.0, |t, m| {
            let d = m.virtual_secs - *t;
            *t = m.virtual_secs;
            Some(d)
        })
        .collect();
    assert!(
        lengths.iter().any(|&d| (d - lengths[0]).abs() > 1e-6),
        "{lengths:?}"
    );
    // The training itself does not depend on the latency: the same updates, the same model.
    let plain = run(&config(4), &fed);
    assert_eq!(
        a.rounds.iter().map(|m| m.test_accuracy).collect::<Vec<_>>(),
        plain
            .rounds
            .iter()
            .map(|m| m.test_accuracy)
            .collect::<Vec<_>>()
    );
    // A deadline that the tail misses: some devices do not report, and such rounds last
    // exactly the deadline.
    c.deadline_secs = Some(1.0);
    let d = run(&c, &fed);
    assert!(d.rounds.iter().any(|m| m.reported < m.sampled));
    let mut before = 0.0;
    for m in &d.rounds {
        let length = m.virtual_secs - before;
        before = m.virtual_secs;
        assert!(length <= 1.0 + 1e-9, "{m:?}");
        if m.reported < m.sampled {
            assert!((length - 1.0).abs() < 1e-9, "{m:?}");
        }
    }
    // The time to the target is the virtual time of the first round that reaches it.
    let target = a.rounds[2].test_accuracy.unwrap();
    let first = a
        .rounds
        .iter()
        .find(|m| m.test_accuracy.unwrap() >= target)
        .unwrap();
    assert_eq!(a.virtual_secs_to_accuracy(target), Some(first.virtual_secs));
    assert_eq!(a.rounds_to_accuracy(target), Some(first.round));
    assert_eq!(a.virtual_secs_to_accuracy(1.5), None);
}

fn buffered(k: u32, c: u32, steps: u32) -> SimConfig {
    let mut cfg = config(steps);
    cfg.buffered = Some(Buffered::new(k, c));
    cfg.latency = Some("exponential:1".parse().unwrap());
    cfg
}

#[test]
fn buffered_mode_steps_every_k_updates_with_c_devices_training_reproducibly() {
    let fed = federation(Partition::Iid, 50);
    let c = buffered(5, 20, 12);
    let a = run(&c, &fed);
    assert_eq!(a.rounds.len(), 12);
    let folded: usize = a.rounds.iter().map(|m| m.reported).sum();
    assert_eq!(folded, 5 * 12);
    for (i, m) in a.rounds.iter().enumerate() {
        // One version per K folded updates, each step recorded as a round.
        assert_eq!(m.reported, 5, "{m:?}");
        assert!(m.committed, "{m:?}");
        assert_eq!(m.version, i as u64 + 1, "{m:?}");
        assert_eq!(m.round, i as u64 + 1, "{m:?}");
        // C devices train at all times: never more, and the loop keeps every place taken.
        assert_eq!(m.max_in_flight, 20, "{m:?}");
        assert_eq!(m.examples, a.rounds[i].examples);
        assert!(m.test_accuracy.is_some() && m.mean_staleness.is_some());
        assert_eq!(m.refused_stale, 0);
    }
    assert_eq!(
        a.rounds.last().unwrap().version as usize,
        folded / 5,
        "versions == uploads / K"
    );
    // The first step is built on version 0 only; later ones fold stale updates too.
    assert_eq!(a.rounds[0].mean_staleness, Some(0.0));
    assert!(a.rounds.iter().any(|m| m.mean_staleness.unwrap() > 0.0));
    // Steps happen in virtual time order; a replacement checks in for every update.
    assert!(a
        .rounds
        .windows(2)
        .all(|w| w[0].virtual_secs <= w[1].virtual_secs));
    let checked_in: usize = a.rounds.iter().map(|m| m.sampled).sum();
    assert_eq!(
        checked_in,
        20 + folded - 1,
        "C at first, then one per update"
    );
    let first = a.rounds[0].test_accuracy.unwrap();
    let last = a.final_accuracy.unwrap();
    assert!(last > 0.8 && last >= first, "accuracy {first} -> {last}");
    // The same seed gives the same numbers; another seed others.
    assert_eq!(
        deterministic(&a.rounds),
        deterministic(&run(&c, &fed).rounds)
    );
    let mut other = c.clone();
    other.seed = 43;
    assert_ne!(
        deterministic(&a.rounds),
        deterministic(&run(&other, &fed).rounds)
    );
    // results.json says which mode ran.
    let dir = tempfile::tempdir().unwrap();
    a.write(dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(json["config"]["buffered"]["buffer"], serde_json::json!(5));
    assert_eq!(
        json["config"]["latency"],
        serde_json::json!("exponential:1")
    );
}

#[test]
fn buffered_drop_outs_free_their_place_when_the_assignment_lapses() {
    let fed = federation(Partition::Iid, 40);
    let mut c = buffered(4, 10, 10);
    c.dropout = 0.3;
    c.stragglers = 0.3;
    // Stragglers take 10x an exponential(1) draw: many outlast a 5-second assignment.
    c.deadline_secs = Some(5.0);
    let a = run(&c, &fed);
    assert_eq!(a.rounds.len(), 10);
    let dropped: usize = a.rounds.iter().map(|m| m.dropped).sum();
    let slow: usize = a.rounds.iter().map(|m| m.stragglers).sum();
    assert!(
        dropped > 0 && slow > 0,
        "dropped {dropped}, stragglers {slow}"
    );
    for m in &a.rounds {
        assert_eq!(m.reported, 4);
        assert!(m.max_in_flight <= 10, "{m:?}");
    }
    assert_eq!(
        deterministic(&a.rounds),
        deterministic(&run(&c, &fed).rounds)
    );
    // Places held by devices that never report slow the steps down in virtual time.
    let mut clean = buffered(4, 10, 10);
    clean.deadline_secs = Some(5.0);
    let clean = run(&clean, &fed);
    assert!(a.rounds.last().unwrap().virtual_secs > clean.rounds.last().unwrap().virtual_secs);
}

#[test]
fn a_heavy_tail_and_a_small_max_staleness_refuse_too_stale_updates() {
    let fed = federation(Partition::Iid, 60);
    let mut c = buffered(2, 20, 15);
    c.latency = Some("lognormal:2".parse().unwrap());
    c.deadline_secs = Some(1e6);
    let mut strict = c.clone();
    if let Some(b) = &mut strict.buffered {
        b.max_staleness = 1;
    }
    let s = run(&strict, &fed);
    let refused: usize = s.rounds.iter().map(|m| m.refused_stale).sum();
    assert!(refused > 0, "no update was too stale");
    assert!(s
        .rounds
        .iter()
        .all(|m| m.reported == 2 && m.mean_staleness.unwrap() <= 1.0));
    assert_eq!(
        deterministic(&s.rounds),
        deterministic(&run(&strict, &fed).rounds)
    );
    // With the default bound (50) the same run refuses nothing and folds staler updates.
    let lax = run(&c, &fed);
    assert_eq!(lax.rounds.iter().map(|m| m.refused_stale).sum::<usize>(), 0);
    assert!(lax.rounds.iter().any(|m| m.mean_staleness.unwrap() > 1.0));
}

#[test]
fn evaluation_every_n_rounds_and_after_the_last() {
    let fed = federation(Partition::Iid, 30);
    for mut c in [config(7), buffered(3, 10, 7)] {
        c.eval_every = 3;
        let r = run(&c, &fed);
        let evaluated: Vec<u64> = r
            .rounds
            .iter()
            .filter(|m| m.test_loss.is_some())
            .map(|m| m.round)
            .collect();
        assert_eq!(evaluated, [3, 6, 7]);
        assert!(r
            .rounds
            .iter()
            .all(|m| m.test_loss.is_some() == m.test_accuracy.is_some()));
        assert_eq!(r.final_loss, r.rounds[6].test_loss);
        let dir = tempfile::tempdir().unwrap();
        r.write(dir.path()).unwrap();
    }
}

#[test]
fn bad_buffered_configurations_are_clear_errors() {
    let fed = federation(Partition::Iid, 10);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let err_of = |c: &SimConfig| {
        runtime
            .block_on(starling_sim::run(c, &fed, |_| {}))
            .unwrap_err()
            .to_string()
    };
    let err = err_of(&buffered(2, 11, 1));
    assert!(
        err.contains("a concurrency of 11 needs at least as many devices"),
        "{err}"
    );
    let mut c = buffered(2, 5, 1);
    c.partial_work = true;
    assert!(err_of(&c).contains("synchronous rounds only"));
    let mut c = buffered(0, 5, 1);
    assert!(err_of(&c).contains("at least 1"));
    c = buffered(2, 5, 1);
    c.eval_every = 0;
    assert!(err_of(&c).contains("eval_every"));
    c = buffered(2, 5, 1);
    for bad in [-1.0, 0.0, f64::INFINITY, 1e20] {
        c.deadline_secs = Some(bad);
        assert!(err_of(&c).contains("deadline_secs must be"), "{bad}");
    }
    c = buffered(2, 5, 1);
    c.latency = Some(Latency::Exponential { mean: 0.0 });
    assert!(err_of(&c).contains("MEAN must be"));
    // Every device drops out: no update ever arrives, and the loop says so instead of
    // running forever.
    c = buffered(2, 5, 1);
    c.dropout = 1.0;
    assert!(err_of(&c).contains("no update arrived"), "{}", err_of(&c));
}

/// DP-FedAvg in the simulator: each round's ε is the accountant's for that many rounds at
/// q = devices per round / devices, the run stops (and says why) before a round would pass
/// the budget, and the seeded noise keeps the run a function of its seed.
#[test]
fn differential_privacy_spends_the_budget_round_by_round_and_stops_reproducibly() {
    let fed = federation(Partition::Iid, 50);
    let (q, z, delta) = (10.0 / 50.0, 1.2, 1e-4);
    let eps = |k: u64| starling_core::privacy::epsilon(q, z, k, delta).unwrap();
    let mut c = config(20);
    c.privacy = Some(starling_sim::SimPrivacy {
        clip: 1.0,
        noise_multiplier: z,
        epsilon: (eps(4) + eps(5)) / 2.0,
        delta,
        target_quantile: None,
    });
    let a = run(&c, &fed);
    assert_eq!(a.rounds.len(), 4, "the budget affords four rounds");
    for (k, r) in a.rounds.iter().enumerate() {
        assert_eq!(r.epsilon, Some(eps(k as u64 + 1)), "round {}", k + 1);
        assert!(r.committed);
        assert_eq!(r.train_loss, None, "no un-noised device statistics");
    }
    let reason = a.stopped.as_deref().expect("stopped by the budget");
    assert!(reason.contains("privacy budget is spent"), "{reason}");
    let b = run(&c, &fed);
    assert_eq!(deterministic(&a.rounds), deterministic(&b.rounds));
    // Another seed draws other noise.
    let mut other = c.clone();
    other.seed = 43;
    let o = run(&other, &fed);
    assert_ne!(o.rounds[0].test_loss, a.rounds[0].test_loss);
    // Adaptive clipping spends the same budget (its count noise comes out of the updates'),
    // with a moving bound that changes the model.
    // (Ten devices a round give a count noise of 10 / 20 = 0.5, which needs z < 1.)
    let mut fixed = c.clone();
    fixed.privacy.as_mut().unwrap().noise_multiplier = 0.9;
    fixed.privacy.as_mut().unwrap().epsilon = 1e3;
    fixed.rounds = 3;
    let mut adaptive = fixed.clone();
    adaptive.privacy.as_mut().unwrap().target_quantile = Some(0.5);
    let (f, ad) = (run(&fixed, &fed), run(&adaptive, &fed));
    assert_eq!(ad.rounds.len(), 3);
    for (k, (x, y)) in ad.rounds.iter().zip(&f.rounds).enumerate() {
        let want = starling_core::privacy::epsilon(q, 0.9, k as u64 + 1, delta).unwrap();
        assert_eq!((x.epsilon, y.epsilon), (Some(want), Some(want)));
    }
    assert_ne!(ad.rounds[2].test_loss, f.rounds[2].test_loss);
    // With z = 1.2 the default count noise leaves no budget for the updates: refused.
    let mut bad = c.clone();
    bad.privacy.as_mut().unwrap().target_quantile = Some(0.5);
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(&bad, &fed, |_| {}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("count_noise"), "{e}");
    // Buffered mode has no DP accounting.
    let mut bad = c.clone();
    bad.buffered = Some(Buffered::new(10, 10));
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(&bad, &fed, |_| {}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("synchronous rounds"), "{e}");
}

/// `--secagg`: secure rounds through the engine's four steps learn like plain FedAvg (the
/// sum is FedAvg's within the quantisation error), with drop-outs leaving after each step;
/// the same seed gives the same numbers; and combinations the engine cannot run are refused.
#[test]
fn secure_aggregation_rounds_learn_like_plain_fedavg_and_survive_dropouts() {
    let fed = federation(Partition::Iid, 50);
    let mut plain = config(6);
    plain.sample = Sample::Count(10);
    let mut secure = plain.clone();
    secure.secagg = Some(starling_sim::secagg::SimSecAgg::default());
    let p = run(&plain, &fed);
    let s = run(&secure, &fed);
    assert!(s.rounds.iter().all(|r| r.committed));
    for (a, b) in p.rounds.iter().zip(&s.rounds) {
        let (x, y) = (a.test_accuracy.unwrap(), b.test_accuracy.unwrap());
        assert!(
            (x - y).abs() < 0.02,
            "round {}: plain {x}, secure {y}",
            a.round
        );
        assert!((a.test_loss.unwrap() - b.test_loss.unwrap()).abs() < 0.01);
    }
    assert!(s.final_accuracy.unwrap() > 0.8);

    // 30% of devices drop out (a third after each of the first three steps).
    secure.dropout = 0.3;
    let d1 = run(&secure, &fed);
    let d2 = run(&secure, &fed);
    assert_eq!(deterministic(&d1.rounds), deterministic(&d2.rounds));
    assert!(d1.rounds.iter().any(|r| r.reported < r.sampled));
    assert!(d1.rounds.iter().filter(|r| r.committed).count() >= 4);
    assert!(d1.final_accuracy.unwrap() > 0.7);

    // Distributed DP (issue 10 item 5): with --dp-clip the devices add Skellam noise in the
    // ring; the ledger spends ε round by round (the same seed gives the same numbers), no
    // un-noised loss is published, the model still learns, and the budget stops the run.
    let mut private = secure.clone();
    private.dropout = 0.0;
    private.rounds = 20;
    private.privacy = Some(starling_sim::SimPrivacy {
        clip: 1.0,
        noise_multiplier: 1.0,
        epsilon: 4.0,
        delta: 1e-4,
        target_quantile: None,
    });
    let a = run(&private, &fed);
    let b = run(&private, &fed);
    assert_eq!(deterministic(&a.rounds), deterministic(&b.rounds));
    assert!(
        a.rounds.len() >= 2 && a.rounds.len() < 20,
        "{} rounds",
        a.rounds.len()
    );
    let spent: Vec<f64> = a.rounds.iter().map(|r| r.epsilon.unwrap()).collect();
    assert!(spent.windows(2).all(|w| w[1] > w[0]), "{spent:?}");
    assert!(spent.iter().all(|&e| e <= 4.0));
    assert!(a
        .rounds
        .iter()
        .all(|r| r.committed && r.train_loss.is_none()));
    let reason = a.stopped.as_deref().expect("stopped by the budget");
    assert!(reason.contains("privacy budget is spent"), "{reason}");
    assert!(a.final_accuracy.unwrap() > 0.5, "{:?}", a.final_accuracy);
    let mut quantile = private.clone();
    quantile.privacy.as_mut().unwrap().target_quantile = Some(0.5);
    quantile.privacy.as_mut().unwrap().noise_multiplier = 0.5;
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(&quantile, &fed, |_| {}))
        .unwrap_err();
    assert!(e.to_string().contains("adaptive clipping"), "{e}");

    let mut bad = secure.clone();
    bad.buffered = Some(Buffered::new(5, 10));
    let e = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(starling_sim::run(&bad, &fed, |_| {}))
        .unwrap_err();
    assert!(e.to_string().contains("--buffer"), "{e}");
}
