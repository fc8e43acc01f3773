//! The models this process serves, by name, and the one path every API
//! takes to embed: check the request against the limits and its estimated
//! cost against the CPU budget, queue it on the model's batcher, normalise
//! if asked.

use std::sync::Arc;
use std::time::Duration;

use tokenizers::Tokenizer;

use crate::EmbeddingError;
use crate::batcher::Batcher;
use crate::config::{Config, LimitsConfig};
use crate::cost::{self, Bounds, Throughput, Verdict};
use crate::metrics::Metrics;
use crate::model::{self, ModelFiles, ModelInfo};

pub struct Embedder {
    models: Vec<Model>,
    default: usize,
    limits: LimitsConfig,
    /// `server.request_cpu_budget`: the most session time a request is
    /// estimated to take (`cost.rs`).
    cpu_budget: Duration,
}

struct Model {
    name: String,
    max_tokens: usize,
    state: State,
}

enum State {
    Ready {
        info: ModelInfo,
        batcher: Batcher,
        /// A copy of the sessions' tokenizer, to count a request's tokens.
        tokenizer: Arc<Tokenizer>,
    },
    Unavailable(String),
}

/// A model as ListModels and health see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatus {
    pub name: String,
    /// 0 while the model is not loaded.
    pub dimension: usize,
    pub max_tokens: usize,
    pub default: bool,
    /// Why the model cannot serve; None when it can.
    pub unavailable: Option<String>,
}

/// Vectors of one request, in its order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub dimension: usize,
    pub tokens: u64,
}

