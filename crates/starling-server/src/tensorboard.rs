//! TensorBoard event files of the round history (`starling serve --tensorboard DIR`,
//! `server.tensorboard_dir`; `starling simulate --tensorboard DIR`), so that people who know
//! TensorBoard can watch a federation with it: `tensorboard --logdir DIR`.
//!
//! **Format.** An event file is TensorBoard's: a sequence of TFRecords (the data's length as
//! a u64 little-endian, the masked CRC32C of those 8 bytes, the data, the masked CRC32C of
//! the data; a CRC is masked as `((crc >> 15) | (crc << 17)) + 0xa282ead8`), each holding one
//! `tensorflow.Event` protobuf message. The first says `file_version: "brain.Event:2"`, the
//! second is a `session_log` START at step 0; each round after them is one Event with the
//! round's `wall_time`, its `step` and a `summary` of `simple_value` scalars. The messages
//! are prost-derived structs carrying only the fields written; the checksums are `crc`'s
//! Castagnoli algorithm.
//!
//! **What is written** for each closed round ([`round_scalars`]), at step = the round number
//! (every record has one, training, evaluation or abandoned, and a task never reuses one,
//! so the steps only grow, even across restarts and rollbacks; the committed version would
//! leave evaluation and abandoned rounds without a step of their own) and wall time = the
//! round's end:
//!
//! | round | tags |
//! |---|---|
//! | committed (training) | `train/loss`, `train/accuracy` (classifiers), `round/participants`, `round/examples`, `round/commit_ms`; `privacy/epsilon` (ε spent so far) with `[tasks.privacy]` |
//! | evaluated (federated evaluation) | `eval/loss`, `eval/accuracy` (classifiers) |
//! | abandoned | `round/abandoned` = 1 |
//!
//! A private round publishes no device statistics, so its Event has no `train/loss`,
//! `train/accuracy` or `round/examples` either.
//!
//! **Files.** The server writes one file per task, `DIR/<task>/events.out.tfevents.<unix
//! secs>.<hostname>.<pid>` (the name TensorBoard's own writers give; TensorBoard shows each
//! folder as a run). [`Writers`] starts one background task per task: it writes the stored
//! history into a fresh file at start, then follows the task's status channel and, whenever
//! a round closes, appends every stored round it has not written (so none is missed when two
//! close between two wake-ups) and flushes. A restarted server writes a new file with the
//! whole history; TensorBoard reads a run's files in name order, and the new file's START
//! (for TensorBoard's Python reader) and its steps starting over (for its data server) make
//! it drop the older files' points, so the run shows each round once. A failure to write (a
//! full disk, a folder without permission) is logged once for the task, whose event file
//! then stops growing; the server goes on serving.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::{TaskHandle, TaskStatus};
use crate::store::{RoundRecord, RoundStatus, Store};

/// The file version TensorBoard's current writers put first in every event file.
const FILE_VERSION: &str = "brain.Event:2";

/// CRC-32C (Castagnoli), the checksum of TFRecord framing.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// `tensorflow.Event` (`tensorflow/core/util/event.proto`), the fields Starling writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.SessionLog`: here only its status, `START`.
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    /// `SessionLog.SessionStatus` (an enum on the wire, a varint like this int32).
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `SessionLog.SessionStatus.START`.
const SESSION_START: i32 = 1;

/// `tensorflow.Summary` (`tensorflow/core/framework/summary.proto`).
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a tag and, here, always a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    /// In `Value`'s `oneof value`, so a 0.0 is still written (a plain proto3 float field
    /// equal to 0 would be left out, and TensorBoard would see no scalar).
    #[prost(oneof = "ValueKind", tags = "2")]
    value: Option<ValueKind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// A CRC as TFRecord stores it: rotated and offset, so that the CRC of data that itself
/// holds CRCs is not degenerate.
fn masked_crc32c(bytes: &[u8]) -> u32 {
    CRC32C
        .checksum(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The scalars TensorBoard shows for one closed round, as (tag, value); the table in the
/// module docs.
pub fn round_scalars(r: &RoundRecord) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    match r.status {
        RoundStatus::Committed => {
            if let Some(loss) = r.mean_loss {
                out.push(("train/loss", loss));
            }
            if let Some(accuracy) = r.mean_accuracy {
                out.push(("train/accuracy", accuracy));
            }
            out.push(("round/participants", r.participants as f64));
            // A private round publishes no example count (its record holds 0).
            if r.privacy.is_none() {
                out.push(("round/examples", r.examples as f64));
            }
            if let Some(ms) = r.commit_ms {
                out.push(("round/commit_ms", ms));
            }
            if let Some(p) = &r.privacy {
                out.push(("privacy/epsilon", p.epsilon));
            }
        }
        RoundStatus::Evaluated => {
            if let Some(loss) = r.mean_loss {
                out.push(("eval/loss", loss));
            }
            if let Some(accuracy) = r.mean_accuracy {
                out.push(("eval/accuracy", accuracy));
            }
        }
        RoundStatus::Abandoned => out.push(("round/abandoned", 1.0)),
    }
    out
}

/// One TensorBoard event file, open for appending.
#[derive(Debug)]
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
}

