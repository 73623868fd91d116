//! `starling.example.toml` at the repository root parses with the real settings type, resolves
//! into tasks, and documents the defaults it claims to.

use std::path::PathBuf;

use starling_server::settings::{Admission, RoundPolicy, TaskSettings};
use starling_server::Settings;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../starling.example.toml")
}

#[test]
fn example_config_parses_and_resolves() {
    let s = Settings::from_toml_file(&example_path()).unwrap();
    assert_eq!(s.server.host, "127.0.0.1");
    assert_eq!(s.server.port, 8080);
    assert_eq!(s.server.max_body_bytes, 64 * 1024);
    assert_eq!(s.tasks.len(), 1);

    let defs = s.task_definitions().unwrap();
    assert_eq!(defs.len(), 1);
    let d = &defs[0];
    assert_eq!(d.name, "linear");
    assert_eq!(d.spec, starling_core::trainer::builtin::linear(1, 1));
    assert_eq!(d.plan.learning_rate, 0.01);
    assert_eq!((d.rounds.goal, d.rounds.min), (12, 10));
    assert_eq!(d.min_cohort, 10);
    assert_eq!(d.max_update_norm, 1000.0);
}

/// The file says it configures exactly what `starling serve` does without a file; a changed
/// default must be changed in the file too.
#[test]
fn example_config_documents_the_defaults() {
    let s = Settings::from_toml_file(&example_path()).unwrap();
    let defaults = Settings::default();
    assert_eq!(s.server, defaults.server);
    // Every task key but the plan, which the file spells out and the default leaves to the
    // model (compared resolved below).
    let mut task = s.tasks[0].clone();
    task.plan = None;
    // A file must state the admission that a task built in code leaves to its default.
    assert_eq!(task.admission, Some(Admission::Open));
    task.admission = None;
    assert_eq!(task, TaskSettings::default());
    assert_eq!(s.tasks[0].rounds, RoundPolicy::default());

    let from_file = &s.task_definitions().unwrap()[0];
    let without_file = &defaults.task_definitions().unwrap()[0];
    assert_eq!(from_file.name, without_file.name);
    assert_eq!(from_file.spec, without_file.spec);
    assert_eq!(from_file.plan, without_file.plan);
    assert_eq!(from_file.rounds, without_file.rounds);
    assert_eq!(from_file.init_seed, without_file.init_seed);
}

/// The keys shown commented out (they have no default) are real keys too: uncommenting them
/// still parses.
#[test]
fn commented_out_keys_are_valid_keys() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_key_value(rest) => format!("{rest}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let s: Settings = toml::from_str(&uncommented).unwrap();
    assert!(s.server.database.is_some());
    assert!(s.server.tensorboard_dir.is_some());
    assert!(s.tasks[0].spec_file.is_some());
}

/// `key = value` with a bare lowercase key, as opposed to a prose comment.
fn is_key_value(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty() && key.chars().all(|c| c == '_' || c.is_ascii_lowercase())
    })
}

/// The `[tasks.buffered]` table the file shows in a comment is a real one, with the defaults.
#[test]
fn the_documented_buffered_table_parses_to_the_defaults() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let table: String = text
        .lines()
        .skip_while(|l| *l != "#   [tasks.buffered]")
        .skip(1)
        .map_while(|l| l.strip_prefix("#   "))
        .map(|l| format!("{}\n", l.split('#').next().unwrap()))
        .collect();
    assert!(table.contains("buffer = 10"), "{table}");
    let parsed: starling_server::settings::BufferedPolicy = toml::from_str(&table).unwrap();
    assert_eq!(parsed, Default::default());
}

/// The `[tasks.secure_aggregation]` table the file shows in a comment is a real one, with the
/// defaults, and a task with it resolves.
#[test]
fn the_documented_secure_aggregation_table_parses_to_the_defaults() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let table: String = text
        .lines()
        .skip_while(|l| *l != "#   [tasks.secure_aggregation]")
        .skip(1)
        .map_while(|l| l.strip_prefix("#   "))
        .map(|l| format!("{}\n", l.split('#').next().unwrap()))
        .collect();
    assert!(table.contains("input_bits = 16"), "{table}");
    let parsed: starling_server::settings::SecureAggregationPolicy =
        toml::from_str(&table).unwrap();
    assert_eq!(parsed, Default::default());
    let task = TaskSettings {
        secure_aggregation: Some(parsed),
        ..TaskSettings::default()
    };
    assert!(task.resolve().unwrap().secure_aggregation.is_some());
}
