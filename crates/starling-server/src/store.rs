//! Storage in an embedded SQLite file: tasks, checkpoints (model versions) and round records.
//! Never an individual update (DESIGN.md invariant 1). A commit writes the new checkpoint
//! and its round record in one transaction, with `synchronous = FULL`, before the version is
//! announced (invariant 4).

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use starling_core::wire::params::ParamsError;
use starling_core::wire::protocol::RoundKind;
use starling_core::{ModelSpec, Parameters};

use crate::engine::round::AbandonReason;
use crate::settings::Retention;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored checkpoint does not decode.
    #[error("stored checkpoint of task `{task}` version {version} is corrupt: {source}")]
    Corrupt {
        /// The task.
        task: String,
        /// The version.
        version: i64,
        /// Why.
        source: ParamsError,
    },
    /// A stored strategy state does not fit the task's strategy.
    #[error("stored strategy state of task `{task}` is unusable: {message}")]
    StrategyState {
        /// The task.
        task: String,
        /// Why.
        message: String,
    },
    /// The configured model differs from the stored one.
    #[error(
        "task `{0}` is stored with a different model spec than configured; \
         use another task name or data directory"
    )]
    SpecMismatch(String),
}

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundStatus {
    /// A new version was committed.
    Committed,
    /// The round ended without a new version (see its reason); the model stayed.
    Abandoned,
    /// A federated evaluation round with enough reports: its means are recorded, the model
    /// is unchanged.
    Evaluated,
}

impl RoundStatus {
    /// The status as stored and served.
    pub fn as_str(self) -> &'static str {
        match self {
            RoundStatus::Committed => "committed",
            RoundStatus::Abandoned => "abandoned",
            RoundStatus::Evaluated => "evaluated",
        }
    }
}

/// A finished round, as kept in the history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Training or federated evaluation.
    pub kind: RoundKind,
    /// How it ended.
    pub status: RoundStatus,
    /// Why it ended without a new version (`None` for a commit).
    pub reason: Option<AbandonReason>,
    /// The version devices trained from (or scored).
    pub base_version: u64,
    /// The version committed, if any.
    pub version: Option<u64>,
    /// Updates folded in.
    pub participants: u64,
    /// Examples behind them.
    pub examples: u64,
    /// Example-weighted mean of the devices' local losses (after training; in an evaluation
    /// round, of the round's model on their data).
    pub mean_loss: Option<f64>,
    /// Example-weighted mean of the devices' local accuracies (classifiers), likewise.
    pub mean_accuracy: Option<f64>,
    /// Start, Unix milliseconds.
    pub started_at_ms: i64,
    /// End, Unix milliseconds.
    pub ended_at_ms: i64,
    /// Milliseconds the commit spent merging the partial aggregates and stepping the model
    /// (before the database write).
    pub commit_ms: Option<f64>,
    /// A differentially private round's entry in the privacy ledger (committed rounds of a
    /// task with `[tasks.privacy]`).
    pub privacy: Option<RoundPrivacy>,
}

/// One committed round's entry in a task's privacy ledger.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RoundPrivacy {
    /// The mechanism: `"gaussian"` (DP-FedAvg's Gaussian noise on the clipped sum, added by
    /// the server) or `"skellam"` (distributed DP: Skellam noise added by the devices under
    /// secure aggregation).
    pub mechanism: String,
    /// The clip bound S this round used.
    pub clip: f64,
    /// With adaptive clipping, the bound the next round uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_clip: Option<f64>,
    /// The noise multiplier z (noise standard deviation z · S on the sum; for `"skellam"`, the
    /// noise of the devices in the sum over the sensitivity of one rounded update).
    pub noise_multiplier: f64,
    /// The cohort the round was sized for (the fixed denominator).
    pub cohort: u32,
    /// The sampling rate the accountant used (cohort / population).
    pub sampling_rate: f64,
    /// ε spent by the task up to and including this round, at the budget's δ.
    pub epsilon: f64,
    /// The budget's δ.
    pub delta: f64,
}

