//! `starling train`: a built-in model trained on a CSV file, no server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use starling_client::data::load_csv;
use starling_core::trainer::train::{train, Plan};
use starling_core::{trainer::builtin, Model};

/// Arguments of `starling train`.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Built-in model: `linear` (the demo's y = W x + b), `logistic` (softmax regression),
    /// `mlp` (the FedAvg paper's 2NN) or `cnn` (the paper's CNN, on square images).
    #[arg(long, default_value = "linear")]
    model: String,
    /// Training data: a CSV file of numbers (a header row is allowed).
    #[arg(long)]
    data: PathBuf,
    /// Target column: a 0-based index or a header name (default: the last column).
    #[arg(long)]
    target_column: Option<String>,
    /// Passes over the data.
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Examples per gradient step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate (default: the model's, 0.01 for `linear`).
    #[arg(long)]
    lr: Option<f32>,
    /// Take batches in file order instead of shuffling.
    #[arg(long)]
    no_shuffle: bool,
    /// Seed of the shuffle.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classes of a classifier (default: largest label + 1).
    #[arg(long)]
    classes: Option<usize>,
    /// Print one JSON object: each parameter (a number, or a flat list) and the final loss.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data = load_csv(
        &args.data,
        &crate::device::target_column(args.target_column.as_deref()),
    )?;
    let outputs = match args.model.as_str() {
        "logistic" | "mlp" | "cnn" => args
            .classes
            .unwrap_or_else(|| data.targets().iter().fold(0.0f32, |m, &t| m.max(t)) as usize + 1),
        _ => 1,
    };
    let Some(spec) = builtin::by_name(&args.model, data.feature_dim(), outputs) else {
        if args.model == "cnn" {
            bail!(
                "the cnn takes square images; {} feature columns are not a square",
                data.feature_dim()
            );
        }
        bail!(
            "unknown model `{}` (built-in models: {})",
            args.model,
            builtin::NAMES.join(", ")
        );
    };
    let model = Model::new(spec.clone())?;
    let mut params = spec.init_params(args.seed);
    let plan = Plan {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args
            .lr
            .unwrap_or(builtin::default_plan(&spec.name).learning_rate),
        shuffle: !args.no_shuffle,
        seed: args.seed,
        // Training on one's own machine is where a whole-data evaluation before and after is
        // wanted (and cheap enough): what the command prints.
        evaluate_after_training: true,
        ..Plan::default()
    };
    let before = model.evaluate(&params, data.features(), data.targets(), data.len());
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps  loss {msg}")
                .expect("static template"),
        )
    };
    let report = train(&model, &mut params, &data, &plan, |p| {
        bar.set_length(p.total_steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!("{:.5}", p.batch_loss));
    })
    .with_context(|| format!("training `{}` on {}", spec.name, args.data.display()))?;
    bar.finish_and_clear();

    if args.json {
        let mut out = Map::new();
        for (name, t) in params.iter() {
            let v = if t.len() == 1 {
                json!(t.data()[0])
            } else {
                json!(t.data())
            };
            out.insert(name.to_string(), v);
        }
        out.insert("loss".into(), json!(report.after.loss));
        if let Some(a) = report.after.accuracy {
            out.insert("accuracy".into(), json!(a));
        }
        println!("{}", Value::Object(out));
    } else {
        println!(
            "trained `{}` on {} examples: {} epochs, batch {}, lr {}, {} steps",
            spec.name,
            report.examples,
            plan.epochs,
            plan.batch_size,
            plan.learning_rate,
            report.steps
        );
        for (name, t) in params.iter() {
            if t.len() <= 16 {
                println!("  {name} = {:?}", t.data());
            } else {
                println!("  {name}: shape {:?}", t.shape());
            }
        }
        println!("  loss {:.6} -> {:.6}", before.loss, report.after.loss);
        if let (Some(b), Some(a)) = (before.accuracy, report.after.accuracy) {
            println!("  accuracy {:.4} -> {:.4}", b, a);
        }
    }
    Ok(ExitCode::SUCCESS)
}
