#!/usr/bin/env python3
"""Reference epsilons for starling-core's Rényi-DP accountant, from Google's dp-accounting.

Requires Python 3.11 and the pinned reference package (this script installs nothing):

    pip install dp-accounting==0.6.0

For every case of a grid over the sampling rate q, the noise multiplier z, the number of
steps T and delta, it composes T Poisson-subsampled Gaussian steps,
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, in dp_accounting's ``RdpAccountant`` (its
default orders, add-or-remove-one neighbouring) and records the epsilon and the optimal
order of ``get_epsilon_and_optimal_order(delta)``; and, for a few budgets (epsilon, delta,
q, T), the noise multiplier ``calibrate_dp_mechanism`` finds (under ``"plans"``). It writes
``crates/starling-core/tests/fixtures/dp_epsilon_reference.json``, committed test data that
``crates/starling-core/tests/it/privacy.rs`` checks the Rust accountant against (to within 1%
relative) and that the CLI test reads too. The output is deterministic.

Cases whose epsilon is infinite, or above ``MAX_EPSILON`` (no privacy left to speak of), are
not test cases: they are listed under ``"skipped"`` with the reason.

    python3 scripts/dp-reference.py            # rewrites the fixture
    python3 scripts/dp-reference.py --check    # compares with the committed fixture instead
"""

import argparse
import json
import math
import pathlib
import platform
import sys
from importlib import metadata

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from fixture_json import write_or_check

PINNED_VERSION = "0.6.0"
OUT = (
    pathlib.Path(__file__).resolve().parent.parent
    / "crates/starling-core/tests/fixtures/dp_epsilon_reference.json"
)

SAMPLING_RATES = [1e-3, 1e-2, 0.1, 0.5, 1.0]
NOISE_MULTIPLIERS = [0.5, 0.8, 1.0, 2.0, 5.0]
STEPS = [1, 10, 100, 1000, 10_000, 100_000]
DELTAS = [1e-5, 1e-3]
# Epsilons above this are kept out of the test cases (and listed as skipped).
MAX_EPSILON = 1e6
# Noise plans: (target epsilon, delta, sampling rate, steps), calibrated with
# dp_accounting.calibrate_dp_mechanism (tolerance 1e-6 in the noise multiplier).
PLANS = [
    (1.0, 1e-5, 0.01, 1000),
    (8.0, 1e-5, 0.001, 100_000),
    (0.5, 1e-3, 1.0, 1),
    (3.0, 1e-5, 0.1, 50),
    (2.0, 1e-5, 0.5, 10),
    (10.0, 1e-3, 0.01, 10_000),
]


def reference_epsilon(q: float, z: float, steps: int, delta: float) -> tuple[float, float]:
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
    accountant.compose(event, steps)
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def reference_noise(epsilon: float, delta: float, q: float, steps: int) -> float:
    return float(
        dp_accounting.calibrate_dp_mechanism(
            rdp_privacy_accountant.RdpAccountant,
            lambda z: dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps
            ),
            epsilon,
            delta,
        )
    )


def build() -> dict:
    version = metadata.version("dp-accounting")
    if version != PINNED_VERSION:
        sys.exit(f"dp-accounting {version} is installed; this script is pinned to {PINNED_VERSION}")
    orders = [float(a) for a in rdp_privacy_accountant.RdpAccountant().orders]
    cases, skipped = [], []
    for q in SAMPLING_RATES:
        for z in NOISE_MULTIPLIERS:
            for steps in STEPS:
                for delta in DELTAS:
                    eps, order = reference_epsilon(q, z, steps, delta)
                    case = {
                        "sampling_rate": q,
                        "noise_multiplier": z,
                        "steps": steps,
                        "delta": delta,
                    }
                    if not math.isfinite(eps):
                        skipped.append({**case, "reason": "epsilon is infinite"})
                    elif eps > MAX_EPSILON:
                        skipped.append({**case, "reason": f"epsilon {eps:.6g} > {MAX_EPSILON:g}"})
                    else:
                        cases.append({**case, "epsilon": eps, "order": order})
    return {
        "generator": "scripts/dp-reference.py",
        "package": "dp-accounting",
        "version": version,
        "python": platform.python_version(),
        "accountant": "dp_accounting.rdp.RdpAccountant() (default orders, ADD_OR_REMOVE_ONE): "
        "compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps), "
        "get_epsilon_and_optimal_order(delta)",
        "orders": orders,
        "cases": cases,
        "skipped": skipped,
        "plans": [
            {
                "epsilon": eps,
                "delta": delta,
                "sampling_rate": q,
                "steps": steps,
                "noise_multiplier": reference_noise(eps, delta, q, steps),
            }
            for eps, delta, q, steps in PLANS
        ],
    }


def main() -> None:
    data = write_or_check(__doc__.splitlines()[0], OUT, build)
    print(f"{OUT}: {len(data['cases'])} cases, {len(data['skipped'])} skipped")


if __name__ == "__main__":
    main()
