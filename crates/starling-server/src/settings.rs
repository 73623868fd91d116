//! Typed settings: defaults, then a TOML file, then environment variables, then validation.
//! Every key is documented once, in `starling.example.toml` at the repository root.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use starling_core::builtin;
use starling_core::spec::ModelSpec;
use starling_core::train::Plan;

/// Errors in loading settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read settings file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("invalid settings file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// An environment variable has an unusable value.
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why.
        message: String,
    },
    /// The settings are inconsistent.
    #[error("invalid settings: {0}")]
    Invalid(String),
}

/// All settings of a server.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HTTP server and storage.
    pub server: ServerSettings,
    /// The tasks hosted; when empty, one `linear` task with the demo's model.
    pub tasks: Vec<TaskSettings>,
}

/// The HTTP server and storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to bind.
    pub host: String,
    /// Port to bind (`PORT` overrides, as cloud platforms set it; 0 picks a free port).
    pub port: u16,
    /// Directory for the database and other state.
    pub data_dir: PathBuf,
    /// SQLite file; default `<data_dir>/starling.db`.
    pub database: Option<PathBuf>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Seconds to let in-flight requests finish on shutdown.
    pub shutdown_timeout_secs: f64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            data_dir: PathBuf::from("starling-data"),
            database: None,
            max_body_bytes: 64 * 1024 * 1024,
            shutdown_timeout_secs: 10.0,
        }
    }
}

impl ServerSettings {
    /// The SQLite file in use.
    pub fn database_path(&self) -> PathBuf {
        self.database
            .clone()
            .unwrap_or_else(|| self.data_dir.join("starling.db"))
    }
}

/// One federated training task.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSettings {
    /// The task's name, used in URLs.
    pub name: String,
    /// A built-in model (`linear`, `logistic`, `mlp`, `cnn`) — or set `spec_file`.
    pub model: String,
    /// A JSON model spec file, instead of a built-in model.
    pub spec_file: Option<PathBuf>,
    /// Input features of a built-in model.
    pub inputs: usize,
    /// Outputs (classes for `logistic`) of a built-in model.
    pub outputs: usize,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// The plan devices follow: keys given here override the model's default plan
    /// ([`builtin::default_plan`]); keys left out keep it.
    pub plan: Option<toml::Table>,
    /// The round policy.
    pub rounds: RoundPolicy,
    /// Refuse updates whose L2 norm exceeds this.
    pub max_update_norm: Option<f64>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            name: "linear".into(),
            model: "linear".into(),
            spec_file: None,
            inputs: 1,
            outputs: 1,
            init_seed: 0,
            plan: None,
            rounds: RoundPolicy::default(),
            max_update_norm: None,
        }
    }
}

/// A whole plan as `[tasks.plan]` overrides, for settings built in code.
pub fn plan_table(plan: &Plan) -> toml::Table {
    toml::Table::try_from(plan).expect("a plan is a flat table of numbers and booleans")
}

/// When a round commits, is abandoned, and how devices are paced.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoundPolicy {
    /// Updates that commit a round at once.
    pub goal: u32,
    /// Updates needed to commit at the deadline; below it the round is abandoned.
    pub min: u32,
    /// Seconds from a round's start to its deadline.
    pub deadline_secs: f64,
    /// Assignments handed out per round, as a multiple of `goal` (covers devices that drop).
    pub overcommit: f64,
    /// Base "come back after" time for devices beyond the round's goal, in seconds; each
    /// answer adds up to 50% random jitter so they do not return together.
    pub retry_secs: f64,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        Self {
            goal: 10,
            min: 5,
            deadline_secs: 60.0,
            overcommit: 1.3,
            retry_secs: 5.0,
        }
    }
}

/// A task's settings resolved into a model spec and plan.
#[derive(Debug, Clone)]
pub struct TaskDefinition {
    /// The task's name.
    pub name: String,
    /// The model.
    pub spec: ModelSpec,
    /// The plan.
    pub plan: Plan,
    /// The round policy.
    pub rounds: RoundPolicy,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// L2 bound on updates.
    pub max_update_norm: Option<f64>,
}

