#!/usr/bin/env python3
"""Reference numbers for starling-core's distributed-DP accounting (privacy/skellam.rs).

Requires Python 3.11 and the pinned reference packages (this script installs nothing):

    pip install dp-accounting==0.6.0 scipy==1.17.1

It writes ``crates/starling-core/tests/fixtures/skellam_reference.json``, committed test data
that ``crates/starling-core/tests/it/privacy.rs`` checks the Rust code against:

- ``"divergences"``: the exact Rényi divergence D_α(Sk(μ) + v ‖ Sk(μ)) of the Skellam
  distribution shifted by an integer vector v (coordinates independent, so the divergence is
  the sum over coordinates), computed from the Skellam pmf e^(-2μ) I_|k|(2μ) (scipy's Bessel ``ive``) by summing the pmf over
  a range of ±40 standard deviations. The Skellam mechanism's RDP bound (Agarwal et al. 2021)
  for sensitivities ‖v‖₂, ‖v‖₁ and variance 2μ must be at least this, and close to it.
- ``"subsampled_gaussian"``: dp-accounting's RDP of one step of the Poisson-subsampled
  Gaussian mechanism at integer orders. Zhu and Wang 2019's bound with every factor 3
  replaced by 1 (their Theorem 6) is exact for the Gaussian mechanism, so the Rust sum
  (``poisson_subsampled_rdp(.., tight = true)``) over the Gaussian's RDP must equal it; the
  general bound Starling uses (factor 3) must be at least it.

    python3 scripts/skellam-reference.py            # rewrites the fixture
    python3 scripts/skellam-reference.py --check    # compares with the committed fixture
"""

import argparse
import json
import pathlib
import platform
import sys
from importlib import metadata

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

from fixture_json import write_or_check

OUT = (
    pathlib.Path(__file__).resolve().parent.parent
    / "crates/starling-core/tests/fixtures/skellam_reference.json"
)

# (μ of the total noise Sk(μ), shift vector, orders)
DIVERGENCE_CASES = [
    (mu, shift, [2, 3, 5, 10, 32])
    for mu in [20.0, 200.0, 2_000.0, 50_000.0]
    for shift in [[1], [3], [10], [1, 1, 1, 1], [5, 2, 1], [30, 10]]
]
# (q, z, orders)
SUBSAMPLED_CASES = [
    (q, z, [2, 3, 4, 8, 16, 32, 64])
    for q in [1e-3, 1e-2, 0.1, 0.5]
    for z in [0.5, 1.0, 2.0, 5.0]
]


def skellam_logpmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P(Sk(μ, μ) = k) = log(e^(-2μ) I_|k|(2μ)), from scipy's exponentially scaled Bessel
    function ``ive`` (``stats.skellam.logpmf`` loses all precision in the tails at large μ)."""
    return np.log(special.ive(np.abs(k), 2 * mu))


def skellam_divergence(mu: float, shift: list[int], order: float) -> float:
    """D_α(Sk(μ) + shift ‖ Sk(μ)) summed over the coordinates."""
    sd = np.sqrt(2 * mu)
    total = 0.0
    for s in shift:
        span = int(40 * sd) + abs(s) + 10
        k = np.arange(-span, span + 1)
        with np.errstate(divide="ignore"):
            log_p = skellam_logpmf(k - s, mu)
            log_q = skellam_logpmf(k, mu)
        # Far in the tails the pmf underflows to 0: such terms add nothing (p^α q^(1-α)
        # with both below 1e-300 is far below the sum's rounding).
        finite = np.isfinite(log_p) & np.isfinite(log_q)
        log_terms = order * log_p[finite] + (1 - order) * log_q[finite]
        total += special.logsumexp(log_terms) / (order - 1)
    return float(total)


def subsampled_gaussian_rdp(q: float, z: float, orders: list[int]) -> list[float]:
    accountant = rdp_privacy_accountant.RdpAccountant(orders=[float(a) for a in orders])
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), 1)
    return [float(r) for r in accountant._rdp]


def build() -> dict:
    divergences = []
    for mu, shift, orders in DIVERGENCE_CASES:
        for a in orders:
            divergences.append(
                {"mu": mu, "shift": shift, "order": a, "divergence": skellam_divergence(mu, shift, a)}
            )
    subsampled = []
    for q, z, orders in SUBSAMPLED_CASES:
        for a, r in zip(orders, subsampled_gaussian_rdp(q, z, orders)):
            subsampled.append({"q": q, "z": z, "order": a, "rdp": r})
    return {
        "generator": "scripts/skellam-reference.py",
        "dp_accounting": metadata.version("dp-accounting"),
        "scipy": metadata.version("scipy"),
        "python": platform.python_version(),
        "divergences": divergences,
        "subsampled_gaussian": subsampled,
    }


def main() -> None:
    data = write_or_check(__doc__.splitlines()[0], OUT, build)
    print(f"{OUT}: {len(data['divergences'])} divergences, {len(data['subsampled_gaussian'])} sampled")


if __name__ == "__main__":
    main()
