//! The statistics of the report and of `berth compare`: a sample's mean,
//! standard deviation and 95% confidence interval (Student's t), Welch's
//! t-test between two samples, and the ratio of their means with its 95%
//! interval. Student's t distribution is computed here (the regularized
//! incomplete beta function by its continued fraction) rather than taken from
//! a crate: it is some sixty lines, and the CLI keeps its dependencies few.

/// Two-sided confidence of every interval and test here.
const CONFIDENCE: f64 = 0.95;

/// A sample's summary; the spread is absent for one value, where it is
/// undefined (one value says nothing of it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std_dev: Option<f64>,
    /// Half-width of the 95% confidence interval of the mean.
    pub ci95: Option<f64>,
}

/// The summary of `values`; `None` when there are none.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std_dev = (n > 1).then(|| {
        let squares: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
        (squares / (n - 1) as f64).sqrt()
    });
    let ci95 = std_dev
        .map(|sd| t_quantile(0.5 + CONFIDENCE / 2.0, (n - 1) as f64) * sd / (n as f64).sqrt());
    Some(Summary {
        n,
        mean,
        std_dev,
        ci95,
    })
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms: about 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let series = COEFFICIENTS[1..]
        .iter()
        .enumerate()
        .fold(COEFFICIENTS[0], |sum, (i, c)| {
            sum + c / (x + i as f64 + 1.0)
        });
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + series.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        for numerator in [
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ] {
            d = 1.0 + numerator * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + numerator / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b).
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The fraction converges fast only on its side of the mean; the other
    // side by symmetry, I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom (df may be
/// fractional, as Welch's are).
pub fn t_cdf(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return if t > 0.0 { 1.0 } else { 0.0 };
    }
    let tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t));
    if t > 0.0 { 1.0 - tail } else { tail }
}

/// The t with P(T ≤ t) = p, by bisection on [`t_cdf`] (monotonic; 200
/// halvings reach f64's resolution from any bracket used here).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if p == 0.5 {
        return 0.0;
    }
    if p < 0.5 {
        return -t_quantile(1.0 - p, df);
    }
    let mut high = 1.0;
    while t_cdf(high, df) < p && high < 1e12 {
        high *= 2.0;
    }
    let mut low = 0.0;
    for _ in 0..200 {
        let middle = (low + high) / 2.0;
        if t_cdf(middle, df) < p {
            low = middle;
        } else {
            high = middle;
        }
    }
    (low + high) / 2.0
}

/// Welch's t-test of B's mean against A's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welch {
    /// (mean B − mean A) over its standard error; infinite when neither
    /// sample varies but their means differ.
    pub t: f64,
    /// Welch–Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// Welch's test; `None` when a side has fewer than two values (no spread
/// to test against).
pub fn welch(a: &Summary, b: &Summary) -> Option<Welch> {
    let (va, vb) = (
        a.std_dev?.powi(2) / a.n as f64,
        b.std_dev?.powi(2) / b.n as f64,
    );
    let difference = b.mean - a.mean;
    let variance = va + vb;
    if variance == 0.0 {
        // Both samples constant: their means differ or they do not.
        let (t, p) = if difference == 0.0 {
            (0.0, 1.0)
        } else {
            (difference.signum() * f64::INFINITY, 0.0)
        };
        return Some(Welch {
            t,
            df: (a.n + b.n - 2) as f64,
            p,
        });
    }
    let df = variance.powi(2) / (va.powi(2) / (a.n - 1) as f64 + vb.powi(2) / (b.n - 1) as f64);
    let t = difference / variance.sqrt();
    let p = 2.0 * (1.0 - t_cdf(t.abs(), df));
    Some(Welch { t, df, p })
}

/// B's mean over A's, with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    pub ratio: f64,
    /// The interval's bounds; absent without a spread on both sides.
    pub ci95: Option<(f64, f64)>,
}

