//! Log-space arithmetic and special functions for the accountants.
//!
//! Everything goes through the pure-Rust `libm` crate rather than the platform's C
//! library, so an agent and an auditor on different systems compute bit-identical
//! epsilons from the same ledger.

/// `ln(e^a + e^b)` without overflow; `-inf` is the log of zero.
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    libm::log1p(libm::exp(lo - hi)) + hi
}

/// `ln C(n, k)` for real `n` and `k` through `ln |Gamma|`, like scipy's `gammaln` form.
pub(crate) fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `ln erfc(x)`, accurate in relative terms far into the upper tail.
///
/// `libm::erfc` keeps full relative precision until it underflows near `x = 27`; beyond
/// 26 the asymptotic expansion (the one dp-accounting falls back on) is exact to double
/// precision: its first omitted term is below `x^-10 < 1e-14`.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x < 26.0 {
        libm::log(libm::erfc(x))
    } else {
        log_erfc_asymptotic(x)
    }
}

fn log_erfc_asymptotic(x: f64) -> f64 {
    {
        let x2 = x * x;
        let inv2 = 1.0 / x2;
        -0.5 * libm::log(std::f64::consts::PI) - libm::log(x) - x2 - 0.5 * inv2 + 0.625 * inv2 * inv2 - 37.0 / 24.0 * inv2 * inv2 * inv2
            + 353.0 / 64.0 * inv2 * inv2 * inv2 * inv2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_handles_zero_and_large_gaps() {
        assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
        assert_eq!(log_add(2.0, f64::NEG_INFINITY), 2.0);
        assert!((log_add(0.0, 0.0) - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(log_add(1000.0, 0.0), 1000.0);
    }

    #[test]
    fn log_comb_matches_integers_and_is_symmetric() {
        assert!((log_comb(10.0, 3.0) - (120f64).ln()).abs() < 1e-12);
        assert!((log_comb(1024.0, 1.0) - (1024f64).ln()).abs() < 1e-10);
        assert!((log_comb(7.5, 2.0) - log_comb(7.5, 5.5)).abs() < 1e-12);
    }

    #[test]
    fn log_erfc_branches_agree_where_they_meet() {
        for x in [20.0, 24.0, 26.0] {
            let direct = libm::log(libm::erfc(x));
            let series = log_erfc_asymptotic(x);
            assert!(((direct - series) / direct).abs() < 1e-14, "x={x}: {direct} vs {series}");
        }
        assert!((log_erfc(0.0)).abs() < 1e-15);
        assert!((log_erfc(-10.0) - std::f64::consts::LN_2).abs() < 1e-15);
    }
}