/// A committed model version as stored: the parameters and the strategy's server state that
/// produced them, so that a restart resumes the strategy exactly.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    /// Version number (0: the initial parameters).
    pub version: u64,
    /// The parameters.
    pub params: Parameters,
    /// The strategy's saved state (empty for a stateless strategy).
    pub strategy_state: Vec<u8>,
    /// The privacy accountant's state after this version (empty without differential
    /// privacy): the budget spent up to it, which a restart resumes and a rollback keeps.
    pub privacy_state: Vec<u8>,
}

/// A device credential as stored: its SHA-256 digest, never the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// The task it admits to.
    pub task: String,
    /// The device's id (server-chosen).
    pub device: String,
    /// SHA-256 of the credential.
    pub digest: [u8; 32],
    /// The label the device enrolled with.
    pub label: Option<String>,
    /// When it was issued, Unix milliseconds.
    pub enrolled_at_ms: i64,
    /// When an operator revoked it, if they did.
    pub revoked_at_ms: Option<i64>,
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    next_round INTEGER NOT NULL DEFAULT 1,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    task TEXT NOT NULL REFERENCES tasks(name),
    version INTEGER NOT NULL,
    params BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    strategy_state BLOB NOT NULL DEFAULT x'',
    privacy_state BLOB NOT NULL DEFAULT x'',
    PRIMARY KEY (task, version)
);
CREATE TABLE IF NOT EXISTS rounds (
    task TEXT NOT NULL REFERENCES tasks(name),
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    version INTEGER,
    participants INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    mean_loss REAL,
    mean_accuracy REAL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER NOT NULL,
    commit_ms REAL,
    reason TEXT,
    kind TEXT NOT NULL DEFAULT 'training',
    privacy TEXT,
    PRIMARY KEY (task, round)
);
CREATE TABLE IF NOT EXISTS credentials (
    task TEXT NOT NULL,
    device TEXT NOT NULL,
    digest BLOB NOT NULL UNIQUE,
    label TEXT,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (task, device)
);
CREATE TABLE IF NOT EXISTS admin_tasks (
    name TEXT PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
";

/// A task created through the admin API: its name, its settings (TOML) and, for an external
/// model, its initial model (safetensors).
pub type AdminTask = (String, String, Option<Vec<u8>>);

/// Columns added since the first schema: `(table, column, definition)`, added to databases
/// created before them.
const ADDED_COLUMNS: [(&str, &str, &str); 7] = [
    ("checkpoints", "strategy_state", "BLOB NOT NULL DEFAULT x''"),
    ("rounds", "reason", "TEXT"),
    ("rounds", "kind", "TEXT NOT NULL DEFAULT 'training'"),
    ("checkpoints", "privacy_state", "BLOB NOT NULL DEFAULT x''"),
    ("rounds", "privacy", "TEXT"),
    ("tasks", "paused", "INTEGER NOT NULL DEFAULT 0"),
    ("admin_tasks", "initial_model", "BLOB"),
];

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::raw_sql(SCHEMA).execute(pool).await?;
    for (table, column, definition) in ADDED_COLUMNS {
        let has: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?"
        ))
        .bind(column)
        .fetch_one(pool)
        .await?;
        if has == 0 {
            sqlx::raw_sql(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the SQLite file and its schema.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        Ok(Self { pool })
    }

    /// A store in memory only, for simulations: the same schema and code, no file.
    pub async fn open_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection, kept for the store's whole life: each in-memory connection is a
        // database of its own, so the pool must never retire it (sqlx's defaults close a
        // connection after 10 idle minutes or 30 minutes of life, and the next query would
        // find an empty database: a simulation longer than that lost every table).
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await?;
        migrate(&pool).await?;
        Ok(Self { pool })
    }

    /// Registers a task with its initial parameters if it is new, and returns its latest
    /// checkpoint and the number its next round takes.
    pub async fn ensure_task(
        &self,
        name: &str,
        spec: &ModelSpec,
        initial: impl FnOnce() -> Parameters,
    ) -> Result<(StoredVersion, u64), StoreError> {
        let mut tx = self.pool.begin().await?;
        let stored: Option<String> = sqlx::query_scalar("SELECT spec FROM tasks WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        match stored {
            Some(json) => {
                if ModelSpec::from_json(&json).ok().as_ref() != Some(spec) {
                    return Err(StoreError::SpecMismatch(name.into()));
                }
            }
            None => {
                let now = now_ms();
                sqlx::query("INSERT INTO tasks (name, spec, created_at) VALUES (?, ?, ?)")
                    .bind(name)
                    .bind(spec.to_json())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO checkpoints (task, version, params, created_at) VALUES (?, 0, ?, ?)",
                )
                .bind(name)
                .bind(initial().to_safetensors(None))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        let latest = self.latest_checkpoint(name, spec).await?;
        // A round in progress when the process stopped is lost, but its number is not reused:
        // assignments handed out for it must meet "round closed", not another round.
        let next_round: i64 = sqlx::query_scalar(
            "SELECT MAX(t.next_round, COALESCE((SELECT MAX(round) FROM rounds WHERE task = t.name), 0) + 1) \
             FROM tasks t WHERE t.name = ?",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        self.open_round(name, next_round as u64).await?;
        Ok((latest, next_round as u64))
    }

    /// Records that round `round` is open, so that a restarted server never reuses its number.
    pub async fn open_round(&self, task: &str, round: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE tasks SET next_round = ? + 1 WHERE name = ?")
            .bind(round as i64)
            .bind(task)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest committed version of a task.
    pub async fn latest_checkpoint(
        &self,
        task: &str,
        spec: &ModelSpec,
    ) -> Result<StoredVersion, StoreError> {
        let row = sqlx::query(
            "SELECT version, params, strategy_state, privacy_state FROM checkpoints WHERE task = ? \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(task)
        .fetch_one(&self.pool)
        .await?;
        Self::stored_version(task, spec, &row)
    }

    /// A stored version of a task, if it was committed and is still kept.
    pub async fn version(
        &self,
        task: &str,
        spec: &ModelSpec,
        version: u64,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT version, params, strategy_state, privacy_state FROM checkpoints \
             WHERE task = ? AND version = ?",
        )
        .bind(task)
        .bind(version as i64)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Self::stored_version(task, spec, &r))
            .transpose()
    }

    /// The numbers of a task's stored versions, oldest first.
    pub async fn versions(&self, task: &str) -> Result<Vec<u64>, StoreError> {
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM checkpoints WHERE task = ? ORDER BY version")
                .bind(task)
                .fetch_all(&self.pool)
                .await?;
        Ok(versions.into_iter().map(|v| v as u64).collect())
    }

    fn stored_version(
        task: &str,
        spec: &ModelSpec,
        row: &sqlx::sqlite::SqliteRow,
    ) -> Result<StoredVersion, StoreError> {
        let version: i64 = row.get("version");
        let bytes: Vec<u8> = row.get("params");
        let (params, _) = Parameters::from_safetensors_with_layout(&bytes, &spec.layout())
            .map_err(|source| StoreError::Corrupt {
                task: task.into(),
                version,
                source,
            })?;
        Ok(StoredVersion {
            version: version as u64,
            params,
            strategy_state: row.get("strategy_state"),
            privacy_state: row.get("privacy_state"),
        })
    }

    /// Durably records a finished round and, for a committed one, its new version — both in
    /// one transaction, which also drops the versions `retention` no longer keeps.
    pub async fn record_round(
        &self,
        task: &str,
        record: &RoundRecord,
        version: Option<&StoredVersion>,
        retention: &Retention,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(c) = version {
            sqlx::query(
                "INSERT INTO checkpoints (task, version, params, created_at, strategy_state, \
                 privacy_state) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(task)
            .bind(c.version as i64)
            .bind(c.params.to_safetensors(None))
            .bind(record.ended_at_ms)
            .bind(&c.strategy_state)
            .bind(&c.privacy_state)
            .execute(&mut *tx)
            .await?;
            let stored: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM checkpoints WHERE task = ?")
                    .bind(task)
                    .fetch_all(&mut *tx)
                    .await?;
            for v in stored {
                if !retention.keeps(v as u64, c.version) {
                    sqlx::query("DELETE FROM checkpoints WHERE task = ? AND version = ?")
                        .bind(task)
                        .bind(v)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query(
            "INSERT INTO rounds (task, round, status, base_version, version, participants, \
             examples, mean_loss, mean_accuracy, started_at, ended_at, commit_ms, reason, kind, \
             privacy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(task)
        .bind(record.round as i64)
        .bind(record.status.as_str())
        .bind(record.base_version as i64)
        .bind(record.version.map(|v| v as i64))
        .bind(record.participants as i64)
        .bind(record.examples as i64)
        .bind(record.mean_loss)
        .bind(record.mean_accuracy)
        .bind(record.started_at_ms)
        .bind(record.ended_at_ms)
        .bind(record.commit_ms)
        .bind(record.reason.map(AbandonReason::as_str))
        .bind(record.kind.as_str())
        .bind(
            record
                .privacy
                .as_ref()
                .map(|p| serde_json::to_string(p).expect("numbers and a name serialize")),
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A task's round history, oldest first.
    pub async fn rounds(&self, task: &str) -> Result<Vec<RoundRecord>, StoreError> {
        self.rounds_after(task, None).await
    }

    /// A task's rounds numbered after `after` (all of them for `None`), oldest first: what
    /// a follower of the history (the TensorBoard writer) has not seen yet, without reading
    /// the whole history again at every round.
    pub async fn rounds_after(
        &self,
        task: &str,
        after: Option<u64>,
    ) -> Result<Vec<RoundRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT round, status, base_version, version, participants, examples, mean_loss, \
             mean_accuracy, started_at, ended_at, commit_ms, reason, kind, privacy FROM rounds \
             WHERE task = ? AND round > ? \
             ORDER BY round",
        )
        .bind(task)
        .bind(after.map_or(-1, |r| r as i64))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| RoundRecord {
                round: r.get::<i64, _>("round") as u64,
                kind: if r.get::<String, _>("kind") == "evaluation" {
                    RoundKind::Evaluation
                } else {
                    RoundKind::Training
                },
                status: match r.get::<String, _>("status").as_str() {
                    "committed" => RoundStatus::Committed,
                    "evaluated" => RoundStatus::Evaluated,
                    _ => RoundStatus::Abandoned,
                },
                reason: r
                    .get::<Option<String>, _>("reason")
                    .and_then(|s| AbandonReason::parse(&s)),
                base_version: r.get::<i64, _>("base_version") as u64,
                version: r.get::<Option<i64>, _>("version").map(|v| v as u64),
                participants: r.get::<i64, _>("participants") as u64,
                examples: r.get::<i64, _>("examples") as u64,
                mean_loss: r.get("mean_loss"),
                mean_accuracy: r.get("mean_accuracy"),
                started_at_ms: r.get("started_at"),
                ended_at_ms: r.get("ended_at"),
                commit_ms: r.get("commit_ms"),
                privacy: r
                    .get::<Option<String>, _>("privacy")
                    .and_then(|j| serde_json::from_str(&j).ok()),
            })
            .collect())
    }

    /// Whether an operator paused the task (it hands out no assignments until resumed).
    pub async fn paused(&self, task: &str) -> Result<bool, StoreError> {
        let paused: Option<i64> = sqlx::query_scalar("SELECT paused FROM tasks WHERE name = ?")
            .bind(task)
            .fetch_optional(&self.pool)
            .await?;
        Ok(paused.unwrap_or(0) != 0)
    }

    /// Records that the task is paused (or not), so that a restart keeps it so.
    pub async fn set_paused(&self, task: &str, paused: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE tasks SET paused = ? WHERE name = ?")
            .bind(i64::from(paused))
            .bind(task)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores a device credential's SHA-256 digest (never the credential itself).
    pub async fn add_credential(&self, c: &StoredCredential) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO credentials (task, device, digest, label, enrolled_at, revoked_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&c.task)
        .bind(&c.device)
        .bind(&c.digest[..])
        .bind(&c.label)
        .bind(c.enrolled_at_ms)
        .bind(c.revoked_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a device's credential revoked; whether there was one to revoke.
    pub async fn revoke_credential(
        &self,
        task: &str,
        device: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE credentials SET revoked_at = COALESCE(revoked_at, ?) \
             WHERE task = ? AND device = ?",
        )
        .bind(at_ms)
        .bind(task)
        .bind(device)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Every stored credential (digests), for the server's in-memory table.
    pub async fn credentials(&self) -> Result<Vec<StoredCredential>, StoreError> {
        let rows = sqlx::query(
            "SELECT task, device, digest, label, enrolled_at, revoked_at FROM credentials \
             ORDER BY enrolled_at, device",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let digest: Vec<u8> = r.try_get("digest")?;
                Ok(StoredCredential {
                    task: r.try_get("task")?,
                    device: r.try_get("device")?,
                    digest: digest.try_into().unwrap_or([0; 32]),
                    label: r.try_get("label")?,
                    enrolled_at_ms: r.try_get("enrolled_at")?,
                    revoked_at_ms: r.try_get("revoked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Stores (or replaces) the settings of a task created through the admin API, as the TOML
    /// the operator sent, and an external model's initial model (safetensors), so that a
    /// restart serves it again. New settings without a model keep the stored one.
    pub async fn put_admin_task(
        &self,
        name: &str,
        settings: &str,
        initial_model: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO admin_tasks (name, settings, updated_at, initial_model) \
             VALUES (?, ?, ?, ?) \
             ON CONFLICT(name) DO UPDATE SET settings = excluded.settings, \
             updated_at = excluded.updated_at, \
             initial_model = COALESCE(excluded.initial_model, admin_tasks.initial_model)",
        )
        .bind(name)
        .bind(settings)
        .bind(now_ms())
        .bind(initial_model)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tasks created through the admin API: `(name, settings TOML, initial model)`, oldest
    /// first.
    pub async fn admin_tasks(&self) -> Result<Vec<AdminTask>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, settings, initial_model FROM admin_tasks ORDER BY updated_at, name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The initial model stored with an admin task, if it has one.
    pub async fn admin_task_model(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Option<Vec<u8>>,)> =
            sqlx::query_as("SELECT initial_model FROM admin_tasks WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(|(m,)| m))
    }

    /// Deletes a task and everything stored of it: versions, round history, credentials and
    /// its admin settings, in one transaction.
    pub async fn delete_task(&self, task: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for table in ["checkpoints", "rounds", "credentials"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE task = ?"))
                .bind(task)
                .execute(&mut *tx)
                .await?;
        }
        for table in ["tasks", "admin_tasks"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE name = ?"))
                .bind(task)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Closes the pool, checkpointing the write-ahead log.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulator's store lives in its one connection: the pool must never close it for
    /// age or idleness (sqlx's defaults, 30 and 10 minutes, emptied the database of every
    /// simulation that ran longer: "no such table: checkpoints" from its 70th round on).
    #[tokio::test]
    async fn the_in_memory_store_keeps_its_one_connection_for_good() {
        let store = Store::open_memory().await.unwrap();
        let options = store.pool.options();
        assert_eq!(options.get_max_lifetime(), None);
        assert_eq!(options.get_idle_timeout(), None);
        assert_eq!(
            (options.get_min_connections(), options.get_max_connections()),
            (1, 1)
        );
        // And the schema is there, on the connection every query gets.
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN \
             ('tasks', 'rounds', 'checkpoints')",
        )
        .fetch_one(&store.pool)
        .await
        .unwrap();
        assert_eq!(tables, 3);
    }
}