/// B/A with the delta method on the log of the ratio (its variance is the
/// sum of both sides' squared relative standard errors, with Welch's degrees
/// of freedom): the interval stays positive and is symmetric in log space,
/// as a ratio's should be. `None` when A's mean is 0 or the means' signs
/// differ (no ratio means anything there).
pub fn ratio(a: &Summary, b: &Summary) -> Option<Ratio> {
    if a.mean == 0.0 || (a.mean < 0.0) != (b.mean < 0.0) || b.mean == 0.0 {
        return None;
    }
    let ratio = b.mean / a.mean;
    let relative = |s: &Summary| Some((s.std_dev? / s.mean).powi(2) / s.n as f64);
    let ci95 = relative(a).zip(relative(b)).map(|(ra, rb)| {
        let variance = ra + rb;
        if variance == 0.0 {
            return (ratio, ratio);
        }
        let df = variance.powi(2) / (ra.powi(2) / (a.n - 1) as f64 + rb.powi(2) / (b.n - 1) as f64);
        let spread = t_quantile(0.5 + CONFIDENCE / 2.0, df) * variance.sqrt();
        (ratio * (-spread).exp(), ratio * spread.exp())
    });
    Some(Ratio { ratio, ci95 })
}

/// Whether a test's p-value says the difference is real at the report's confidence.
/// Runs on a side below which Welch's t-test is not trusted: its t
/// distribution assumes near-normal means, which two to four values cannot
/// show, so a bootstrap decides instead.
pub const FEW_RUNS: usize = 5;
/// Resamples of the bootstrap: p-values to about ±0.005 near 0.05.
const RESAMPLES: u32 = 10_000;

/// Two-sided bootstrap p-value of B's mean differing from A's (Efron and
/// Tibshirani's test of equal means, their algorithm 16.2): both samples
/// shifted to the pooled mean, so that the null holds, resampled with
/// replacement; p is the share of resamples whose difference of means is at
/// least the observed one. Seeded, so a comparison reads the same each time.
/// `None` below two values a side: one value has no spread to resample.
pub fn bootstrap_p(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let observed = (mean(b) - mean(a)).abs();
    let pooled = (mean(a) * a.len() as f64 + mean(b) * b.len() as f64) / (a.len() + b.len()) as f64;
    let shift = |v: &[f64]| -> Vec<f64> {
        let m = mean(v);
        v.iter().map(|x| x - m + pooled).collect()
    };
    let (a0, b0) = (shift(a), shift(b));
    let mut random = SplitMix64(0x9E37_79B9_7F4A_7C15);
    let mut resampled_mean = |v: &[f64]| {
        let sum: f64 = (0..v.len()).map(|_| v[random.below(v.len())]).sum();
        sum / v.len() as f64
    };
    // A relative tolerance, so that rounding in the shift does not count a
    // resample equal to the observed difference as smaller.
    let bar = observed * (1.0 - 1e-12);
    let extreme = (0..RESAMPLES)
        .filter(|_| (resampled_mean(&b0) - resampled_mean(&a0)).abs() >= bar)
        .count();
    Some((extreme as f64 + 1.0) / (f64::from(RESAMPLES) + 1.0))
}

/// SplitMix64 (Steele, Lea and Flood): enough randomness for resampling,
/// and no dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The high bits times n: unbiased enough for n far below 2^32.
        (((z >> 32) * n as u64) >> 32) as usize
    }
}

