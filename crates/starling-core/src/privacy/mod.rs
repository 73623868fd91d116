//! Differential-privacy accounting: how much privacy a run of noised, subsampled rounds has
//! spent, as (ε, δ).
//!
//! - `accountant.rs`: [`RdpAccountant`], the Rényi-DP accountant of the Poisson-subsampled
//!   Gaussian mechanism (Mironov, Talwar and Zhang 2019), composed over steps and converted
//!   to (ε, δ) as Google's `dp-accounting` package does it; [`epsilon`] for a whole run at
//!   once and [`noise_multiplier_for`], the bisection that plans the noise for a budget.
//! - `skellam.rs`: [`DistributedSkellam`], distributed DP under secure aggregation: the
//!   Skellam noise each device adds in the ring and its accounting (Agarwal, Kairouz and Liu
//!   2021; Poisson subsampling by Zhu and Wang 2019's general bound), as the paper's reference
//!   code computes it.
//! - `local.rs`: [`LocalDp`], local differential privacy on the device: clip and noise the
//!   update before it leaves, and the device's own ε over its uploads.
//!
//! **Invariant:** every formula here is a published one, computed as the reference library
//! computes it (`dp_accounting/rdp/rdp_privacy_accountant.py`, version 0.6.0): the
//! integration test `tests/it/privacy.rs` holds the results to within 1% of that library's on
//! the table `scripts/dp-reference.py` generated (`tests/fixtures/dp_epsilon_reference.json`).

mod accountant;
mod local;
pub mod skellam;

pub use accountant::{
    default_orders, epsilon, epsilon_from_rdp, noise_multiplier_for, subsampled_gaussian_rdp,
    PrivacyError, RdpAccountant, NOISE_MULTIPLIER_TOLERANCE,
};
pub use local::LocalDp;
pub use skellam::DistributedSkellam;
