//! How a deployment is chosen among the available ones of a model group.
//! The names are LiteLLM's `router_settings.routing_strategy` values.

use rand::Rng;

use super::Deployment;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Random, weighted by `weight` (else `rpm`).
    #[default]
    SimpleShuffle,
    /// Fewest requests in flight.
    LeastBusy,
    /// Lowest recent time to first byte; deployments never measured first.
    LatencyBased,
}

impl Strategy {
    /// The strategy a LiteLLM `routing_strategy` names. `lowest-latency` is
    /// what the strategy is called in prose (and in berth's own docs); LiteLLM
    /// spells it `latency-based-routing`, so both are accepted.
    pub fn from_litellm(name: &str) -> Option<Self> {
        match name {
            "simple-shuffle" => Some(Self::SimpleShuffle),
            "least-busy" => Some(Self::LeastBusy),
            "latency-based-routing" | "lowest-latency" => Some(Self::LatencyBased),
            _ => None,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litellm_names_and_the_lowest_latency_alias() {
        for (name, strategy) in [
            ("simple-shuffle", Strategy::SimpleShuffle),
            ("least-busy", Strategy::LeastBusy),
            ("latency-based-routing", Strategy::LatencyBased),
            ("lowest-latency", Strategy::LatencyBased),
        ] {
            assert_eq!(Strategy::from_litellm(name), Some(strategy), "{name}");
        }
        // Known to LiteLLM, not served here: reported, not guessed at.
        for name in [
            "usage-based-routing",
            "usage-based-routing-v2",
            "cost-based-routing",
        ] {
            assert_eq!(Strategy::from_litellm(name), None, "{name}");
        }
    }
}