impl TaskSettings {
    /// Resolves the model and plan, reading `spec_file` if set.
    pub fn resolve(&self) -> Result<TaskDefinition, SettingsError> {
        let invalid = |m: String| SettingsError::Invalid(format!("task `{}`: {m}", self.name));
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "a task name uses only letters, digits, `-` and `_`".into(),
            ));
        }
        let spec = match &self.spec_file {
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
                    path: path.clone(),
                    source,
                })?;
                ModelSpec::from_json(&json).map_err(|e| invalid(e.to_string()))?
            }
            None => builtin::by_name(&self.model, self.inputs, self.outputs).ok_or_else(|| {
                if builtin::NAMES.contains(&self.model.as_str()) {
                    invalid(format!(
                        "the built-in model `{}` cannot take {} inputs (the cnn needs square \
                         images, e.g. 784 for 28x28)",
                        self.model, self.inputs
                    ))
                } else {
                    invalid(format!(
                        "unknown model `{}` (built-in models: {})",
                        self.model,
                        builtin::NAMES.join(", ")
                    ))
                }
            })?,
        };
        spec.validate().map_err(|e| invalid(e.to_string()))?;
        let mut plan = builtin::default_plan(&spec.name);
        if let Some(overrides) = &self.plan {
            let mut merged =
                toml::Table::try_from(&plan).map_err(|e| invalid(format!("plan: {e}")))?;
            merged.extend(overrides.clone());
            plan = merged
                .try_into()
                .map_err(|e: toml::de::Error| invalid(format!("plan: {}", e.message())))?;
        }
        plan.validate().map_err(|e| invalid(e.to_string()))?;
        let r = &self.rounds;
        if r.goal == 0 || r.min == 0 || r.min > r.goal {
            return Err(invalid(format!(
                "rounds need 1 <= min <= goal (min {}, goal {})",
                r.min, r.goal
            )));
        }
        if !(r.deadline_secs.is_finite() && r.deadline_secs > 0.0) {
            return Err(invalid("rounds.deadline_secs must be positive".into()));
        }
        if !(r.overcommit.is_finite() && r.overcommit >= 1.0) {
            return Err(invalid("rounds.overcommit must be at least 1".into()));
        }
        if !(r.retry_secs.is_finite() && r.retry_secs > 0.0) {
            return Err(invalid("rounds.retry_secs must be positive".into()));
        }
        if let Some(n) = self.max_update_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(invalid("max_update_norm must be positive".into()));
            }
        }
        Ok(TaskDefinition {
            name: self.name.clone(),
            spec,
            plan,
            rounds: r.clone(),
            init_seed: self.init_seed,
            max_update_norm: self.max_update_norm,
        })
    }
}

fn env_var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_env<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, SettingsError>
where
    T::Err: std::fmt::Display,
{
    env_var(name)
        .map(|v| {
            v.parse().map_err(|e: T::Err| SettingsError::Env {
                name,
                value: v.clone(),
                message: e.to_string(),
            })
        })
        .transpose()
}

