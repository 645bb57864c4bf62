"""Reference epsilons of the distributed discrete Gaussian, computed with independent code.

Run from this directory with mpmath (1.3 or later):

    python3 make_distributed_reference.py

It writes distributed_reference.json: for each case, the RDP bound of Kairouz, Liu,
Steinke 2021 (Proposition 14: the three-term minimum with tau = 10 sum_{k=1}^{H-1}
exp(-2 pi^2 sigma^2 k / (k + 1))), at the sensitivity of replace-one-site adjacency after
scaling and rounding (D2 = 2 Delta2, D1 = 2 min(sqrt(d) Delta2, Delta2^2), Delta2 the
deterministic bound C scale + sqrt(d) or the conditional randomized rounding bound),
composed over the rounds and converted to epsilon on dp-accounting's default orders with
its conversion, all in 50-digit arithmetic with no slack. The Rust accountant adds a
little slack, so it must be at or slightly above these figures.
"""

import json
import pathlib

import mpmath
from mpmath import mp, mpf, sqrt, exp, log, log1p, pi, expm1

mp.dps = 50


def orders():
    return [1 + mpf(x) / 10 for x in range(1, 100)] + [mpf(a) for a in range(11, 64)] + [mpf(128), mpf(256), mpf(512), mpf(1024)]


def l2_bound(clip, scale, dim, beta):
    x = mpf(clip) * mpf(scale)
    d = mpf(dim)
    det = x + sqrt(d)
    if beta is None:
        return det
    cond = sqrt(x * x + d / 4 + sqrt(2 * log(1 / mpf(beta))) * (x + sqrt(d) / 2))
    return min(det, cond)


def tau(sigma, h):
    s2 = mpf(sigma) ** 2
    return 10 * sum(exp(-2 * pi**2 * s2 * k / (k + 1)) for k in range(1, h))


def epsilon(case):
    sigma, h, dim = mpf(case["site_sigma"]), case["min_honest"], mpf(case["dim"])
    b2 = l2_bound(case["clip"], case["scale"], case["dim"], case["beta"])
    d2 = 2 * b2
    d1 = 2 * min(sqrt(dim) * b2, b2 * b2)
    root = sqrt(h) * sigma
    a, b = d2 / root, d1 / root
    t = tau(case["site_sigma"], h)
    delta = mpf(case["delta"])
    best = mp.inf
    for alpha in orders():
        r = min(alpha * a * a / 2 + t * dim, alpha * (a * a + 2 * b * t + t * t * dim) / 2, alpha * (a + t * sqrt(dim)) ** 2 / 2)
        r *= case["rounds"]
        if delta * delta + expm1(-r) > 0:
            e = mpf(0)
        elif alpha > mpf("1.01"):
            e = r + log1p(-1 / alpha) - log(delta * alpha) / (alpha - 1)
        else:
            e = mp.inf
        best = min(best, e)
    return max(best, mpf(0))


CASES = [
    # (sites, min_honest, site_sigma, scale, clip, dim, beta, rounds, delta)
    (10, 7, 200.0, 256.0, 1.0, 10_000, None, 10, 1e-5),
    (10, 7, 200.0, 256.0, 1.0, 10_000, 0.6065306597126334, 10, 1e-5),
    (3, 1, 50.0, 64.0, 0.5, 1000, None, 1, 1e-6),
    (3, 2, 0.6, 1.0, 1.0, 100, None, 1, 1e-5),
    (8, 5, 0.75, 2.0, 1.0, 50, None, 3, 1e-5),
    (50, 40, 1.0, 4.0, 2.0, 1000, 0.1, 20, 1e-5),
    (10, 10, 5228.0, 4096.0, 1.0, 56_836, 0.6065306597126334, 10, 1e-5),
    (100, 70, 1958.25, 8192.0, 1.0, 1_000_000, 0.01, 100, 1e-7),
    (100, 70, 2.0, 2.0, 1.0, 1_000, None, 5, 1e-7),
]


def main():
    out = []
    for n, h, sigma, scale, clip, dim, beta, rounds, delta in CASES:
        case = dict(sites=n, min_honest=h, site_sigma=sigma, scale=scale, clip=clip, dim=dim, beta=beta, rounds=rounds, delta=delta)
        case["tau"] = float(tau(sigma, h))
        case["l2_bound"] = float(l2_bound(clip, scale, dim, beta))
        case["epsilon"] = float(epsilon(case))
        out.append(case)
    path = pathlib.Path(__file__).with_name("distributed_reference.json")
    path.write_text(json.dumps({"mpmath": mpmath.__version__, "cases": out}, indent=1) + "\n")
    for c in out:
        print(c)


if __name__ == "__main__":
    main()
