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
//!
//! Wrong enrollment secrets are limited apart, per address and on by default
//! (`server.enrollment_failures_per_address`, 10 a minute): an address past its failures gets
//! 429 for every enrollment until its minute is over, before its secret is even compared, so
//! a secret cannot be guessed at speed, and only the first failure of each minute is logged,
//! so a flood cannot fill the log. Devices that enroll correctly never count, which is why
//! this is safe behind carrier-grade NAT where a per-address limit on all requests is not.
//! (A fixed window of failures rather than a `governor` limiter: a guard must test an address
//! without spending a cell, which `governor` cannot.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// Wrong enrollment secrets from one address.
    Enrollment,
}

impl Scope {
    /// As counted in the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Credential => "credential",
            Scope::Enrollment => "enrollment",
        }
    }
}

/// The server's rate limits.
pub struct RateLimits {
    per_address: Option<(u32, DefaultKeyedRateLimiter<IpAddr>)>,
    per_credential: Option<(u32, DefaultKeyedRateLimiter<String>)>,
    /// Wrong enrollment secrets per address.
    pub enrollment: EnrollmentGuard,
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
    /// Limits of `per_address` and `per_credential` requests a minute, and of
    /// `enrollment_failures` wrong enrollment secrets a minute per address (0: none).
    pub fn new(per_address: u32, per_credential: u32, enrollment_failures: u32) -> Self {
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
            enrollment: EnrollmentGuard::new(enrollment_failures),
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
                    Scope::Address | Scope::Enrollment => "address",
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

/// The window in which an address's wrong enrollment secrets are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked before expired windows are swept out.
const SWEEP_AT: usize = 65_536;

/// Wrong enrollment secrets per client address, in fixed one-minute windows.
#[derive(Debug)]
pub struct EnrollmentGuard {
    per_minute: u32,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl EnrollmentGuard {
    /// A guard allowing `per_minute` wrong secrets a minute per address (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Instant, u32)>> {
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refuses an enrollment from `address` when it has had its wrong secrets this minute
    /// (before the secret is compared).
    pub fn check(&self, metrics: &Metrics, address: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(address), n @ 1..) = (address, self.per_minute) else {
            return Ok(());
        };
        let now = Instant::now();
        let windows = self.windows();
        match windows.get(&address) {
            Some(&(start, failures)) if failures >= n && now < start + FAILURE_WINDOW => {
                metrics.count_rate_limited(Scope::Enrollment);
                let secs = (start + FAILURE_WINDOW - now).as_secs_f64().ceil().max(1.0) as u64;
                Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "{n} wrong enrollment secrets a minute from this address; try again in \
                         {secs} s"
                    ),
                )
                .retry_after(secs))
            }
            _ => Ok(()),
        }
    }

    /// Counts a wrong secret from `address`; true when it is the first of its window (the
    /// one worth logging).
    pub fn failed(&self, address: Option<IpAddr>) -> bool {
        let Some(address) = address else {
            return true;
        };
        let now = Instant::now();
        let mut windows = self.windows();
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, (start, _)| now < *start + FAILURE_WINDOW);
        }
        let entry = windows.entry(address).or_insert((now, 0));
        if now >= entry.0 + FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 == 1
    }
}