impl Settings {
    /// Loads settings: defaults, then `file` if given, then environment variables
    /// (`STARLING_HOST`, `STARLING_PORT`, `PORT`, `STARLING_DATA_DIR`, `STARLING_DATABASE`,
    /// `STARLING_MAX_BODY_BYTES`).
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut s = match file {
            Some(path) => Self::from_toml_file(path)?,
            None => Self::default(),
        };
        s.apply_env()?;
        Ok(s)
    }

    /// Parses a TOML file. A relative `spec_file` is taken relative to the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Self, SettingsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut settings: Settings = toml::from_str(&text).map_err(|e| SettingsError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        for task in &mut settings.tasks {
            if let Some(spec) = task.spec_file.as_mut().filter(|p| p.is_relative()) {
                *spec = dir.join(&*spec);
            }
        }
        Ok(settings)
    }

    /// Applies environment overrides. `STARLING_PORT` wins over `PORT`.
    pub fn apply_env(&mut self) -> Result<(), SettingsError> {
        if let Some(h) = env_var("STARLING_HOST") {
            self.server.host = h;
        }
        if let Some(p) = parse_env("PORT")? {
            self.server.port = p;
            // A platform that sets PORT routes outside traffic to it: listen on every interface.
            if env_var("STARLING_HOST").is_none() {
                self.server.host = "0.0.0.0".into();
            }
        }
        if let Some(p) = parse_env("STARLING_PORT")? {
            self.server.port = p;
        }
        if let Some(d) = env_var("STARLING_DATA_DIR") {
            self.server.data_dir = d.into();
        }
        if let Some(d) = env_var("STARLING_DATABASE") {
            self.server.database = Some(d.into());
        }
        if let Some(m) = parse_env("STARLING_MAX_BODY_BYTES")? {
            self.server.max_body_bytes = m;
        }
        Ok(())
    }

    /// The tasks resolved and checked (the default `linear` task when none is configured).
    pub fn task_definitions(&self) -> Result<Vec<TaskDefinition>, SettingsError> {
        let tasks = if self.tasks.is_empty() {
            vec![TaskSettings::default()]
        } else {
            self.tasks.clone()
        };
        let defs = tasks
            .iter()
            .map(TaskSettings::resolve)
            .collect::<Result<Vec<_>, _>>()?;
        for (i, d) in defs.iter().enumerate() {
            if defs[..i].iter().any(|o| o.name == d.name) {
                return Err(SettingsError::Invalid(format!(
                    "task `{}` is defined twice",
                    d.name
                )));
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err(SettingsError::Invalid(
                "server.max_body_bytes must be at least 1024".into(),
            ));
        }
        Ok(defs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_file_with_a_task_parses_and_resolves() {
        let s: Settings = toml::from_str(
            r#"
            [server]
            port = 9000
            [[tasks]]
            name = "digits"
            model = "logistic"
            inputs = 64
            outputs = 10
            [tasks.plan]
            epochs = 2
            batch_size = 10
            learning_rate = 0.1
            [tasks.rounds]
            goal = 20
            min = 10
            "#,
        )
        .unwrap();
        assert_eq!(s.server.port, 9000);
        let d = &s.task_definitions().unwrap()[0];
        assert_eq!(d.spec.outputs(), 10);
        assert_eq!(d.plan.epochs, 2);
        assert_eq!(d.rounds.goal, 20);
    }

    /// Keys missing from `[tasks.plan]` keep the model's own defaults, not the generic ones.
    #[test]
    fn a_partial_plan_keeps_the_models_defaults() {
        let s: Settings = toml::from_str(
            "[[tasks]]\nname = 'digits'\nmodel = 'logistic'\ninputs = 64\noutputs = 10\n\
             [tasks.plan]\nepochs = 3\n",
        )
        .unwrap();
        let d = &s.task_definitions().unwrap()[0];
        assert_eq!(d.plan.epochs, 3);
        assert_eq!(
            d.plan.learning_rate,
            builtin::default_plan("logistic").learning_rate
        );
        let bad: Settings =
            toml::from_str("[[tasks]]\nname = 'x'\n[tasks.plan]\nepoch = 3\n").unwrap();
        let err = bad.task_definitions().unwrap_err().to_string();
        assert!(err.contains("epoch"), "{err}");
    }

    #[test]
    fn a_relative_spec_file_is_found_beside_the_settings_file() {
        let dir = tempfile::tempdir().unwrap();
        let spec = builtin::logistic(4, 3);
        std::fs::write(dir.path().join("model.json"), spec.to_json()).unwrap();
        let cfg = dir.path().join("starling.toml");
        std::fs::write(
            &cfg,
            "[[tasks]]\nname = 'custom'\nspec_file = 'model.json'\n",
        )
        .unwrap();
        let s = Settings::from_toml_file(&cfg).unwrap();
        assert_eq!(s.task_definitions().unwrap()[0].spec, spec);
    }

    #[test]
    fn inconsistent_settings_are_named() {
        let bad: Result<Settings, _> = toml::from_str("[server]\nprot = 1\n");
        assert!(bad.unwrap_err().to_string().contains("prot"));
        let s: Settings =
            toml::from_str("[[tasks]]\nname='x'\n[tasks.rounds]\ngoal=2\nmin=3\n").unwrap();
        assert!(s
            .task_definitions()
            .unwrap_err()
            .to_string()
            .contains("min <= goal"));
        let s: Settings = toml::from_str("[[tasks]]\nname='x'\nmodel='cnn9'\n").unwrap();
        assert!(s
            .task_definitions()
            .unwrap_err()
            .to_string()
            .contains("unknown model `cnn9`"));
    }
}
