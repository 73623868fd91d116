//! The tasks a server hosts, which the admin API changes at run time: those of the settings
//! file (fixed until a restart) and those created through the admin API, whose settings are
//! stored in SQLite (as the TOML the operator sent) so that a restart serves them again.
//!
//! Changes (create, replace, delete) take one lock, so two operators cannot race; readers
//! (every request) take a cheap read lock to clone a [`TaskHandle`]. A replaced or deleted
//! task's engine is stopped ([`TaskHandle::stop`]) before another starts on its store rows, so
//! no two engines ever write one task.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::engine::{self, Clock, EngineError, TaskHandle};
use crate::metrics::Metrics;
use crate::settings::{Admission, TaskDefinition, TaskSettings};
use crate::store::{Store, StoreError};
use crate::tensorboard::Writers;

/// Why an admin change to the task list was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The settings are not a valid task.
    #[error("{0}")]
    Invalid(String),
    /// The change conflicts with the task list.
    #[error("{0}")]
    Conflict(String),
    /// No such task.
    #[error("no task named `{0}`")]
    Unknown(String),
    /// The engine failed to start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a task's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The settings file: changed there, and by a restart.
    Settings,
    /// The admin API: changed and deleted through it.
    Admin,
}

impl Source {
    /// As served.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Settings => "settings",
            Source::Admin => "admin",
        }
    }
}

/// The hosted tasks.
#[derive(Debug)]
pub struct Tasks {
    list: RwLock<Vec<TaskHandle>>,
    configured: HashSet<String>,
    store: Store,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    changes: tokio::sync::Mutex<()>,
    /// TensorBoard event files of every task's history (`server.tensorboard_dir`).
    writers: std::sync::Mutex<Writers>,
}

/// Parses an admin call's task settings: the keys of one `[[tasks]]` entry of a settings file,
/// as TOML, and, for `model = "external"`, the initial model the call sent (safetensors
/// bytes). Admission must be stated; `spec_file` and `initial_model` (paths on the server)
/// are refused.
pub fn parse_admin_settings(
    text: &str,
    initial_model: Option<&[u8]>,
) -> Result<(TaskSettings, TaskDefinition), RegistryError> {
    let settings: TaskSettings = toml::from_str(text)
        .map_err(|e| RegistryError::Invalid(format!("task settings (TOML): {}", e.message())))?;
    settings
        .require_admission()
        .map_err(RegistryError::Invalid)?;
    if settings.initial_model.is_some() {
        return Err(RegistryError::Invalid(
            "initial_model names a file on the server, which the admin API does not read; \
             send the model with the settings instead (a JSON body {\"settings\": TOML, \
             \"initial_model\": base64 safetensors}, or `starling admin create --initial-model \
             FILE`)"
                .into(),
        ));
    }
    let external = settings.model == starling_core::trainer::spec::EXTERNAL;
    match (external, initial_model.is_some()) {
        (true, false) => {
            return Err(RegistryError::Invalid(
                "model = \"external\" needs its initial model: send a JSON body \
                 {\"settings\": TOML, \"initial_model\": base64 safetensors} (or `starling \
                 admin create --initial-model FILE`)"
                    .into(),
            ))
        }
        (false, true) => {
            return Err(RegistryError::Invalid(format!(
                "an initial model is for model = \"external\"; the built-in model `{}` makes \
                 its own (install another as the next version with PUT \
                 /v1/admin/tasks/{{task}}/model)",
                settings.model
            )))
        }
        _ => {}
    }
    if settings.spec_file.is_some() {
        return Err(RegistryError::Invalid(
            "spec_file names a file on the server, which the admin API does not read; use a \
             built-in model"
                .into(),
        ));
    }
    let def = settings
        .resolve_with(initial_model)
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    Ok((settings, def))
}

fn warn_if_open(def: &TaskDefinition) {
    if def.admission == Admission::Open {
        tracing::warn!(
            task = %def.name,
            "admission is open: anyone who can reach the server checks in, under any number of \
             ids; for demos only (set admission = \"enrolled\" with an enrollment_secret)"
        );
    }
}

