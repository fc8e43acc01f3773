//! Usage recorded per request: tokens and cost into the metrics, and into
//! the virtual key that made the request (its spend, its tokens per minute).

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::ProxyError;
use crate::keys::KeyLease;
use crate::litellm_config::DeploymentConfig;
use crate::metrics::{DeploymentLabels, ModelLabels, ProxyMetrics, RequestLabels, TokenLabels};

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

impl Usage {
    /// Saturating: the counts are the upstream's word, and an absurd one
    /// must not wrap a key's or a deployment's token window back to zero.
    pub fn total(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens.saturating_add(self.completion_tokens))
    }

    pub fn cost(&self, deployment: &DeploymentConfig) -> f64 {
        self.prompt_tokens as f64 * deployment.input_cost_per_token
            + self.completion_tokens as f64 * deployment.output_cost_per_token
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Failed for good (after retries and fallbacks), or broke mid-stream.
    Failed,
    /// The client went away before the end.
    Abandoned,
    /// Answered from the response cache: no upstream, no tokens, no spend.
    CacheHit,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
            Self::CacheHit => "cache_hit",
        }
    }
}

/// Measures one client request from admission to its end; whoever ends it
/// calls [`finish`](Self::finish) once. A meter dropped unfinished (the
/// client went away before any answer) counts the request as abandoned, and
/// the in-flight gauge goes down however the request ends.
#[derive(Debug)]
pub struct Meter {
    metrics: Arc<ProxyMetrics>,
    model: String,
    key: Option<KeyLease>,
    started: Instant,
    finished: bool,
}

impl Meter {
    pub fn new(metrics: Arc<ProxyMetrics>, model: String, key: Option<KeyLease>) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics,
            model,
            key,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Reserves the most an attempt on `deployment` can cost from the key's
    /// budget ([`KeyLease::reserve`]); `worst` is only asked for when the
    /// key has a budget.
    pub fn reserve(
        &mut self,
        deployment: &DeploymentConfig,
        worst: impl FnOnce() -> Option<f64>,
    ) -> Result<(), ProxyError> {
        match &mut self.key {
            Some(key) => key.reserve(&deployment.id, worst),
            None => Ok(()),
        }
    }

    /// Records a failed attempt on a deployment (the request may still
    /// succeed elsewhere), and gives back what it reserved.
    pub fn attempt_failed(&mut self, deployment: &DeploymentConfig) {
        if let Some(key) = &mut self.key {
            key.release();
        }
        self.metrics
            .upstream_failures
            .get_or_create(&DeploymentLabels {
                deployment: deployment.id.clone(),
            })
            .inc();
    }

    pub fn finish(
        mut self,
        deployment: Option<&DeploymentConfig>,
        usage: Option<Usage>,
        outcome: Outcome,
    ) {
        self.finished = true;
        self.record(deployment, usage, outcome);
    }

    fn record(
        &mut self,
        deployment: Option<&DeploymentConfig>,
        usage: Option<Usage>,
        outcome: Outcome,
    ) {
        let model = &self.model;
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                outcome: outcome.label(),
            })
            .inc();
        self.metrics
            .seconds
            .get_or_create(&ModelLabels {
                model: model.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
        let Some(usage) = usage else {
            return;
        };
        let cost = deployment.map_or(0.0, |d| usage.cost(d));
        for (kind, count) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.metrics
                .tokens
                .get_or_create(&TokenLabels {
                    model: model.clone(),
                    kind,
                })
                .inc_by(count);
        }
        if cost > 0.0 {
            self.metrics
                .spend
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .inc_by(cost);
        }
        if let Some(key) = &mut self.key {
            key.charge(&usage, cost);
        }
        tracing::debug!(%model, deployment = deployment.map(|d| d.id.as_str()), prompt = usage.prompt_tokens, completion = usage.completion_tokens, cost, "usage");
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.finished {
            self.record(None, None, Outcome::Abandoned);
        }
        self.metrics.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `sse` fuzz target: a usage of u64::MAX prompt tokens
    /// overflowed the total (a panic in a debug build, a wrap to a small
    /// count that escapes the tpm limits in a release one).
    #[test]
    fn absurd_token_counts_saturate() {
        let usage = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: 7,
            total_tokens: 0,
        };
        assert_eq!(usage.total(), u64::MAX);
    }
}
