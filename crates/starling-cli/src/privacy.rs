//! `starling privacy`: differential-privacy accounting for the Poisson-subsampled Gaussian
//! mechanism, with the core's Rényi-DP accountant (`starling_core::privacy`): the ε that a
//! number of noised, subsampled steps spend (`epsilon`), and the noise multiplier that keeps
//! them within a budget (`plan`).

use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;
use starling_core::privacy::{noise_multiplier_for, RdpAccountant, NOISE_MULTIPLIER_TOLERANCE};

/// `starling privacy` subcommands.
#[derive(clap::Subcommand)]
pub(crate) enum Command {
    /// The ε spent at δ by STEPS steps of the subsampled Gaussian mechanism.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier whose STEPS steps spend at most ε at δ.
    Plan(PlanArgs),
}

/// Arguments of `starling privacy epsilon`.
#[derive(clap::Args)]
pub(crate) struct EpsilonArgs {
    /// Noise multiplier z: the noise's standard deviation over the clipping bound (> 0).
    #[arg(long, allow_negative_numbers = true)]
    noise_multiplier: f64,
    /// Sampling rate q: the probability that a given device takes part in a step, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    sampling_rate: f64,
    /// Steps (rounds) composed; `100000` or `1e5`.
    #[arg(long, value_parser = parse_steps)]
    steps: u64,
    /// δ, in (0, 1).
    #[arg(long, allow_negative_numbers = true)]
    delta: f64,
    /// Print `{"epsilon": ...}` instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// Arguments of `starling privacy plan`.
#[derive(clap::Args)]
pub(crate) struct PlanArgs {
    /// The budget ε (> 0).
    #[arg(long, allow_negative_numbers = true)]
    epsilon: f64,
    /// δ, in (0, 1).
    #[arg(long, allow_negative_numbers = true)]
    delta: f64,
    /// Sampling rate q, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    sampling_rate: f64,
    /// Steps (rounds) to be composed, at least 1; `100000` or `1e5`.
    #[arg(long, value_parser = parse_steps)]
    steps: u64,
    /// Print `{"noise_multiplier": ...}` instead of a sentence.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Epsilon(a) => epsilon(a),
        Command::Plan(a) => plan(a),
    }
}

fn epsilon(a: EpsilonArgs) -> anyhow::Result<ExitCode> {
    let mut accountant = RdpAccountant::new();
    accountant.compose_subsampled_gaussian(a.sampling_rate, a.noise_multiplier, a.steps)?;
    let (eps, order) = accountant.epsilon_and_order(a.delta)?;
    if !eps.is_finite() {
        bail!("epsilon is unbounded: no order gives a finite bound");
    }
    if a.json {
        println!("{}", json!({ "epsilon": eps }));
    } else {
        println!(
            "ε = {} at δ = {:e} (order {order}) for {} {} of q = {}, z = {}",
            significant(eps),
            a.delta,
            a.steps,
            if a.steps == 1 { "step" } else { "steps" },
            a.sampling_rate,
            a.noise_multiplier
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn plan(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let z = noise_multiplier_for(a.epsilon, a.delta, a.sampling_rate, a.steps)?;
    if a.json {
        println!("{}", json!({ "noise_multiplier": z }));
    } else {
        // Rounded up to the search's tolerance, so the printed value keeps the budget too.
        let shown = (z / NOISE_MULTIPLIER_TOLERANCE).ceil() * NOISE_MULTIPLIER_TOLERANCE;
        let mut accountant = RdpAccountant::new();
        accountant.compose_subsampled_gaussian(a.sampling_rate, shown, a.steps)?;
        let (eps, order) = accountant.epsilon_and_order(a.delta)?;
        println!(
            "z = {shown:.6} keeps ε ≤ {} at δ = {:e} for {} {} of q = {} (it spends ε = {} at order {order})",
            a.epsilon,
            a.delta,
            a.steps,
            if a.steps == 1 { "step" } else { "steps" },
            a.sampling_rate,
            significant(eps)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A count of steps: a plain integer, or an integer in scientific notation (`1e5`).
fn parse_steps(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.fract() == 0.0 && x <= 2f64.powi(53) => Ok(x as u64),
        _ => Err(format!("`{s}` is not a whole number of steps")),
    }
}

/// `x` with four significant digits (no exponent).
fn significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    let decimals = (3 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_whole_numbers() {
        assert_eq!(parse_steps("1000"), Ok(1000));
        assert_eq!(parse_steps("1e5"), Ok(100_000));
        assert!(parse_steps("1.5").is_err());
        assert!(parse_steps("-3").is_err());
        assert!(parse_steps("many").is_err());
    }

    #[test]
    fn four_significant_digits() {
        assert_eq!(significant(1.234567), "1.235");
        assert_eq!(significant(0.0067089), "0.006709");
        assert_eq!(significant(220111.78), "220112");
        assert_eq!(significant(0.0), "0");
    }
}
