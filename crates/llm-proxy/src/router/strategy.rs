//! How a deployment is chosen among the available ones of a model group:
//! what each [`Strategy`] (named in [`crate::settings`]) does.

use std::time::Instant;

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
            Self::UsageBased => {
                let now = Instant::now();
                lowest_by(candidates, rng, |d| {
                    let (requests, tokens) = d.used(now);
                    (tokens, requests)
                })
            }
            Self::CostBased => lowest_by(candidates, rng, |d| {
                // Costs are finite and not negative (checked when the config
                // is read), so their bits order as the numbers do.
                (d.config.input_cost_per_token + d.config.output_cost_per_token).to_bits()
            }),
        }
    }
}

/// The candidate with the lowest key, ties broken at random so that equal
/// deployments share the load.
fn lowest_by<'a, K: Ord>(
    candidates: &[&'a Deployment],
    rng: &mut impl Rng,
    key: impl Fn(&Deployment) -> K,
) -> &'a Deployment {
    let keys: Vec<K> = candidates.iter().map(|d| key(d)).collect();
    let Some(best) = keys.iter().min() else {
        return candidates[0];
    };
    let ties: Vec<&'a Deployment> = candidates
        .iter()
        .zip(&keys)
        .filter(|(_, k)| *k == best)
        .map(|(d, _)| *d)
        .collect();
    ties[rng.random_range(0..ties.len())]
}