impl Writer {
    /// Creates `dir` if it is missing and a new event file in it,
    /// `events.out.tfevents.<unix secs>.<hostname>.<pid>` (with `.1`, `.2`, ... after it
    /// should that name be taken), holding the file-version record and a session START
    /// (what this file says replaces what older files in `dir` said), flushed.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{}.{}.{}",
            now.as_secs(),
            hostname(),
            std::process::id()
        );
        let mut n = 0u32;
        let (file, path) = loop {
            let path = match n {
                0 => dir.join(&name),
                n => dir.join(format!("{name}.{n}")),
            };
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let mut writer = Self {
            out: BufWriter::new(file),
            path,
        };
        writer.write_event(&Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        // A new file holds the whole history again: TensorBoard's reader drops what earlier
        // files of the folder said at steps from this START's on (step 0: all of it), so a
        // restarted server's run shows each round once.
        writer.write_event(&Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            what: Some(What::SessionLog(SessionLog {
                status: SESSION_START,
            })),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one Event of `scalars` (as TensorBoard's `float` values) at `step`, stamped
    /// `wall_time` (Unix seconds); nothing for no scalars. Buffered: [`Writer::flush`] hands
    /// it to the file.
    pub fn write_scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        scalars: &[(&str, f64)],
    ) -> io::Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let value = scalars
            .iter()
            .map(|&(tag, v)| SummaryValue {
                tag: tag.into(),
                value: Some(ValueKind::SimpleValue(v as f32)),
            })
            .collect();
        self.write_event(&Event {
            wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            what: Some(What::Summary(Summary { value })),
        })
    }

    /// Appends a closed round: [`round_scalars`] at step = its number, stamped with its end.
    pub fn write_round(&mut self, r: &RoundRecord) -> io::Result<()> {
        self.write_scalars(r.round, r.ended_at_ms as f64 / 1000.0, &round_scalars(r))
    }

    /// Hands what was written to the file, where TensorBoard sees it.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn write_event(&mut self, event: &Event) -> io::Result<()> {
        self.out.write_all(&record(&event.encode_to_vec()))
    }
}

/// This machine's name for the file name, as TensorBoard's writers put it there (any
/// character that could not stand in a file name replaced); `localhost` if it cannot be
/// read.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The background writers of a server's tasks' event files, one tokio task per task; none
/// without a directory. Tasks started later (through the admin API) are followed from then
/// on ([`Writers::follow`]).
#[derive(Debug, Default)]
pub struct Writers {
    /// Where the files go, and what the followers read; `None`: no files.
    target: Option<(PathBuf, Store, watch::Receiver<()>)>,
    /// Dropped to tell the followers to write what is left and stop.
    stop: Option<watch::Sender<()>>,
    followers: Vec<Follower>,
}

#[derive(Debug)]
struct Follower {
    task: String,
    written: watch::Receiver<Option<u64>>,
    join: JoinHandle<()>,
}

impl Writers {
    /// Starts writing each task's history under `dir/<task>/` (nothing for `None`): the
    /// stored rounds at once, then each round as it closes.
    pub fn spawn(dir: Option<&Path>, tasks: &[TaskHandle], store: &Store) -> Self {
        let Some(dir) = dir else {
            return Self::default();
        };
        let (stop, stopped) = watch::channel(());
        let mut writers = Self {
            target: Some((dir.to_path_buf(), store.clone(), stopped)),
            stop: Some(stop),
            followers: Vec::new(),
        };
        for task in tasks {
            writers.follow(task);
        }
        writers
    }

    /// Follows one more task (created or restarted at run time): its stored history into a
    /// fresh file, then each round as it closes. Nothing without a directory. A task that
    /// was followed before (replaced through the admin API) gets a fresh file, which
    /// TensorBoard reads as the same run started again.
    pub fn follow(&mut self, task: &TaskHandle) {
        let Some((dir, store, stopped)) = &self.target else {
            return;
        };
        self.followers.retain(|f| !f.join.is_finished());
        let (written_tx, written) = watch::channel(None);
        let log = TaskLog {
            task: task.name().to_string(),
            dir: dir.join(task.name()),
            writer: None,
            last: None,
            failed: false,
            store_failed: false,
            written: written_tx,
        };
        let join = tokio::spawn(follow(
            log,
            task.subscribe(),
            store.clone(),
            stopped.clone(),
        ));
        self.followers.push(Follower {
            task: task.name().to_string(),
            written,
            join,
        });
    }

