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
//!
//! An address is counted by [`client_key`]: an IPv6 client by its /64 network, which one host
//! or link holds whole, so cycling through its 2^64 addresses gains nothing. The guard tracks
//! at most [`MAX_TRACKED`] networks; past that, new ones share one window, so a flood of
//! addresses can neither grow the table without bound nor escape the limit.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
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
        limiter.check_key(&client_key(address)).map_err(|not| {
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

/// What an address is counted under: an IPv4 address itself (also when mapped into IPv6),
/// an IPv6 address by its /64 network.
pub fn client_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// The window in which an address's wrong enrollment secrets are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Networks tracked before expired windows are first swept out; each sweep sets the next at
/// twice what it left (at least this), so sweeping costs O(1) a failure however many there are.
const SWEEP_AT: usize = 65_536;
/// The most networks the guard tracks (about 16 MB); past it, networks not yet tracked share
/// one window (keyed by the unspecified address).
pub const MAX_TRACKED: usize = 262_144;
/// The key of the shared window for networks past [`MAX_TRACKED`].
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// Wrong enrollment secrets per client network, in fixed one-minute windows.
#[derive(Debug)]
pub struct EnrollmentGuard {
    per_minute: u32,
    windows: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    by_key: HashMap<IpAddr, (Instant, u32)>,
    sweep_at: usize,
}

impl Windows {
    /// The key `address` is counted under: its [`client_key`], or [`OVERFLOW`] when the table
    /// is full and does not hold it.
    fn key(&self, address: IpAddr) -> IpAddr {
        let key = client_key(address);
        if self.by_key.len() >= MAX_TRACKED && !self.by_key.contains_key(&key) {
            OVERFLOW
        } else {
            key
        }
    }
}

impl EnrollmentGuard {
    /// A guard allowing `per_minute` wrong secrets a minute per address (0: no limit).
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            windows: Mutex::new(Windows {
                by_key: HashMap::new(),
                sweep_at: SWEEP_AT,
            }),
        }
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Networks tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.windows().by_key.len()
    }

    /// Refuses an enrollment from `address` when it has had its wrong secrets this minute
    /// (before the secret is compared).
    pub fn check(&self, metrics: &Metrics, address: Option<IpAddr>) -> Result<(), ApiError> {
        let (Some(address), n @ 1..) = (address, self.per_minute) else {
            return Ok(());
        };
        let now = Instant::now();
        let windows = self.windows();
        match windows.by_key.get(&windows.key(address)) {
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
        if windows.by_key.len() >= windows.sweep_at {
            windows
                .by_key
                .retain(|_, (start, _)| now < *start + FAILURE_WINDOW);
            windows.sweep_at = (2 * windows.by_key.len()).max(SWEEP_AT);
        }
        let key = windows.key(address);
        let entry = windows.by_key.entry(key).or_insert((now, 0));
        if now >= entry.0 + FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v6(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn an_ipv6_client_counts_by_its_64_network_and_a_mapped_ipv4_as_itself() {
        assert_eq!(
            client_key(v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            v6("2001:db8:1:2::")
        );
        assert_eq!(client_key(v6("::ffff:192.0.2.7")), v6("192.0.2.7"));
        assert_eq!(client_key(v6("192.0.2.7")), v6("192.0.2.7"));
        assert_ne!(
            client_key(v6("2001:db8:1:2::1")),
            client_key(v6("2001:db8:1:3::1"))
        );
    }

    /// An attacker cycling through the addresses of its /64 is refused after its failures,
    /// like one address; another network is not.
    #[test]
    fn rotating_ipv6_addresses_does_not_escape_the_enrollment_limit() {
        let metrics = Metrics::default();
        let guard = EnrollmentGuard::new(3);
        for i in 1..=3u16 {
            let a = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, i, i, i, i));
            assert!(guard.check(&metrics, Some(a)).is_ok());
            assert_eq!(
                guard.failed(Some(a)),
                i == 1,
                "only the first failure is logged"
            );
        }
        let fresh = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        let err = guard.check(&metrics, Some(fresh)).expect_err("refused");
        assert_eq!(err.code(), ErrorCode::RateLimited);
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 1, 1, 1, 1));
        assert!(guard.check(&metrics, Some(other)).is_ok());
        // The same for an IPv4 client, whether it arrives as IPv4 or mapped into IPv6.
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        for _ in 0..3 {
            guard.failed(Some(v4));
        }
        assert!(guard.check(&metrics, Some(v6("::ffff:192.0.2.7"))).is_err());
        assert_eq!(guard.tracked(), 2);
    }

    /// A flood of networks within one minute: the table stops at its bound, and the networks
    /// past it share one window, which their failures exhaust.
    #[test]
    fn a_flood_of_networks_is_bounded_and_shares_one_window() {
        let metrics = Metrics::default();
        let guard = EnrollmentGuard::new(2);
        let net = |i: u64| IpAddr::V6(Ipv6Addr::from((u128::from(i) + 1) << 64));
        for i in 0..MAX_TRACKED as u64 + 10 {
            guard.failed(Some(net(i)));
        }
        assert_eq!(
            guard.tracked(),
            MAX_TRACKED + 1,
            "the bound and the shared window"
        );
        // Ten networks past the bound failed once each: the shared window is spent.
        let newcomer = net(MAX_TRACKED as u64 + 100);
        assert!(guard.check(&metrics, Some(newcomer)).is_err());
        // A network tracked before the flood keeps its own window (one failure of two).
        assert!(guard.check(&metrics, Some(net(0))).is_ok());
    }
}
