//! Pollen's own sine, cosine and power, in f64 and plain IEEE operations (no
//! calls into the C library, no fused multiply-adds: Rust never contracts
//! `a * b + c`), for the non-exact modes' rope tables. The C library's
//! `sinf` and `cosf` differ between C libraries (musl's give other bits than
//! glibc's for 1–2% of a rope table's values), and a mode's name must
//! mean the same bits on every platform; these give the same bits
//! everywhere. Each is within a few units in the last place of an f64, so the
//! f32 a table keeps is the correctly rounded value but where the true value
//! lies within ~1e-15 (relative) of halfway between two f32s.
//!
//! Exact mode keeps candle's tables (the C library's functions), so that it
//! stays bit-identical to candle-transformers on the same machine.

/// 1.5 × 2^52: adding it rounds an f64 below 2^51 in magnitude to an
/// integer, ties to even.
const ROUND: f64 = 6_755_399_441_055_744.0;

/// π/2 in three parts, the first two of 33 significant bits, so that `n`
/// times either is exact for `|n| < 2^20` (angles below ~1.6 million).
const PIO2_1: f64 = 1.570_796_326_734_125_6;
const PIO2_2: f64 = 6.077_100_506_303_966e-11;
const PIO2_3: f64 = 2.022_266_248_795_950_6e-21;

/// ln 2 in two parts, the first of 33 significant bits.
const LN2_HI: f64 = 0.693_147_180_601_954_5;
const LN2_LO: f64 = -4.200_915_072_681_084_6e-11;

/// The sine's Taylor coefficients from `1/17!` down to `−1/3!`.
const SIN: [f64; 8] = [
    1.0 / 355_687_428_096_000.0,
    -1.0 / 1_307_674_368_000.0,
    1.0 / 6_227_020_800.0,
    -1.0 / 39_916_800.0,
    1.0 / 362_880.0,
    -1.0 / 5_040.0,
    1.0 / 120.0,
    -1.0 / 6.0,
];

/// The cosine's Taylor coefficients from `−1/18!` down to `−1/2!`.
const COS: [f64; 9] = [
    -1.0 / 6_402_373_705_728_000.0,
    1.0 / 20_922_789_888_000.0,
    -1.0 / 87_178_291_200.0,
    1.0 / 479_001_600.0,
    -1.0 / 3_628_800.0,
    1.0 / 40_320.0,
    -1.0 / 720.0,
    1.0 / 24.0,
    -0.5,
];

/// `c[0] z^(n−1) + … + c[n−1]`, by Horner's rule: `p = p z + c` from the
/// first coefficient on.
fn horner(z: f64, c: &[f64]) -> f64 {
    c[1..].iter().fold(c[0], |p, &c| p * z + c)
}

/// `(sin x, cos x)`: `x = n π/2 + r` with `n` the nearest integer to
/// `x · 2/π` and `|r| ≤ π/4` (Cody and Waite's three-part reduction), then
/// Taylor polynomials of `r` to degree 17 (sine) and 18 (cosine), whose
/// truncation errors are below 1e-19 there, and the quadrant from `n mod 4`.
/// Accurate to a few f64 ulps for `|x|` below ~1.6 million (past that, `n`
/// times the first two parts rounds and the result loses accuracy, never its
/// determinism). Not for NaN or infinite `x`.
pub(crate) fn sin_cos(x: f64) -> (f64, f64) {
    let n = (x * std::f64::consts::FRAC_2_PI + ROUND) - ROUND;
    let r = ((x - n * PIO2_1) - n * PIO2_2) - n * PIO2_3;
    let z = r * r;
    // sin r = r + r z (−1/3! + z (1/5! − …)); cos r = 1 + z (−1/2! + z (1/4! − …)).
    let sin = r + r * z * horner(z, &SIN);
    let cos = 1.0 + z * horner(z, &COS);
    // Two's complement: n ≡ 3 (mod 4) for n = −1 as for n = 3.
    match (n as i64) & 3 {
        0 => (sin, cos),
        1 => (cos, -sin),
        2 => (-sin, -cos),
        _ => (-cos, sin),
    }
}

/// `ln x` for a positive, finite, normal `x`: `x = 2^k m` with `m` in
/// [√2/2, √2), then `ln m = 2 atanh s` with `s = (m − 1)/(m + 1)`, `|s| <
/// 0.172`, summed to `s^41` (the next term is below 1e-33).
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut k = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        k += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut sum = 0.0;
    let mut odd = 41.0;
    while odd > 1.0 {
        sum = (sum + 1.0 / odd) * z;
        odd -= 2.0;
    }
    let k = k as f64;
    // k ln 2 in two parts: k · LN2_HI is exact for |k| < 2^20.
    k * LN2_HI + (2.0 * (s + s * sum) + k * LN2_LO)
}

/// `e^y` for `|y|` below 700: `y = k ln 2 + r` with `|r| ≤ ln 2 / 2`, a
/// Taylor polynomial of `r` to degree 18 (the next term is below 1e-25),
/// times `2^k` built in the exponent bits.
fn exp(y: f64) -> f64 {
    let k = (y * std::f64::consts::LOG2_E + ROUND) - ROUND;
    let r = (y - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0;
    let mut i = 18.0;
    while i >= 1.0 {
        p = 1.0 + p * r / i;
        i -= 1.0;
    }
    p * f64::from_bits(((k as i64 + 1023) as u64) << 52)
}

/// `base^e` for a positive, finite, normal `base` and a result well inside
/// f64's range (a rope frequency's `theta^(i/d)`): `e^(e ln base)`.
pub(crate) fn pow(base: f64, e: f64) -> f64 {
    exp(e * ln(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within `ulps` units in the last place of `want` (of 1 for sines and
    /// cosines near 0).
    fn close(got: f64, want: f64, ulps: f64) -> bool {
        (got - want).abs() <= ulps * f64::EPSILON * want.abs().max(1.0)
    }

    /// Against the C library's f64 functions (accurate to an ulp), over the
    /// angles and frequencies rope tables use.
    #[test]
    fn sine_cosine_and_power_agree_with_the_c_library() {
        let mut x = 0.0f64;
        while x < 1_500_000.0 {
            let (s, c) = sin_cos(x);
            assert!(close(s, x.sin(), 4.0), "sin {x}: {s} vs {}", x.sin());
            assert!(close(c, x.cos(), 4.0), "cos {x}: {c} vs {}", x.cos());
            let (s, c) = sin_cos(-x);
            assert!(close(s, -x.sin(), 4.0) && close(c, x.cos(), 4.0), "-{x}");
            x = x * 1.001 + 0.0137;
        }
        for base in [10_000.0, 100_000.0, 500_000.0, 1_000_000.0, 2.5, 1.0e-3] {
            for i in 0..=64 {
                let e = f64::from(i) / 64.0;
                let (got, want) = (pow(base, e), base.powf(e));
                assert!(close(got, want, 8.0), "{base}^{e}: {got} vs {want}");
                let (got, want) = (pow(base, -e), base.powf(-e));
                assert!(close(got, want, 8.0), "{base}^-{e}: {got} vs {want}");
            }
        }
        for y in [-40.0, -10.5, -1.0, -1e-9, 0.0, 0.3, 1.0, 7.25, 40.0] {
            assert!(close(exp(y), f64::exp(y), 4.0), "exp {y}");
        }
        for x in [1e-300, 0.5, 1.0, 1.5, 2.0, 3.0, 1e4, 1e300] {
            assert!((ln(x) - x.ln()).abs() <= 4.0 * f64::EPSILON * x.ln().abs().max(1.0));
        }
    }
}
