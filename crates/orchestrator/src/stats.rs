//! Summary statistics over cycles: mean, sample standard deviation and the
//! half-width of the two-sided 95% confidence interval (Student's t). One
//! value has no spread to speak of: its deviation and interval are
//! undefined, and absent rather than a 0 that would read as certainty.

use berth_proto::common::v1::MetricSummary;

/// t(0.975, df) for df = 1..=30.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// t(0.975, df); beyond the table, interpolated in 1/df towards 1.960.
fn t_critical(df: usize) -> f64 {
    match df {
        0 => f64::NAN,
        1..=30 => T_975[df - 1],
        _ => {
            // Between df = 30 (2.042) and infinity (1.960), t is close to linear in 1/df.
            1.960 + (2.042 - 1.960) * 30.0 / df as f64
        }
    }
}

/// Mean and sample standard deviation (n - 1); no deviation below 2 values.
fn mean_and_std_dev(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, None);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, Some(variance.sqrt()))
}

/// Sample standard deviation over the absolute mean; `None` below 2 values
/// or when the mean is 0 (the ratio means nothing there).
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    let (mean, std_dev) = mean_and_std_dev(values);
    std_dev.filter(|_| mean != 0.0).map(|sd| sd / mean.abs())
}

pub fn summarize(name: &str, values: &[f64]) -> MetricSummary {
    let n = values.len();
    if n == 0 {
        return MetricSummary {
            name: name.to_string(),
            ..Default::default()
        };
    }
    let (mean, std_dev) = mean_and_std_dev(values);
    MetricSummary {
        name: name.to_string(),
        n: n as u64,
        mean,
        std_dev,
        ci95_half_width: std_dev.map(|sd| t_critical(n - 1) * sd / (n as f64).sqrt()),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_textbook_values() {
        // mean 5, sample variance 32/7 ≈ 4.571, sd ≈ 2.138; t(0.975, 7) = 2.365.
        let s = summarize("x", &[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(s.n, 8);
        assert!((s.mean - 5.0).abs() < 1e-12);
        let std_dev = s.std_dev.unwrap();
        assert!((std_dev - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert!((s.ci95_half_width.unwrap() - 2.365 * std_dev / 8f64.sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max), (2.0, 9.0));
    }

    #[test]
    fn coefficient_of_variation_is_sd_over_mean() {
        // mean 10, sample sd 1.
        let cv = coefficient_of_variation(&[9.0, 10.0, 11.0]).unwrap();
        assert!((cv - 0.1).abs() < 1e-12);
        assert_eq!(coefficient_of_variation(&[5.0, 5.0]), Some(0.0));
        assert_eq!(coefficient_of_variation(&[5.0]), None);
        assert_eq!(coefficient_of_variation(&[-1.0, 1.0]), None);
    }

    #[test]
    fn single_value_has_no_interval_and_large_df_approaches_normal() {
        // Undefined, not 0: a 0 would read as a value known exactly.
        let s = summarize("x", &[3.0]);
        assert_eq!((s.n, s.mean), (1, 3.0));
        assert_eq!((s.std_dev, s.ci95_half_width), (None, None));
        // Two equal values: a spread of 0 is measured, and so is the interval.
        let s = summarize("x", &[3.0, 3.0]);
        assert_eq!((s.std_dev, s.ci95_half_width), (Some(0.0), Some(0.0)));
        assert!((t_critical(1000) - 1.962).abs() < 0.002);
        assert!(t_critical(31) < t_critical(30));
    }
}
