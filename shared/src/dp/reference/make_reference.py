"""Reference values for fedward's DP tests, computed with independent code.

Run from this directory with a venv holding the pinned packages:

    python3 -m venv /tmp/dpvenv
    /tmp/dpvenv/bin/pip install dp-accounting==0.6.0 mpmath==1.4.1
    /tmp/dpvenv/bin/python make_reference.py

It writes:

* rdp_reference.json: epsilons of the Poisson-sampled Gaussian mechanism from Google's
  dp-accounting RdpAccountant, once on fedward's order grid (`eps_grid`, the figure the
  Rust accountant must reproduce) and once on dp-accounting's default grid
  (`eps_default`, which a finer grid can only improve on).
* normal_reference.json: the standard normal quantile and upper tail at 100-digit
  precision (mpmath), for the noise sampler's accuracy and exactness tests.
"""

import importlib.metadata
import json
import math

import dp_accounting
import mpmath
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp


def fedward_orders():
    """Must match `rdp::orders()` in shared/src/dp/rdp.rs."""
    orders = [1.0 + x / 100.0 for x in range(1, 100)]
    orders += [2.0 + x / 20.0 for x in range(0, 160)]
    orders += [10.0 + x / 4.0 for x in range(0, 216)]
    orders += [float(a) for a in range(64, 257)]
    orders += [256.0 + 16.0 * x for x in range(1, 49)]
    return orders


def rdp_cases():
    cases = []
    for q in [1.0, 0.2, 0.1, 0.05, 0.01, 0.001]:
        for sigma in [0.6, 0.8, 1.0, 1.5, 3.0]:
            grid = rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, fedward_orders())
            default = rdp._compute_rdp_poisson_subsampled_gaussian(
                q, sigma, rdp.DEFAULT_RDP_ORDERS)
            for steps in [1, 10, 100, 1000, 10000]:
                for delta in [1e-5, 1e-6]:
                    eps_grid, order_grid = rdp.compute_epsilon(
                        fedward_orders(), grid * steps, delta)
                    eps_def, order_def = rdp.compute_epsilon(
                        rdp.DEFAULT_RDP_ORDERS, default * steps, delta)
                    # Cross-check the public accountant API on the default grid.
                    acc = rdp.RdpAccountant()
                    acc.compose(dp_event.PoissonSampledDpEvent(
                        q, dp_event.GaussianDpEvent(sigma)), steps)
                    assert math.isclose(acc.get_epsilon(delta), eps_def, rel_tol=1e-12)
                    cases.append({
                        "q": q, "sigma": sigma, "steps": steps, "delta": delta,
                        "eps_grid": float(eps_grid), "order_grid": float(order_grid),
                        "eps_default": float(eps_def), "order_default": float(order_def),
                    })
    return cases


def normal_cases():
    mpmath.mp.dps = 100
    out = []
    # Quantiles of u in (0, 1/2]: a log-spaced sweep into the far tail plus a linear
    # sweep over the body.
    us = [2.0 ** -e for e in range(1, 1001, 7)]
    us += [i / 256.0 for i in range(1, 128)]
    us += [0.075, 0.0749999999, 0.0750000001, 0.4999999]
    for u in us:
        mu = mpmath.mpf(u)
        if u > 0.01:
            z = mpmath.sqrt(2) * mpmath.erfinv(2 * mu - 1)
        else:
            # erfinv(2u - 1) loses the tail to cancellation; solve ln Phi(z) = ln u instead.
            z = mpmath.findroot(lambda t: mpmath.log(mpmath.ncdf(t)) - mpmath.log(mu),
                                -math.sqrt(-2 * math.log(u)))
        assert abs(mpmath.ncdf(z) / mu - 1) < mpmath.mpf(10) ** -40, u
        out.append({"u": u.hex(), "z": mpmath.nstr(z, 30)})
    # Upper tails Q(w) = P(Z > w) at dyadic points, as log2 and as a 40-digit mantissa.
    tails = []
    for w in [0.0, 2.0 ** -20, 0.5, 1.0, 1.25, 2.0, 3.0, 4.5, 6.0, 8.0, 12.0, 20.0, 30.0, 37.5]:
        qv = mpmath.ncdf(-mpmath.mpf(w))
        tails.append({"w": w.hex(), "q": mpmath.nstr(qv, 40), "log2_q": float(mpmath.log(qv, 2))})
    return {"quantiles": out, "tails": tails}


def main():
    with open("rdp_reference.json", "w") as f:
        json.dump({
            "generator": "dp-accounting " + importlib.metadata.version("dp-accounting"),
            "orders": fedward_orders(),
            "cases": rdp_cases(),
        }, f, indent=1)
        f.write("\n")
    with open("normal_reference.json", "w") as f:
        json.dump({"generator": "mpmath " + mpmath.__version__, **normal_cases()}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
