"""Reference values for fedward's DP tests, computed with independent code.

Run from this directory with a venv holding the pinned packages:

    python3 -m venv /tmp/dpvenv
    /tmp/dpvenv/bin/pip install dp-accounting==0.6.0 mpmath==1.4.1
    /tmp/dpvenv/bin/pip install --no-deps opacus==1.6.0
    /tmp/dpvenv/bin/python make_reference.py

(Opacus without its dependencies: only its pure-Python RDP analysis module is loaded, by
file path, so PyTorch is not needed.)

It writes:

* rdp_reference.json: epsilons of the Poisson-sampled Gaussian mechanism from Google's
  dp-accounting RdpAccountant on its default order grid, which fedward uses (`eps`, the
  figure the Rust accountant must reproduce), and from Opacus's RDP analysis on Opacus's
  default grid (`eps_opacus`, a second library that sums the fractional-order series with
  signs instead of dp-accounting's absolute values).
* normal_reference.json: the standard normal quantile and upper tail at 100-digit
  precision (mpmath), for the noise sampler's accuracy and exactness tests.
"""

import importlib.metadata
import json
import math

import importlib.util
import pathlib

import dp_accounting
import mpmath
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp


def fedward_orders():
    """Must match `rdp::orders()` in shared/src/dp/rdp.rs: dp-accounting's default grid."""
    return [float(a) for a in rdp.DEFAULT_RDP_ORDERS]


def opacus_rdp():
    """Opacus's RDP analysis module, loaded without the opacus package (and PyTorch)."""
    spec = importlib.util.find_spec("opacus")
    root = pathlib.Path(spec.submodule_search_locations[0])
    path = root / "accountants" / "analysis" / "rdp.py"
    mod_spec = importlib.util.spec_from_file_location("opacus_rdp", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


# Opacus's RDPAccountant.DEFAULT_ALPHAS.
OPACUS_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def rdp_cases():
    opacus = opacus_rdp()
    cases = []
    for q in [1.0, 0.5, 0.2, 0.1, 0.05, 0.01, 0.004, 0.001]:
        for sigma in [0.6, 0.8, 1.0, 1.1, 1.5, 3.0]:
            curve = rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, fedward_orders())
            for steps in [1, 10, 100, 400, 1000, 10000]:
                for delta in [1e-5, 1e-6]:
                    eps, order = rdp.compute_epsilon(fedward_orders(), curve * steps, delta)
                    # Cross-check the public accountant API (default grid).
                    acc = rdp.RdpAccountant()
                    acc.compose(dp_event.PoissonSampledDpEvent(
                        q, dp_event.GaussianDpEvent(sigma)), steps)
                    assert math.isclose(acc.get_epsilon(delta), eps, rel_tol=1e-12)
                    eps_opacus, _ = opacus.get_privacy_spent(
                        orders=OPACUS_ALPHAS,
                        rdp=opacus.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                               orders=OPACUS_ALPHAS),
                        delta=delta)
                    cases.append({
                        "q": q, "sigma": sigma, "steps": steps, "delta": delta,
                        "eps": float(eps), "order": float(order),
                        "eps_opacus": float(eps_opacus),
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
            "generator": "dp-accounting " + importlib.metadata.version("dp-accounting")
            + ", opacus " + importlib.metadata.version("opacus"),
            "orders": fedward_orders(),
            "cases": rdp_cases(),
        }, f, indent=1)
        f.write("\n")
    with open("normal_reference.json", "w") as f:
        json.dump({"generator": "mpmath " + mpmath.__version__, **normal_cases()}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
