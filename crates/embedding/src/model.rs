//! Loading ONNX Runtime and a model's files, and running one batch of texts
//! through one session: tokenize, encode, pool. Normalising is the caller's
//! choice, per request.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fastembed::{
    InitOptionsUserDefined, OutputKey, Pooling, TextEmbedding, TokenizerFiles,
    UserDefinedEmbeddingModel,
};

use crate::EmbeddingError;
use crate::config::{ModelSource, OrtLibrary, PoolingKind};

/// Which output holds the token vectors: the only one, else the usual names.
const TOKEN_OUTPUTS: &[OutputKey] = &[
    OutputKey::OnlyOne,
    OutputKey::ByName("last_hidden_state"),
    OutputKey::ByName("token_embeddings"),
];

/// Texts per ONNX Runtime run inside one batch. Texts are sorted by length
/// first, so each run pads only to its own longest text (what
/// sentence-transformers does with its batches of 32). 32 was the fastest
/// run size for short sentences on one thread (8 to 128 tried: 128 is ~10%
/// slower, its activations no longer fit the caches).
const RUN_SIZE: usize = 32;

/// A text's vector before normalisation, and the tokens read for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    pub vector: Vec<f32>,
    pub tokens: u32,
}

/// What ListModels tells about a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub dimension: usize,
    pub max_tokens: usize,
}

/// Loads ONNX Runtime's library, once per process. A library that is
/// missing and was not asked for by name leaves the service unavailable; one
/// that exists but does not load (not a library, version below 1.24) fails.
/// ort keeps the first library for the life of the process, so a later call
/// naming another one (a second service in the same process) fails too,
/// rather than silently running on the first.
pub fn load_runtime(library: &OrtLibrary) -> Result<(), EmbeddingError> {
    static LOADED: OnceLock<PathBuf> = OnceLock::new();
    let path = &library.path;
    if !library.required && !path.exists() {
        return Err(EmbeddingError::Unavailable {
            model: "(all)".into(),
            reason: format!("the ONNX Runtime library {} is missing", path.display()),
        });
    }
    let fail = |reason: String| EmbeddingError::Load {
        what: "ONNX Runtime library",
        path: path.clone(),
        reason,
    };
    let canonical = path.canonicalize().map_err(|e| fail(e.to_string()))?;
    if let Some(loaded) = LOADED.get() {
        return if *loaded == canonical {
            Ok(())
        } else {
            Err(fail(format!(
                "this process already runs ONNX Runtime from {}",
                loaded.display()
            )))
        };
    }
    ort::init_from(&canonical)
        .map(drop)
        .map_err(|e| fail(e.to_string()))?;
    // Services start one after another, so two first calls do not race.
    let _ = LOADED.set(canonical);
    Ok(())
}

/// A model's files, read once, from which its sessions are made.
pub struct ModelFiles {
    source: ModelSource,
    onnx: Vec<u8>,
    tokenizer: TokenizerFiles,
}

impl ModelFiles {
    pub fn read(source: &ModelSource) -> Result<Self, EmbeddingError> {
        let read = |name: &str| {
            let path = source.dir.join(name);
            std::fs::read(&path).map_err(|e| EmbeddingError::Load {
                what: "model file",
                path,
                reason: e.to_string(),
            })
        };
        Ok(Self {
            source: source.clone(),
            onnx: read("model.onnx")?,
            tokenizer: TokenizerFiles {
                tokenizer_file: read("tokenizer.json")?,
                config_file: read("config.json")?,
                special_tokens_map_file: read("special_tokens_map.json")?,
                tokenizer_config_file: read("tokenizer_config.json")?,
            },
        })
    }

    /// A new session with `threads` threads, and the model's description
    /// (the dimension is that of a first vector). That first embedding also
    /// makes ONNX Runtime do its first-run setup now rather than in a request.
    pub fn session(&self, threads: usize) -> Result<(Session, ModelInfo), EmbeddingError> {
        let spec = &self.source.spec;
        let fail = |reason: String| EmbeddingError::Load {
            what: "model",
            path: self.source.dir.clone(),
            reason,
        };
        let pooling = match spec.pooling {
            PoolingKind::Mean => Pooling::Mean,
            PoolingKind::Cls => Pooling::Cls,
        };
        let model = UserDefinedEmbeddingModel::new(self.onnx.clone(), self.tokenizer.clone())
            .with_pooling(pooling.clone());
        let options = InitOptionsUserDefined::new()
            .with_max_length(spec.max_tokens)
            .with_intra_threads(threads);
        let embedding = TextEmbedding::try_new_from_user_defined(model, options)
            .map_err(|e| fail(e.to_string()))?;
        let mut session = Session { embedding, pooling };
        let first = session
            .embed(&["warm-up"])
            .map_err(|e| fail(e.to_string()))?;
        let info = ModelInfo {
            name: spec.name.clone(),
            dimension: first[0].vector.len(),
            max_tokens: spec.max_tokens,
        };
        Ok((session, info))
    }
}

/// One ONNX Runtime session of a model with its tokenizer; runs one batch at a time.
pub struct Session {
    embedding: TextEmbedding,
    pooling: Pooling,
}

impl Session {
    /// The tokenizer its batches are read with, to count a request's tokens
    /// before it is queued (`cost.rs`).
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.embedding.tokenizer
    }

    /// Times one text of `max_tokens` tokens: the first measure of the
    /// model's rate (`cost::Throughput`), taken at load so that no request
    /// is judged on a guessed one. Call it after the warm-up, whose
    /// first-run setup would make the rate look slower than it is.
    pub fn time_a_full_text(
        &mut self,
        max_tokens: usize,
    ) -> Result<(u64, Duration), EmbeddingError> {
        let text = "a ".repeat(max_tokens);
        let started = Instant::now();
        let pooled = self.embed(&[text])?;
        Ok((
            pooled.iter().map(|p| u64::from(p.tokens)).sum(),
            started.elapsed(),
        ))
    }

    /// Embeds `texts` (in their order) without normalising.
    pub fn embed<S: AsRef<str> + Send + Sync>(
        &mut self,
        texts: &[S],
    ) -> Result<Vec<Pooled>, EmbeddingError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].as_ref().len());
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i].as_ref()).collect();
        let inference = |e: fastembed::Error| EmbeddingError::Inference(e.to_string());
        let output = self
            .embedding
            .transform(&sorted, Some(RUN_SIZE))
            .map_err(inference)?;
        let mut pooled = Vec::with_capacity(texts.len());
        for run in output.into_raw() {
            let vectors = run
                .select_and_pool_output(&TOKEN_OUTPUTS, Some(self.pooling.clone()))
                .map_err(inference)?;
            let tokens = run.attention_mask_array.rows().into_iter().map(|mask| {
                u32::try_from(mask.iter().filter(|&&m| m != 0).count()).unwrap_or(u32::MAX)
            });
            for (vector, tokens) in vectors.rows().into_iter().zip(tokens) {
                pooled.push(Pooled {
                    vector: vector.to_vec(),
                    tokens,
                });
            }
        }
        if pooled.len() != texts.len() {
            return Err(EmbeddingError::Inference(format!(
                "{} vectors for {} texts",
                pooled.len(),
                texts.len()
            )));
        }
        // Back to the request's order.
        let mut out = vec![None; texts.len()];
        for (slot, item) in order.into_iter().zip(pooled) {
            out[slot] = Some(item);
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// L2-normalises in place, as sentence-transformers' Normalize module does
/// (a zero vector stays zero).
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    for x in vector {
        *x /= norm;
    }
}