    /// The last round of `task` written to its event file and flushed (`None` before the
    /// first), as it changes; `None` if no writer follows that task.
    pub fn written(&self, task: &str) -> Option<watch::Receiver<Option<u64>>> {
        self.followers
            .iter()
            .rev()
            .find(|f| f.task == task)
            .map(|f| f.written.clone())
    }

    /// Writes the rounds closed since the last write, flushes, and stops the writers. The
    /// server calls this after its last request and before closing the store.
    pub async fn stop(mut self) {
        self.stop = None;
        for f in self.followers {
            if let Err(e) = f.join.await {
                tracing::error!(task = %f.task, error = %e, "the TensorBoard writer failed");
            }
        }
    }
}

/// One task's event file and how far it got.
struct TaskLog {
    task: String,
    dir: PathBuf,
    /// Created at the first write.
    writer: Option<Writer>,
    /// The last round written.
    last: Option<u64>,
    /// A write failed (logged): this task's file is not written any more.
    failed: bool,
    /// Reading the history failed (logged once; tried again at the next round).
    store_failed: bool,
    written: watch::Sender<Option<u64>>,
}

/// Follows one task through its status channel (not its handle, which would keep its
/// engine alive): writes its history, then every round as it closes, until the task's engine
/// stops or the writers are stopped, and then what is left.
async fn follow(
    mut log: TaskLog,
    mut status: watch::Receiver<TaskStatus>,
    store: Store,
    mut stopped: watch::Receiver<()>,
) {
    // Marked seen before the history is read: a round that closes meanwhile wakes us below.
    status.borrow_and_update();
    log.catch_up(&store).await;
    loop {
        tokio::select! {
            changed = status.changed() => if changed.is_err() { break },
            _ = stopped.changed() => break,
        }
        let closed = status
            .borrow_and_update()
            .last_round
            .as_ref()
            .map(|r| r.round);
        if closed > log.last {
            log.catch_up(&store).await;
        }
    }
    log.catch_up(&store).await;
}