impl Embedder {
    /// Loads ONNX Runtime and every configured model (blocking: seconds at
    /// most). See `config` for which failures stop the start.
    pub fn load(config: &Config, metrics: &Metrics) -> Result<Self, EmbeddingError> {
        config.validate()?;
        let runtime = match model::load_runtime(&config.models.ort_library()) {
            Ok(()) => None,
            Err(EmbeddingError::Unavailable { reason, .. }) => Some(reason),
            Err(error) => return Err(error),
        };
        // Each session tokenizes its own batch on its own thread, and the pool
        // has a session per core already: the tokenizer's rayon pool would
        // only add threads that compete with them for the cores (and spin
        // after each batch). TOKENIZERS_PARALLELISM set by the operator decides.
        if !tokenizers::utils::parallelism::is_parallelism_configured() {
            tokenizers::utils::parallelism::set_parallelism(false);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (sessions, threads) = config.models.pool_shape(cores);
        let mut models = Vec::new();
        for source in config.models.sources() {
            let name = source.spec.name.clone();
            let missing = source
                .missing_file()
                .map(|path| format!("model file {} is missing", path.display()));
            let state = match (runtime.clone().or(missing), source.required) {
                (Some(reason), true) => {
                    return Err(EmbeddingError::Load {
                        what: "model",
                        path: source.dir,
                        reason,
                    });
                }
                (Some(reason), false) => {
                    tracing::warn!(model = %name, %reason, "model not available; the service reports NOT_SERVING");
                    State::Unavailable(reason)
                }
                (None, _) => {
                    let started = std::time::Instant::now();
                    let files = ModelFiles::read(&source)?;
                    let (mut first, info) = files.session(threads)?;
                    let (tokens, elapsed) = first
                        .time_a_full_text(source.spec.max_tokens)
                        .map_err(|e| EmbeddingError::Load {
                            what: "model",
                            path: source.dir.clone(),
                            reason: e.to_string(),
                        })?;
                    let tokenizer = Arc::new(first.tokenizer().clone());
                    let metrics = metrics.for_model(&name);
                    let throughput =
                        Throughput::new(tokens, elapsed, metrics.tokens_per_second.clone());
                    tracing::info!(model = %name, dimension = info.dimension, sessions, threads,
                        seconds = started.elapsed().as_secs_f64(),
                        tokens_per_second = throughput.tokens_per_second(),
                        "model loaded; serving with one session while the others load");
                    let batcher =
                        Batcher::start(&name, first, config.batching.clone(), metrics, throughput);
                    // The service serves (and the cold start ends) once one
                    // session is ready. The files loaded once already, so a
                    // failure of the others is rare (memory): logged, and the
                    // model serves with the sessions it has.
                    batcher.add_later(sessions - 1, move || {
                        files.session(threads).map(|(session, _)| session)
                    });
                    State::Ready {
                        info,
                        batcher,
                        tokenizer,
                    }
                }
            };
            models.push(Model {
                name,
                max_tokens: source.spec.max_tokens,
                state,
            });
        }
        let default = models
            .iter()
            .position(|m| m.name.eq_ignore_ascii_case(&config.models.default))
            .unwrap_or(0);
        Ok(Self {
            models,
            default,
            limits: config.limits.clone(),
            cpu_budget: config.server.request_cpu_budget,
        })
    }

    /// Name of the model used when a request names none.
    pub fn default_model(&self) -> &str {
        &self.models[self.default].name
    }

    /// None when every model serves; else why one does not.
    pub fn unavailable(&self) -> Option<String> {
        self.models.iter().find_map(|m| match &m.state {
            State::Ready { .. } => None,
            State::Unavailable(reason) => Some(format!("{}: {reason}", m.name)),
        })
    }

    pub fn models(&self) -> Vec<ModelStatus> {
        self.models
            .iter()
            .enumerate()
            .map(|(i, m)| ModelStatus {
                name: m.name.clone(),
                dimension: match &m.state {
                    State::Ready { info, .. } => info.dimension,
                    State::Unavailable(_) => 0,
                },
                max_tokens: m.max_tokens,
                default: i == self.default,
                unavailable: match &m.state {
                    State::Ready { .. } => None,
                    State::Unavailable(reason) => Some(reason.clone()),
                },
            })
            .collect()
    }

    /// Embeds `texts` with `model` (empty: the default), L2-normalised
    /// unless `normalize` is false.
    pub async fn embed(
        &self,
        model: &str,
        texts: Vec<String>,
        normalize: bool,
    ) -> Result<Embedded, EmbeddingError> {
        let entry = self.find(model)?;
        self.check(&texts)?;
        let (info, batcher, tokenizer) = match &entry.state {
            State::Ready {
                info,
                batcher,
                tokenizer,
            } => (info, batcher, tokenizer),
            State::Unavailable(reason) => {
                return Err(EmbeddingError::Unavailable {
                    model: entry.name.clone(),
                    reason: reason.clone(),
                });
            }
        };
        let texts = self.within_budget(entry, batcher, tokenizer, texts).await?;
        let pooled = batcher.embed(texts).await?;
        let tokens = pooled.iter().map(|p| u64::from(p.tokens)).sum();
        let vectors = pooled
            .into_iter()
            .map(|p| {
                let mut vector = p.vector;
                if normalize {
                    model::normalize(&mut vector);
                }
                vector
            })
            .collect();
        Ok(Embedded {
            model: entry.name.clone(),
            vectors,
            dimension: info.dimension,
            tokens,
        })
    }

    fn find(&self, name: &str) -> Result<&Model, EmbeddingError> {
        if name.is_empty() {
            return Ok(&self.models[self.default]);
        }
        self.models
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| EmbeddingError::UnknownModel {
                name: name.chars().take(100).collect(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Hands `texts` back if a session takes at most the CPU budget to embed
    /// them at the model's measured rate; refuses them otherwise (`cost.rs`).
    async fn within_budget(
        &self,
        model: &Model,
        batcher: &Batcher,
        tokenizer: &Arc<Tokenizer>,
        texts: Vec<String>,
    ) -> Result<Vec<String>, EmbeddingError> {
        let rate = batcher.throughput().tokens_per_second();
        let allowance = cost::allowance(self.cpu_budget, rate);
        let max_tokens = model.max_tokens;
        let bounds: Vec<Bounds> = texts.iter().map(|t| Bounds::of(t, max_tokens)).collect();
        let (texts, verdict) = match cost::judge_by_bounds(&bounds, allowance) {
            Verdict::Undecided => {
                // Up to a few milliseconds a text: off the async workers.
                let tokenizer = tokenizer.clone();
                let counted = tokio::task::spawn_blocking(move || {
                    let verdict = cost::count_until_decided(&bounds, allowance, |i| {
                        cost::count_tokens(&tokenizer, &texts[i], max_tokens)
                    });
                    (texts, verdict)
                })
                .await;
                match counted {
                    Ok(counted) => counted,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    Err(_) => return Err(EmbeddingError::ShuttingDown),
                }
            }
            decided => (texts, decided),
        };
        match verdict {
            Verdict::Over(tokens) => Err(EmbeddingError::RequestTooCostly {
                tokens,
                tokens_per_second: rate,
                estimate: cost::session_time(tokens, rate),
                budget: self.cpu_budget,
            }),
            Verdict::Within | Verdict::Undecided => Ok(texts),
        }
    }

    fn check(&self, texts: &[String]) -> Result<(), EmbeddingError> {
        let limits = &self.limits;
        if texts.is_empty() {
            return Err(EmbeddingError::EmptyBatch);
        }
        if texts.len() > limits.max_texts {
            return Err(EmbeddingError::TooManyTexts {
                count: texts.len(),
                max: limits.max_texts,
            });
        }
        if let Some((index, text)) = texts
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > limits.max_text_bytes)
        {
            return Err(EmbeddingError::TextTooLong {
                index,
                bytes: text.len(),
                max: limits.max_text_bytes,
            });
        }
        Ok(())
    }
}
