//! Rate limits on what devices send (check-ins, enrollments, uploads, evaluation reports): per
//! client address and per device credential, each a GCRA limiter (`governor`) keyed by the
//! address or by the credential's device, allowing a burst of a minute's quota. A request over
//! its limit is answered 429 `rate_limited` with `Retry-After`, before its body is read, and
//! counted in `/metrics` (`starling_rate_limited_total{scope=...}`).
//!
//! Per credential, on by default (`server.rate_limit_per_credential`, 120 a minute: a device
//! needs a few requests a round). Per address, off by default
//! (`server.rate_limit_per_address` = 0): behind carrier-grade NAT thousands of phones share
//! one address, so only an operator who knows their devices' addresses should set it. Idle keys
//! are pruned as requests come, so the tables stay as large as the recently active clients.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use starling_core::wire::protocol::ErrorCode;

use crate::api::ApiError;
use crate::metrics::Metrics;

/// Requests between two prunings of idle keys.
const PRUNE_EVERY: u64 = 4096;

/// What a limit is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client's address.
    Address,
    /// The device credential (enrolled tasks).
    Credential,
}

impl Scope {
    /// As counted in the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Credential => "credential",
        }
    }
}

/// The server's rate limits.
pub struct RateLimits {
    per_address: Option<(u32, DefaultKeyedRateLimiter<IpAddr>)>,
    per_credential: Option<(u32, DefaultKeyedRateLimiter<String>)>,
    checks: AtomicU64,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("per_address", &self.per_address.as_ref().map(|l| l.0))
            .field("per_credential", &self.per_credential.as_ref().map(|l| l.0))
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Limits of `per_address` and `per_credential` requests a minute (0: none).
    pub fn new(per_address: u32, per_credential: u32) -> Self {
        fn limiter<K: Clone + std::hash::Hash + Eq>(
            n: u32,
        ) -> Option<(u32, DefaultKeyedRateLimiter<K>)> {
            NonZeroU32::new(n).map(|n| {
                (
                    n.get(),
                    DefaultKeyedRateLimiter::hashmap(Quota::per_minute(n)),
                )
            })
        }
        Self {
            per_address: limiter(per_address),
            per_credential: limiter(per_credential),
            checks: AtomicU64::new(0),
            clock: DefaultClock::default(),
        }
    }

    fn prune(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            if let Some((_, l)) = &self.per_address {
                l.retain_recent();
            }
            if let Some((_, l)) = &self.per_credential {
                l.retain_recent();
            }
        }
    }

    fn refuse(
        &self,
        metrics: &Metrics,
        scope: Scope,
        per_minute: u32,
        wait: std::time::Duration,
    ) -> ApiError {
        metrics.count_rate_limited(scope);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {per_minute} requests a minute from this {}; try again in {secs} s",
                match scope {
                    Scope::Address => "address",
                    Scope::Credential => "device credential",
                }
            ),
        )
        .retry_after(secs)
    }

    /// Counts a request from `address`; refused over the per-address limit.
    pub fn check_address(
        &self,
        metrics: &Metrics,
        address: Option<IpAddr>,
    ) -> Result<(), ApiError> {
        let (Some((n, limiter)), Some(address)) = (&self.per_address, address) else {
            return Ok(());
        };
        self.prune();
        limiter.check_key(&address).map_err(|not| {
            self.refuse(
                metrics,
                Scope::Address,
                *n,
                not.wait_time_from(self.clock.now()),
            )
        })
    }

    /// Counts a request of the device `device` of task `task`; refused over the
    /// per-credential limit.
    pub fn check_credential(
        &self,
        metrics: &Metrics,
        task: &str,
        device: &str,
    ) -> Result<(), ApiError> {
        let Some((n, limiter)) = &self.per_credential else {
            return Ok(());
        };
        self.prune();
        limiter
            .check_key(&format!("{task}/{device}"))
            .map_err(|not| {
                self.refuse(
                    metrics,
                    Scope::Credential,
                    *n,
                    not.wait_time_from(self.clock.now()),
                )
            })
    }
}