impl Tasks {
    /// Starts the engines of the settings file's tasks and of the tasks created through the
    /// admin API (a stored task that no longer starts is logged and left out; one the settings
    /// file now defines too is served as the file says).
    /// With `tensorboard_dir`, every task's round history is written there as TensorBoard
    /// event files, those created or changed later included.
    pub async fn start(
        defs: Vec<TaskDefinition>,
        store: Store,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        tensorboard_dir: Option<&std::path::Path>,
    ) -> Result<Self, EngineError> {
        let configured: HashSet<String> = defs.iter().map(|d| d.name.clone()).collect();
        for d in &defs {
            warn_if_open(d);
        }
        let mut list =
            engine::start_tasks(defs, store.clone(), metrics.clone(), clock.clone()).await?;
        for (name, text, model) in store.admin_tasks().await? {
            if configured.contains(&name) {
                tracing::warn!(
                    task = %name,
                    "the settings file defines this task, so the settings it was given through \
                     the admin API are ignored"
                );
                continue;
            }
            let started = match parse_admin_settings(&text, model.as_deref()) {
                Ok((_, def)) => {
                    warn_if_open(&def);
                    engine::spawn(def, store.clone(), metrics.clone(), clock.clone())
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match started {
                Ok(handle) => list.push(handle),
                Err(e) => tracing::error!(
                    task = %name, error = %e,
                    "a task created through the admin API does not start; it is not served"
                ),
            }
        }
        let writers = Writers::spawn(tensorboard_dir, &list, &store);
        Ok(Self {
            list: RwLock::new(list),
            configured,
            store,
            metrics,
            clock,
            changes: tokio::sync::Mutex::new(()),
            writers: std::sync::Mutex::new(writers),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<TaskHandle>> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<TaskHandle>> {
        self.list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The task named `name`.
    pub fn get(&self, name: &str) -> Option<TaskHandle> {
        self.read().iter().find(|t| t.name() == name).cloned()
    }

    /// Every task, in the order they started.
    pub fn all(&self) -> Vec<TaskHandle> {
        self.read().clone()
    }

    /// How many tasks there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Where a task's settings come from.
    pub fn source(&self, name: &str) -> Source {
        if self.configured.contains(name) {
            Source::Settings
        } else {
            Source::Admin
        }
    }

    /// Creates a task from an admin call's settings (`text`, TOML) and starts it, paused when
    /// `paused` (so that an operator can install a model before devices train).
    /// An external model's task comes with its initial model (`initial_model`, safetensors).
    pub async fn create(
        &self,
        text: &str,
        initial_model: Option<&[u8]>,
        paused: bool,
    ) -> Result<TaskHandle, RegistryError> {
        let (_, def) = parse_admin_settings(text, initial_model)?;
        let _change = self.changes.lock().await;
        if self.get(&def.name).is_some() {
            return Err(RegistryError::Conflict(format!(
                "a task named `{}` exists already; change it with PUT /v1/admin/tasks/{}",
                def.name, def.name
            )));
        }
        let name = def.name.clone();
        self.store
            .put_admin_task(&name, text, initial_model)
            .await?;
        warn_if_open(&def);
        let handle = self.spawn(def).await?;
        // Not yet in the list, so no request reaches it before the pause.
        if paused {
            handle.set_paused(true).await?;
        }
        self.write().push(handle.clone());
        self.follow(&handle);
        tracing::info!(task = %name, "task created through the admin API");
        Ok(handle)
    }

    /// Replaces a task's settings (its plan, round policy, admission...) with an admin call's:
    /// its engine stops (the open round ends unrecorded) and starts again from its latest
    /// version with the new settings. The model must stay the same.
    /// An external model keeps the initial model it was created with.
    pub async fn replace(&self, name: &str, text: &str) -> Result<TaskHandle, RegistryError> {
        let stored = match self.get(name) {
            Some(t) if t.spec().is_external() => self.store.admin_task_model(name).await?,
            _ => None,
        };
        let (_, def) = parse_admin_settings(text, stored.as_deref())?;
        if def.name != name {
            return Err(RegistryError::Invalid(format!(
                "the settings name task `{}`, the URL task `{name}`; a task cannot be renamed",
                def.name
            )));
        }
        let _change = self.changes.lock().await;
        let old = self.changeable(name)?;
        if def.spec != *old.spec() {
            return Err(RegistryError::Invalid(format!(
                "task `{name}`'s model cannot change; create a task with another name"
            )));
        }
        old.stop().await;
        self.store.put_admin_task(name, text, None).await?;
        warn_if_open(&def);
        let handle = match self.spawn(def).await {
            Ok(h) => h,
            Err(e) => {
                // Keep serving something: the task is gone from the list until fixed.
                self.write().retain(|t| t.name() != name);
                return Err(e);
            }
        };
        for t in self.write().iter_mut() {
            if t.name() == name {
                *t = handle.clone();
            }
        }
        self.follow(&handle);
        tracing::info!(task = %name, "task settings replaced through the admin API");
        Ok(handle)
    }

    /// Deletes a task created through the admin API, with everything stored of it.
    pub async fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let _change = self.changes.lock().await;
        let old = self.changeable(name)?;
        self.write().retain(|t| t.name() != name);
        old.stop().await;
        self.store.delete_task(name).await?;
        tracing::warn!(task = %name, "task deleted through the admin API");
        Ok(())
    }

    fn follow(&self, task: &TaskHandle) {
        self.writers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .follow(task);
    }

    /// Writes what is left of every task's TensorBoard history and stops the writers; the
    /// server calls this after its last request and before closing the store.
    pub async fn stop_writers(&self) {
        let writers = std::mem::take(
            &mut *self
                .writers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        writers.stop().await;
    }

    /// The task `name`, if the admin API may change it.
    fn changeable(&self, name: &str) -> Result<TaskHandle, RegistryError> {
        let t = self
            .get(name)
            .ok_or_else(|| RegistryError::Unknown(name.to_string()))?;
        if self.configured.contains(name) {
            return Err(RegistryError::Conflict(format!(
                "task `{name}` is defined in the settings file: change it there and restart"
            )));
        }
        Ok(t)
    }

    /// Starts a task's engine; a replaced task keeps its stored pause.
    async fn spawn(&self, def: TaskDefinition) -> Result<TaskHandle, RegistryError> {
        Ok(engine::spawn(
            def,
            self.store.clone(),
            self.metrics.clone(),
            self.clock.clone(),
        )
        .await?)
    }
}
