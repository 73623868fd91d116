//! Device credentials of enrolled tasks. A device presents its task's enrollment secret once
//! (`POST /v1/tasks/{task}/enroll`) and receives a credential of its own: 32 random bytes from
//! the thread's CSPRNG (ChaCha seeded by the operating system), shown to the device that one
//! time. The server keeps only the credential's SHA-256 digest, in SQLite and in memory, so a
//! stolen database admits nobody. A credential is high-entropy, so looking it up by its digest
//! leaks nothing an attacker could use through timing.
//!
//! Every check-in, upload and evaluation report of an enrolled task carries the credential
//! (`Authorization: Bearer <credential>`); the engine then knows the device by the
//! server-chosen id, so one credential holds at most one assignment per round, and an upload
//! token works only with the credential it was handed to. Operators list and revoke
//! credentials through the admin API; a revoked credential is refused from the next request
//! on.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use starling_core::wire::protocol::ErrorCode;

use crate::store::{now_ms, Store, StoreError, StoredCredential};

/// The prefix of every credential, so that one pasted into the wrong place is recognisable
/// (and secret scanners can find leaked ones).
pub const CREDENTIAL_PREFIX: &str = "stc_";

/// Why a credential was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// None was presented.
    #[error(
        "task `{0}` admits enrolled devices only: send `Authorization: Bearer <credential>` \
         (enroll once with the task's enrollment secret at POST /v1/tasks/{0}/enroll)"
    )]
    Missing(String),
    /// Not one the server issued for this task.
    #[error("this device credential was not issued for task `{0}`")]
    Invalid(String),
    /// Revoked by an operator.
    #[error("device `{0}`'s credential was revoked by an operator")]
    Revoked(String),
}

impl CredentialError {
    /// The error code answered.
    pub fn code(&self) -> ErrorCode {
        match self {
            CredentialError::Missing(_) => ErrorCode::MissingCredential,
            CredentialError::Invalid(_) => ErrorCode::InvalidCredential,
            CredentialError::Revoked(_) => ErrorCode::RevokedCredential,
        }
    }
}

/// One device of an enrolled task, as operators see it (no credential, no digest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceInfo {
    /// The device's id.
    pub id: String,
    /// The label it enrolled with.
    pub label: Option<String>,
    /// When it enrolled, Unix milliseconds.
    pub enrolled_at_ms: i64,
    /// Its last authenticated request since the server started, Unix milliseconds.
    pub last_seen_ms: Option<i64>,
    /// Check-ins since the server started.
    pub check_ins: u64,
    /// When an operator revoked its credential.
    pub revoked_at_ms: Option<i64>,
}

#[derive(Debug)]
struct Entry {
    stored: StoredCredential,
    last_seen_ms: Option<i64>,
    check_ins: u64,
}

/// Every credential the server issued, by digest, kept in memory and written through to the
/// store.
#[derive(Debug)]
pub struct Credentials {
    store: Store,
    by_digest: Mutex<HashMap<[u8; 32], Entry>>,
}

fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

/// Whether `given` is `secret`, compared by their digests so that the comparison's timing
/// says nothing about the secret.
pub fn secret_matches(given: &str, secret: &str) -> bool {
    digest(given) == digest(secret)
}

impl Credentials {
    /// Loads every stored credential.
    pub async fn load(store: Store) -> Result<Self, StoreError> {
        let by_digest = store
            .credentials()
            .await?
            .into_iter()
            .map(|c| {
                (
                    c.digest,
                    Entry {
                        stored: c,
                        last_seen_ms: None,
                        check_ins: 0,
                    },
                )
            })
            .collect();
        Ok(Self {
            store,
            by_digest: Mutex::new(by_digest),
        })
    }

    /// Issues a credential for a new device of `task`: returns `(device id, credential)`.
    /// Only the credential's digest is kept.
    pub async fn enroll(
        &self,
        task: &str,
        label: Option<String>,
    ) -> Result<(String, String), StoreError> {
        // The thread's generator is not `Send`: drawn before the first await.
        let (id, secret): (u64, [u8; 32]) = {
            let mut rng = rand::rng();
            (rng.random(), rng.random())
        };
        let device = format!("d-{id:016x}");
        let mut credential = String::with_capacity(CREDENTIAL_PREFIX.len() + 64);
        credential.push_str(CREDENTIAL_PREFIX);
        for b in secret {
            credential.push_str(&format!("{b:02x}"));
        }
        let stored = StoredCredential {
            task: task.to_string(),
            device: device.clone(),
            digest: digest(&credential),
            label,
            enrolled_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        self.store.add_credential(&stored).await?;
        self.lock().insert(
            stored.digest,
            Entry {
                stored,
                last_seen_ms: None,
                check_ins: 0,
            },
        );
        Ok((device, credential))
    }

    /// The device id `credential` stands for in `task`, counting the request as a check-in
    /// when `check_in` is set.
    pub fn authenticate(
        &self,
        task: &str,
        credential: Option<&str>,
        check_in: bool,
    ) -> Result<String, CredentialError> {
        let Some(credential) = credential else {
            return Err(CredentialError::Missing(task.to_string()));
        };
        let mut table = self.lock();
        let entry = table
            .get_mut(&digest(credential))
            .filter(|e| e.stored.task == task)
            .ok_or_else(|| CredentialError::Invalid(task.to_string()))?;
        if entry.stored.revoked_at_ms.is_some() {
            return Err(CredentialError::Revoked(entry.stored.device.clone()));
        }
        entry.last_seen_ms = Some(now_ms());
        if check_in {
            entry.check_ins += 1;
        }
        Ok(entry.stored.device.clone())
    }

    /// Revokes a device's credential; `false` if the task has no such device.
    pub async fn revoke(&self, task: &str, device: &str) -> Result<bool, StoreError> {
        let at = now_ms();
        if !self.store.revoke_credential(task, device, at).await? {
            return Ok(false);
        }
        for e in self.lock().values_mut() {
            if e.stored.task == task && e.stored.device == device {
                e.stored.revoked_at_ms.get_or_insert(at);
            }
        }
        Ok(true)
    }

    /// The devices of a task, in enrollment order.
    pub fn devices(&self, task: &str) -> Vec<DeviceInfo> {
        let mut list: Vec<DeviceInfo> = self
            .lock()
            .values()
            .filter(|e| e.stored.task == task)
            .map(|e| DeviceInfo {
                id: e.stored.device.clone(),
                label: e.stored.label.clone(),
                enrolled_at_ms: e.stored.enrolled_at_ms,
                last_seen_ms: e.last_seen_ms,
                check_ins: e.check_ins,
                revoked_at_ms: e.stored.revoked_at_ms,
            })
            .collect();
        list.sort_by(|a, b| (a.enrolled_at_ms, &a.id).cmp(&(b.enrolled_at_ms, &b.id)));
        list
    }

    /// The credentials issued for a task: `(device, first 8 bytes of the digest in hex,
    /// issued at, revoked at)`, in issue order.
    pub fn credentials(&self, task: &str) -> Vec<(String, String, i64, Option<i64>)> {
        let mut list: Vec<_> = self
            .lock()
            .values()
            .filter(|e| e.stored.task == task)
            .map(|e| {
                let prefix: String = e.stored.digest[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                (
                    e.stored.device.clone(),
                    prefix,
                    e.stored.enrolled_at_ms,
                    e.stored.revoked_at_ms,
                )
            })
            .collect();
        list.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        list
    }

    /// Forgets a deleted task's credentials (the store deletes its rows with the task).
    pub fn forget_task(&self, task: &str) {
        self.lock().retain(|_, e| e.stored.task != task);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.by_digest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