impl TaskLog {
    /// Appends the stored rounds after the last one written (creating the file the first
    /// time), and flushes.
    async fn catch_up(&mut self, store: &Store) {
        if self.failed {
            return;
        }
        let records = match store.rounds_after(&self.task, self.last).await {
            Ok(records) => records,
            Err(e) => {
                if !self.store_failed {
                    self.store_failed = true;
                    tracing::warn!(task = %self.task, error = %e,
                        "cannot read the round history for the TensorBoard event file");
                }
                return;
            }
        };
        if records.is_empty() && self.writer.is_some() {
            return;
        }
        let (dir, writer) = (self.dir.clone(), self.writer.take());
        // File I/O off the reactor: the first write can be a long history.
        let done = tokio::task::spawn_blocking(move || {
            let created = writer.is_none();
            let mut w = match writer {
                Some(w) => w,
                None => Writer::create(&dir)?,
            };
            for r in &records {
                w.write_round(r)?;
            }
            w.flush()?;
            io::Result::Ok((w, records.last().map(|r| r.round), created))
        })
        .await;
        match done {
            Ok(Ok((w, last, created))) => {
                if created {
                    tracing::info!(task = %self.task, path = %w.path().display(),
                        "writing the round history as TensorBoard events");
                }
                self.writer = Some(w);
                if last.is_some() {
                    self.last = last;
                    self.written.send_replace(last);
                }
            }
            Ok(Err(e)) => {
                self.failed = true;
                tracing::error!(task = %self.task, dir = %self.dir.display(), error = %e,
                    "cannot write the TensorBoard event file; its rounds are no longer written");
            }
            Err(e) => {
                self.failed = true;
                tracing::error!(task = %self.task, error = %e, "the TensorBoard writer failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        // The check value of CRC-32C (RFC 3720, and every CRC catalogue).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        // Masked as TFRecord masks it: TensorBoard's own `masked_crc32c` gives this.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // The reference bytes below are what TensorBoard's own Python writer produces
    // (`tensorboard.summary.writer.record_writer.RecordWriter` over `event_pb2.Event`,
    // tensorboard 2.21.0) for the same messages.

    #[test]
    fn an_empty_record_is_framed_as_tfrecord() {
        assert_eq!(record(b""), hex("000000000000000029039807d8ea82a2"));
    }

    #[test]
    fn the_file_version_event_is_framed_as_tensorboard_writes_it() {
        let event = Event {
            wall_time: 1_700_000_000.5,
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        };
        assert_eq!(
            record(&event.encode_to_vec()),
            hex(
                "1800000000000000a37f4b220900002040fc54d9411a0d627261696e2e4576656e743a32\
                 2b353110"
            )
        );
    }

    #[test]
    fn the_session_start_event_is_framed_as_tensorboard_writes_it() {
        let event = Event {
            wall_time: 1_700_000_000.5,
            step: 0,
            what: Some(What::SessionLog(SessionLog {
                status: SESSION_START,
            })),
        };
        assert_eq!(
            record(&event.encode_to_vec()),
            hex("0d000000000000003c37b8340900002040fc54d9413a020801a870fdd5")
        );
    }

    #[test]
    fn a_summary_event_with_a_zero_scalar_is_written_as_tensorboard_writes_it() {
        let file = tempfile::tempdir().unwrap();
        let mut w = Writer::create(file.path()).unwrap();
        w.write_scalars(
            3,
            1_700_000_001.25,
            &[("train/loss", 0.5), ("round/abandoned", 0.0)],
        )
        .unwrap();
        w.write_scalars(4, 1_700_000_002.0, &[]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let expected = hex(
            "3800000000000000a3797d570900005040fc54d94110032a2b0a110a0a747261696e2f6c6f73731500\
             00003f0a160a0f726f756e642f6162616e646f6e65641500000000e18dab6e",
        );
        // After the file-version and session-start records (their wall time is now):
        // exactly that record, and nothing for the empty Event.
        assert!(bytes.ends_with(&expected), "{bytes:02x?}");
        let len_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let first = 16 + len_at(0) as usize;
        let second = 16 + len_at(first) as usize;
        assert_eq!(bytes.len(), first + second + expected.len());
    }

    fn committed() -> RoundRecord {
        RoundRecord {
            round: 7,
            kind: starling_core::wire::protocol::RoundKind::Training,
            status: RoundStatus::Committed,
            reason: None,
            base_version: 5,
            version: Some(6),
            participants: 12,
            examples: 340,
            mean_loss: Some(0.25),
            mean_accuracy: Some(0.875),
            started_at_ms: 1_000,
            ended_at_ms: 2_500,
            commit_ms: Some(1.5),
            privacy: None,
        }
    }

    #[test]
    fn each_kind_of_round_gives_its_tags() {
        assert_eq!(
            round_scalars(&committed()),
            [
                ("train/loss", 0.25),
                ("train/accuracy", 0.875),
                ("round/participants", 12.0),
                ("round/examples", 340.0),
                ("round/commit_ms", 1.5),
            ]
        );
        let private = RoundRecord {
            examples: 0,
            mean_loss: None,
            mean_accuracy: None,
            privacy: Some(crate::store::RoundPrivacy {
                mechanism: "gaussian".into(),
                clip: 1.0,
                next_clip: None,
                noise_multiplier: 1.1,
                cohort: 12,
                sampling_rate: 0.01,
                epsilon: 0.75,
                delta: 1e-5,
            }),
            ..committed()
        };
        assert_eq!(
            round_scalars(&private),
            [
                ("round/participants", 12.0),
                ("round/commit_ms", 1.5),
                ("privacy/epsilon", 0.75),
            ]
        );
        let evaluated = RoundRecord {
            kind: starling_core::wire::protocol::RoundKind::Evaluation,
            status: RoundStatus::Evaluated,
            version: None,
            commit_ms: None,
            ..committed()
        };
        assert_eq!(
            round_scalars(&evaluated),
            [("eval/loss", 0.25), ("eval/accuracy", 0.875)]
        );
        let abandoned = RoundRecord {
            status: RoundStatus::Abandoned,
            reason: Some(crate::engine::round::AbandonReason::BelowMinimum),
            version: None,
            mean_loss: None,
            mean_accuracy: None,
            commit_ms: None,
            ..committed()
        };
        assert_eq!(round_scalars(&abandoned), [("round/abandoned", 1.0)]);
    }

    #[test]
    fn files_are_named_as_tensorboard_names_them_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let a = Writer::create(&dir.path().join("task")).unwrap();
        let b = Writer::create(&dir.path().join("task")).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_str().unwrap().to_string();
        let parts: Vec<&str> = name.splitn(5, '.').collect();
        assert_eq!(parts[..3], ["events", "out", "tfevents"], "{name}");
        assert!(parts[3].parse::<u64>().unwrap() > 1_600_000_000, "{name}");
        assert!(
            name.ends_with(&format!(".{}", std::process::id())),
            "{name}"
        );
        assert!(a.path().is_file() && b.path().is_file());
    }
}
