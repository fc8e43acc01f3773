//! Usage recorded per request: tokens and cost into the metrics, and into
//! the virtual key that made the request (its spend, its tokens per minute).

use std::sync::Arc;
use std::time::Instant;

use berth_server::ServiceError as _;
use serde::{Deserialize, Serialize};

use crate::error::ProxyError;
use crate::gen_ai::{self, OperationSpan};
use crate::keys::KeyLease;
use crate::litellm_config::DeploymentConfig;
use crate::metrics::{
    DeploymentLabels, GenAiLabels, GenAiOutcomeLabels, GenAiTokenLabels, ModelLabels, ProxyMetrics,
    RequestLabels, TokenLabels,
};
use crate::providers::Endpoint;

/// OpenAI's `usage` object: chat completions' (`prompt_tokens`,
/// `completion_tokens`), or the Responses API's (`input_tokens`,
/// `output_tokens`), read into the same counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "UsageWire")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Either API's `usage` as it is written (an answer that has both names
/// for a count is read by the chat-completions one).
#[derive(Deserialize)]
struct UsageWire {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: u64,
}

impl From<UsageWire> for Usage {
    fn from(wire: UsageWire) -> Self {
        Self {
            prompt_tokens: wire.prompt_tokens.or(wire.input_tokens).unwrap_or(0),
            completion_tokens: wire.completion_tokens.or(wire.output_tokens).unwrap_or(0),
            total_tokens: wire.total_tokens,
        }
    }
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
/// the in-flight gauge goes down however the request ends. It holds the
/// request's GenAI span, which ends with it.
#[derive(Debug)]
pub struct Meter {
    metrics: Arc<ProxyMetrics>,
    model: String,
    key: Option<KeyLease>,
    started: Instant,
    finished: bool,
    operation: &'static str,
    /// `gen_ai.provider.name` of the last deployment tried; empty before.
    provider: &'static str,
    /// A stream's first chunk was timed.
    first_chunk_seen: bool,
    span: OperationSpan,
}

impl Meter {
    pub fn new(
        metrics: Arc<ProxyMetrics>,
        endpoint: Endpoint,
        model: String,
        key: Option<KeyLease>,
    ) -> Self {
        metrics.in_flight.inc();
        let operation = gen_ai::operation_name(endpoint);
        let span = OperationSpan::start(operation, &model);
        Self {
            metrics,
            model,
            key,
            started: Instant::now(),
            finished: false,
            operation,
            provider: "",
            first_chunk_seen: false,
            span,
        }
    }

    pub fn span(&self) -> &OperationSpan {
        &self.span
    }

    /// An attempt is made on `deployment`.
    pub fn attempting(&mut self, deployment: &DeploymentConfig) {
        self.provider = gen_ai::provider_name(deployment.provider);
    }

    /// A streamed answer's first chunk arrived from the upstream.
    pub fn first_chunk(&mut self) {
        if std::mem::replace(&mut self.first_chunk_seen, true) {
            return;
        }
        let labels = self.gen_ai_labels();
        self.metrics
            .gen_ai_first_token
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
    }

    fn gen_ai_labels(&self) -> GenAiLabels {
        GenAiLabels {
            gen_ai_operation_name: self.operation,
            gen_ai_provider_name: self.provider,
            gen_ai_request_model: self.model.clone(),
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
            Some(key) => key.reserve(deployment, worst),
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
        self.record(deployment, usage, outcome, None);
    }

    /// Ends a request that failed with `error`.
    pub fn fail(
        mut self,
        deployment: Option<&DeploymentConfig>,
        usage: Option<Usage>,
        error: &ProxyError,
    ) {
        self.finished = true;
        self.record(deployment, usage, Outcome::Failed, Some(error));
    }

    fn record(
        &mut self,
        deployment: Option<&DeploymentConfig>,
        usage: Option<Usage>,
        outcome: Outcome,
        error: Option<&ProxyError>,
    ) {
        self.record_gen_ai(usage.as_ref(), outcome, error);
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

impl Meter {
    /// The GenAI span's and metrics' share of [`record`](Self::record). A
    /// cache hit is no operation on a model: only the span says it was one.
    fn record_gen_ai(&self, usage: Option<&Usage>, outcome: Outcome, error: Option<&ProxyError>) {
        let error_type = match (outcome, error) {
            (Outcome::CacheHit, _) => {
                self.span.cache_hit();
                return;
            }
            (Outcome::Ok, _) => "",
            (Outcome::Failed, Some(error)) => error.reason(),
            // The conventions' value for a failure of no known type; every
            // failure the gateway sees ends with `fail`, which names it.
            (Outcome::Failed, None) => "_OTHER",
            (Outcome::Abandoned, _) => "cancelled",
        };
        if !error_type.is_empty() {
            self.span.failed(error_type);
        }
        let operation = self.gen_ai_labels();
        if let Some(usage) = usage {
            self.span.usage(usage, self.operation);
            let output = (self.operation != "embeddings").then_some(usage.completion_tokens);
            for (token_type, count) in [("input", Some(usage.prompt_tokens)), ("output", output)] {
                let Some(count) = count else { continue };
                self.metrics
                    .gen_ai_tokens
                    .get_or_create(&GenAiTokenLabels {
                        operation: operation.clone(),
                        gen_ai_token_type: token_type,
                    })
                    .observe(count as f64);
            }
        }
        self.metrics
            .gen_ai_duration
            .get_or_create(&GenAiOutcomeLabels {
                operation,
                error_type,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.finished {
            self.record(None, None, Outcome::Abandoned, None);
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
    fn usage_of_either_api_reads_the_same() {
        let chat: Usage =
            serde_json::from_str(r#"{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}"#)
                .unwrap();
        let responses: Usage = serde_json::from_str(
            r#"{"input_tokens":3,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"total_tokens":8}"#,
        )
        .unwrap();
        assert_eq!(chat, responses);
        assert_eq!(
            serde_json::from_str::<Usage>("{}").unwrap(),
            Usage::default()
        );
    }

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