pub fn significant(p: f64) -> bool {
    p < 1.0 - CONFIDENCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_tells_a_real_difference_from_noise_with_three_runs() {
        let a = [100.0, 101.0, 99.0];
        let slower = [120.0, 121.0, 119.0];
        let p = bootstrap_p(&a, &slower).unwrap();
        assert!(significant(p), "p {p}");
        let same = [100.5, 99.0, 100.8];
        let p = bootstrap_p(&a, &same).unwrap();
        assert!(!significant(p), "p {p}");
        assert_eq!(
            bootstrap_p(&a, &same),
            Some(p),
            "seeded: the same each time"
        );
        assert_eq!(bootstrap_p(&a, &[100.0]), None, "one run");
    }

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{actual} is not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn t_quantiles_match_the_tables() {
        // Student's t table, two-sided 95%.
        for (df, t) in [
            (1.0, 12.7062),
            (2.0, 4.3027),
            (5.0, 2.5706),
            (10.0, 2.2281),
            (30.0, 2.0423),
            (1000.0, 1.9623),
        ] {
            close(t_quantile(0.975, df), t, 1e-4);
        }
        close(t_quantile(0.025, 10.0), -2.2281, 1e-4);
        close(t_quantile(0.995, 4.0), 4.6041, 1e-4);
    }

    #[test]
    fn t_cdf_matches_known_values() {
        // df = 1 is the Cauchy distribution: 1/2 + atan(t)/π.
        for t in [-3.0, -0.5, 0.0, 0.7, 5.0] {
            close(
                t_cdf(t, 1.0),
                0.5 + f64::atan(t) / std::f64::consts::PI,
                1e-12,
            );
        }
        // df = 2 has a closed form: 1/2 + t / (2 √(2 + t²)).
        for t in [-2.0, 0.3, 4.0] {
            close(t_cdf(t, 2.0), 0.5 + t / (2.0 * (2.0 + t * t).sqrt()), 1e-12);
        }
        // R: pt(2, 10); fractional df (Welch's) against Simpson's rule on the density.
        close(t_cdf(2.0, 10.0), 0.963_306, 1e-6);
        close(t_cdf(1.5, 7.5), 0.912_759_7, 1e-7);
        close(t_cdf(-2.0, 10.0), 1.0 - 0.963_306, 1e-6);
    }

    #[test]
    fn summary_has_the_student_interval_and_none_for_one_value() {
        let summary = summarize(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(summary.mean, 2.5);
        close(summary.std_dev.unwrap(), 1.290_994, 1e-6);
        // t(0.975, 3) = 3.182446; sd / √4.
        close(summary.ci95.unwrap(), 3.182_446 * 1.290_994 / 2.0, 1e-5);
        let one = summarize(&[7.0]).unwrap();
        assert_eq!((one.std_dev, one.ci95), (None, None));
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn welch_matches_the_textbook_example() {
        // Wikipedia's Welch's t-test, example 1: t = −2.46, ν ≈ 25.0, p = 0.021.
        let a1 = [
            27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7,
            21.4,
        ];
        let a2 = [
            27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5,
            24.4,
        ];
        let test = welch(&summarize(&a2).unwrap(), &summarize(&a1).unwrap()).unwrap();
        close(test.t, -2.46, 0.005);
        close(test.df, 24.99, 0.01);
        close(test.p, 0.021, 0.0005);
        assert!(significant(test.p));
    }

    #[test]
    fn welch_on_constant_samples_and_too_few_values() {
        let two = summarize(&[5.0, 5.0]).unwrap();
        let other = summarize(&[6.0, 6.0]).unwrap();
        assert_eq!(welch(&two, &two).unwrap().p, 1.0);
        assert_eq!(welch(&two, &other).unwrap().p, 0.0);
        assert_eq!(welch(&summarize(&[5.0]).unwrap(), &other), None);
    }

    #[test]
    fn ratio_interval_contains_the_ratio_and_narrows_with_more_runs() {
        let a = summarize(&[10.0, 11.0, 9.0, 10.5, 9.5]).unwrap();
        let b = summarize(&[12.0, 13.0, 11.0, 12.5, 11.5]).unwrap();
        let r = ratio(&a, &b).unwrap();
        close(r.ratio, 1.2, 1e-12);
        let (low, high) = r.ci95.unwrap();
        assert!(low < 1.2 && 1.2 < high && low > 1.0, "{r:?}");
        // Symmetric in log space.
        close((high / 1.2).ln(), (1.2 / low).ln(), 1e-12);
        let more: Vec<f64> = (0..50)
            .map(|i| [10.0, 11.0, 9.0, 10.5, 9.5][i % 5])
            .collect();
        let more_b: Vec<f64> = more.iter().map(|v| v * 1.2).collect();
        let narrow = ratio(&summarize(&more).unwrap(), &summarize(&more_b).unwrap()).unwrap();
        let (nl, nh) = narrow.ci95.unwrap();
        assert!(nh - nl < high - low);
        assert_eq!(ratio(&summarize(&[0.0, 0.0]).unwrap(), &b), None);
    }
}
