//! How a deployment is chosen among the available ones of a model group:
//! what each [`Strategy`] (named in [`crate::settings`]) does.

use rand::Rng;

use super::{Deployment, Strategy};

impl Strategy {
    /// Picks one of `candidates` (never empty).
    pub(super) fn pick<'a>(
        self,
        candidates: &[&'a Deployment],
        rng: &mut impl Rng,
    ) -> &'a Deployment {
        match self {
            Self::SimpleShuffle => {
                let total: f64 = candidates.iter().map(|d| d.config.weight).sum();
                let mut point = rng.random_range(0.0..total);
                for deployment in candidates {
                    if point < deployment.config.weight {
                        return deployment;
                    }
                    point -= deployment.config.weight;
                }
                candidates[candidates.len() - 1]
            }
            Self::LeastBusy => lowest_by(candidates, rng, |d| d.in_flight()),
            Self::LatencyBased => lowest_by(candidates, rng, |d| d.latency_micros()),
        }
    }
}

/// The candidate with the lowest key, ties broken at random so that equal
/// deployments share the load.
fn lowest_by<'a>(
    candidates: &[&'a Deployment],
    rng: &mut impl Rng,
    key: impl Fn(&Deployment) -> u64,
) -> &'a Deployment {
    let best = candidates.iter().map(|d| key(d)).min().unwrap_or(0);
    let ties: Vec<_> = candidates.iter().filter(|d| key(d) == best).collect();
    ties[rng.random_range(0..ties.len())]
}
