//! A round's phases as types. An [`OpenRound`] hands out assignments and tracks uploads;
//! [`OpenRound::close`] consumes it into a [`ClosedRound`]: a commit with the merged
//! aggregate, or an abandonment. New phases (secure aggregation's key exchange and unmasking)
//! slot in as further types between the two.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use starling_core::params::Layout;
use starling_core::FedAvg;
use tokio::time::Instant;

use super::shards::Shards;
use super::{EngineError, RoundInfo};
use crate::settings::RoundPolicy;

/// Where one assignment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentState {
    /// Handed out, no update yet.
    Assigned,
    /// Its update is being folded in.
    InFlight,
    /// Its update is in the aggregate.
    Folded,
}

/// A round that accepts check-ins and uploads.
#[derive(Debug)]
pub struct OpenRound {
    /// Round number.
    pub number: u64,
    /// The version devices train from.
    pub base_version: u64,
    /// Start, Unix milliseconds.
    pub started_at_ms: i64,
    /// When the deadline passes.
    pub deadline: Instant,
    /// The deadline, Unix milliseconds.
    pub deadline_ms: i64,
    assignments: HashMap<String, AssignmentState>,
    devices: HashSet<String>,
    in_flight: u64,
    folded: u64,
    closing: bool,
    shards: Arc<Shards>,
    policy: RoundPolicy,
}

/// How a round ended.
#[derive(Debug)]
pub enum ClosedRound {
    /// Enough updates: the merged aggregate becomes the next version.
    Commit {
        /// The merged aggregate.
        aggregate: FedAvg,
    },
    /// The deadline passed below the minimum: the model stays.
    Abandon {
        /// Updates that had arrived.
        updates: u64,
    },
}

impl OpenRound {
    /// Opens a round.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        number: u64,
        base_version: u64,
        layout: &Layout,
        policy: &RoundPolicy,
        shards: usize,
        now_ms: i64,
        now: Instant,
    ) -> Self {
        let dur = std::time::Duration::from_secs_f64(policy.deadline_secs);
        Self {
            number,
            base_version,
            started_at_ms: now_ms,
            deadline: now + dur,
            deadline_ms: now_ms + dur.as_millis() as i64,
            assignments: HashMap::new(),
            devices: HashSet::new(),
            in_flight: 0,
            folded: 0,
            closing: false,
            shards: Arc::new(Shards::new(layout, shards)),
            policy: policy.clone(),
        }
    }

    /// Whether the round still hands out assignments.
    pub fn has_room(&self) -> bool {
        let cap = (f64::from(self.policy.goal) * self.policy.overcommit).ceil() as usize;
        !self.closing
            && self.assignments.len() < cap
            && self.folded + self.in_flight < u64::from(self.policy.goal)
    }

    /// Records a new assignment, for a device that named itself or not.
    pub fn assign(&mut self, token: String, device: Option<String>) {
        self.assignments.insert(token, AssignmentState::Assigned);
        if let Some(d) = device {
            self.devices.insert(d);
        }
    }

    /// Whether this device already holds an assignment of the round.
    pub fn has_device(&self, device: &str) -> bool {
        self.devices.contains(device)
    }

    /// Checks an upload's round-level facts and marks its assignment in flight.
    pub fn reserve(&mut self, base_version: u64, token: &str) -> Result<Arc<Shards>, EngineError> {
        if base_version != self.base_version {
            return Err(EngineError::StaleVersion {
                round: self.number,
                got: base_version,
                expected: self.base_version,
            });
        }
        match self.assignments.get_mut(token) {
            None => Err(EngineError::UnknownToken(self.number)),
            Some(AssignmentState::InFlight | AssignmentState::Folded) => {
                Err(EngineError::Duplicate)
            }
            Some(_) if self.closing => Err(EngineError::RoundClosed(self.number)),
            Some(state) => {
                *state = AssignmentState::InFlight;
                self.in_flight += 1;
                Ok(self.shards.clone())
            }
        }
    }

    /// An in-flight update is in the aggregate.
    pub fn folded(&mut self, token: &str) {
        if let Some(s) = self.assignments.get_mut(token) {
            if *s == AssignmentState::InFlight {
                *s = AssignmentState::Folded;
                self.in_flight -= 1;
                self.folded += 1;
                if self.folded >= u64::from(self.policy.goal) {
                    self.closing = true;
                }
            }
        }
    }

    /// An in-flight update failed to fold; its assignment may try again.
    pub fn released(&mut self, token: &str) {
        if let Some(s) = self.assignments.get_mut(token) {
            if *s == AssignmentState::InFlight {
                *s = AssignmentState::Assigned;
                self.in_flight -= 1;
            }
        }
    }

    /// The deadline passed: stop handing out work and reserving uploads — unless nobody took
    /// part at all, in which case the round simply stays open for another period (an idle
    /// server records no empty rounds).
    pub fn deadline_passed(&mut self, now_ms: i64, now: Instant) {
        if self.assignments.is_empty() {
            let dur = std::time::Duration::from_secs_f64(self.policy.deadline_secs);
            self.deadline = now + dur;
            self.deadline_ms = now_ms + dur.as_millis() as i64;
        } else {
            self.closing = true;
        }
    }

    /// The deadline is declared passed by a virtual clock: close, even with no assignment.
    pub fn expire(&mut self) {
        self.closing = true;
    }

    /// Whether the round is ready to close (goal reached or deadline passed, nothing in
    /// flight).
    pub fn ready_to_close(&self) -> bool {
        self.closing && self.in_flight == 0
    }

    /// Whether the deadline has passed or the goal was reached.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// Updates folded in.
    pub fn updates(&self) -> u64 {
        self.folded
    }

    /// Closes the round: commit with the merged aggregate if it reached the minimum.
    pub fn close(self) -> ClosedRound {
        if self.folded >= u64::from(self.policy.min) && self.folded > 0 {
            ClosedRound::Commit {
                aggregate: self.shards.merged(),
            }
        } else {
            ClosedRound::Abandon {
                updates: self.folded,
            }
        }
    }

    /// The round as published.
    pub fn info(&self) -> RoundInfo {
        RoundInfo {
            round: self.number,
            base_version: self.base_version,
            updates: self.folded,
            assigned: self.assignments.len() as u64,
            goal: self.policy.goal,
            min: self.policy.min,
            deadline_ms: self.deadline_ms,
        }
    }
}
