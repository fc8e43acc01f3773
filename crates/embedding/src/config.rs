//! The service's typed config: `[server]` (shared), `[models]`, `[batching]`
//! and `[limits]`; every field also settable as `BERTH_<SECTION>__<FIELD>`.
//!
//! Which failures stop the start: a model or ONNX Runtime library that the
//! config names explicitly must load, or the process exits with the reason.
//! With nothing named (`models.list` empty, `models.ort_library` empty and no
//! `ORT_DYLIB_PATH`) the service serves all-MiniLM-L6-v2 from the model cache
//! if the setup script has put it there; if files are missing it still starts,
//! reports NOT_SERVING and answers UNAVAILABLE naming the missing file. Files
//! that exist but do not load are always a start-up error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_server::ServerConfig;
use berth_server::cli::HasServerConfig;
use serde::{Deserialize, Serialize};

/// The model served when the config lists none, and its folder in the cache.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub batching: BatchingConfig,
    pub limits: LimitsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                // The gRPC limit, as the other services set theirs. prost
                // builds a whole request before it is checked, 24 bytes per
                // 2-byte empty text: 2 MiB is 1M texts, refused in ~0.6 s
                // and +27 MiB in a debug build (16 MiB, the shared default,
                // was 8M texts: 3.8 s). 2048 texts of 1 KiB fit; larger
                // batches go in an EmbedStream, a message at a time. The
                // HTTP API has its own: limits.max_http_body_bytes.
                max_message_bytes: 2 << 20,
                ..ServerConfig::with_defaults("127.0.0.1:7703", "127.0.0.1:8891")
            },
            models: ModelsConfig::default(),
            batching: BatchingConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

impl HasServerConfig for Config {
    fn server_config(&self) -> &ServerConfig {
        &self.server
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Folder of the model files; empty: `$BERTH_MODEL_CACHE`, else
    /// `$XDG_CACHE_HOME/berth/models`, else `~/.cache/berth/models` (the
    /// setup script's rule).
    pub cache_dir: String,
    /// ONNX Runtime shared library; empty: `$ORT_DYLIB_PATH`, else
    /// `<cache_dir>/onnxruntime/libonnxruntime.so`.
    pub ort_library: String,
    /// Model of requests that name none; empty: the first of `list`.
    pub default: String,
    /// ONNX Runtime sessions per model, each running one batch at a time on
    /// its own thread; 0: one per core.
    pub sessions: usize,
    /// Threads inside each session; 0: the cores divided among the sessions.
    pub threads_per_session: usize,
    /// Models served (`[[models.list]]`); empty: all-MiniLM-L6-v2 from the
    /// cache, optional (see the module doc).
    pub list: Vec<ModelSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// Name used in requests (matched without regard to case).
    pub name: String,
    /// Folder with model.onnx, tokenizer.json, config.json,
    /// special_tokens_map.json and tokenizer_config.json; empty:
    /// `<cache_dir>/<name in lower case>`.
    pub dir: String,
    /// Longest input in tokens; longer texts are truncated (256 as in
    /// sentence-transformers for all-MiniLM-L6-v2).
    pub max_tokens: usize,
    /// How token vectors become one vector: `mean` or `cls`.
    pub pooling: PoolingKind,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            name: DEFAULT_MODEL.to_string(),
            dir: String::new(),
            max_tokens: 256,
            pooling: PoolingKind::Mean,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolingKind {
    Mean,
    Cls,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Most texts a session takes at once: requests are cut into pieces of
    /// at most this size (smaller where that spreads a request over the
    /// sessions), and pieces of several requests share a batch. Larger
    /// batches save little (a session runs them 32 texts at a time) and even
    /// out the sessions' work less well.
    pub max_batch_size: usize,
    /// How long a session waits for more texts once it holds some, to fill a batch.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Texts waiting per model; a request that would exceed it is refused
    /// with RESOURCE_EXHAUSTED / 429 rather than queued.
    pub max_queued_texts: usize,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_wait: Duration::from_millis(2),
            max_queued_texts: 8192,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most texts in one request (one message of a stream).
    pub max_texts: usize,
    /// Longest text in bytes (UTF-8); the model reads only `max_tokens` of it.
    pub max_text_bytes: usize,
    /// Requests of one EmbedStream being embedded at once; the stream reads
    /// no further ahead, so a fast sender waits (HTTP/2 flow control).
    pub stream_window: usize,
    /// Largest HTTP request body, in bytes; larger ones get 413. (A gRPC
    /// message's limit is server.max_message_bytes.)
    pub max_http_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_texts: 2048,
            max_text_bytes: 64 * 1024,
            stream_window: 4,
            max_http_body_bytes: 16 << 20,
        }
    }
}

/// A model to load, where its files are, and whether failing to load it
/// stops the start.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub spec: ModelSpec,
    pub dir: PathBuf,
    pub required: bool,
}

/// The files a model folder must hold: the setup script's layout.
pub const MODEL_FILES: [&str; 5] = [
    "model.onnx",
    "tokenizer.json",
    "config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

impl ModelSource {
    /// The first of the model's files that is missing, if any.
    pub fn missing_file(&self) -> Option<PathBuf> {
        MODEL_FILES
            .iter()
            .map(|name| self.dir.join(name))
            .find(|path| !path.is_file())
    }
}

/// The ONNX Runtime library to load and whether it was named explicitly.
#[derive(Debug, Clone, PartialEq)]
pub struct OrtLibrary {
    pub path: PathBuf,
    pub required: bool,
}

impl ModelsConfig {
    /// The model cache folder by the setup script's rule.
    pub fn cache_dir(&self) -> PathBuf {
        if !self.cache_dir.is_empty() {
            return PathBuf::from(&self.cache_dir);
        }
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = env("BERTH_MODEL_CACHE") {
            return PathBuf::from(dir);
        }
        env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| Path::new(&home).join(".cache")))
            .unwrap_or_else(std::env::temp_dir)
            .join("berth")
            .join("models")
    }

    pub fn ort_library(&self) -> OrtLibrary {
        if !self.ort_library.is_empty() {
            return OrtLibrary {
                path: PathBuf::from(&self.ort_library),
                required: true,
            };
        }
        match std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
            Some(path) => OrtLibrary {
                path: PathBuf::from(path),
                required: true,
            },
            None => OrtLibrary {
                path: self
                    .cache_dir()
                    .join("onnxruntime")
                    .join("libonnxruntime.so"),
                required: false,
            },
        }
    }

    /// The first file the service needs that is not installed: ONNX Runtime's
    /// library, then the first model's files. None when all are there.
    pub fn first_missing_file(&self) -> Option<PathBuf> {
        let OrtLibrary { path, .. } = self.ort_library();
        if !path.is_file() {
            return Some(path);
        }
        self.sources().first()?.missing_file()
    }

    /// The models to load, in order: the listed ones (required) or the
    /// default model (optional).
    pub fn sources(&self) -> Vec<ModelSource> {
        let cache = self.cache_dir();
        let source = |spec: &ModelSpec, required| ModelSource {
            dir: if spec.dir.is_empty() {
                cache.join(spec.name.to_lowercase())
            } else {
                PathBuf::from(&spec.dir)
            },
            spec: spec.clone(),
            required,
        };
        if self.list.is_empty() {
            vec![source(&ModelSpec::default(), false)]
        } else {
            self.list.iter().map(|spec| source(spec, true)).collect()
        }
    }

    /// Sessions per model and threads per session on a machine of `cores`.
    pub fn pool_shape(&self, cores: usize) -> (usize, usize) {
        let cores = cores.max(1);
        let sessions = if self.sessions == 0 {
            cores
        } else {
            self.sessions
        };
        let threads = if self.threads_per_session == 0 {
            (cores / sessions).max(1)
        } else {
            self.threads_per_session
        };
        (sessions, threads)
    }
}

impl Config {
    /// Checks what serde cannot: names and sizes that must make sense together.
    pub fn validate(&self) -> Result<(), crate::EmbeddingError> {
        let bad = |msg: String| Err(crate::EmbeddingError::Config(msg));
        let sources = self.models.sources();
        for (i, source) in sources.iter().enumerate() {
            let name = &source.spec.name;
            if name.is_empty() {
                return bad(format!("models.list[{i}].name is empty"));
            }
            if sources[..i]
                .iter()
                .any(|s| s.spec.name.eq_ignore_ascii_case(name))
            {
                return bad(format!("models.list names `{name}` twice"));
            }
            if source.spec.max_tokens == 0 {
                return bad(format!("models.list[{i}].max_tokens must be at least 1"));
            }
        }
        let default = &self.models.default;
        if !default.is_empty()
            && !sources
                .iter()
                .any(|s| s.spec.name.eq_ignore_ascii_case(default))
        {
            return bad(format!(
                "models.default = \"{default}\" is not in models.list"
            ));
        }
        for (field, value) in [
            ("batching.max_batch_size", self.batching.max_batch_size),
            ("batching.max_queued_texts", self.batching.max_queued_texts),
            ("limits.max_texts", self.limits.max_texts),
            ("limits.max_text_bytes", self.limits.max_text_bytes),
            ("limits.stream_window", self.limits.stream_window),
        ] {
            if value == 0 {
                return bad(format!("{field} must be at least 1"));
            }
        }
        if self.batching.max_queued_texts < self.limits.max_texts {
            return bad(format!(
                "batching.max_queued_texts ({}) is below limits.max_texts ({}): a largest request could never be queued",
                self.batching.max_queued_texts, self.limits.max_texts
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_is_optional_and_listed_models_are_required() {
        let mut models = ModelsConfig {
            cache_dir: "/cache".into(),
            ..ModelsConfig::default()
        };
        let sources = models.sources();
        assert_eq!(sources.len(), 1);
        assert_eq!(sources[0].dir, Path::new("/cache/all-minilm-l6-v2"));
        assert!(!sources[0].required);

        models.list = vec![ModelSpec {
            name: "Mine".into(),
            dir: "/m".into(),
            ..ModelSpec::default()
        }];
        let sources = models.sources();
        assert_eq!(sources[0].dir, Path::new("/m"));
        assert!(sources[0].required);
    }

    #[test]
    fn explicit_ort_library_is_required() {
        let models = ModelsConfig {
            ort_library: "/lib/libonnxruntime.so".into(),
            ..ModelsConfig::default()
        };
        assert_eq!(
            models.ort_library(),
            OrtLibrary {
                path: "/lib/libonnxruntime.so".into(),
                required: true
            }
        );
    }

    #[test]
    fn pool_shape_divides_the_cores() {
        let models = ModelsConfig::default();
        assert_eq!(models.pool_shape(8), (8, 1));
        let two = ModelsConfig {
            sessions: 2,
            ..ModelsConfig::default()
        };
        assert_eq!(two.pool_shape(8), (2, 4));
        assert_eq!(two.pool_shape(1), (2, 1));
    }

    #[test]
    fn validate_names_the_field() {
        let mut config = Config::default();
        config.models.default = "nope".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("models.default")
        );

        let mut config = Config::default();
        config.limits.max_texts = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("limits.max_texts")
        );

        let mut config = Config::default();
        config.models.list = vec![ModelSpec::default(), ModelSpec::default()];
        assert!(config.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn toml_lists_models_and_rejects_unknown_fields() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "[models]\ndefault = \"b\"\n[[models.list]]\nname = \"a\"\n[[models.list]]\nname = \"b\"\npooling = \"cls\"\n[batching]\nmax_wait = \"5ms\"\n",
        )
        .unwrap();
        let config: Config =
            berth_server::config::load_from_env(Some(file.path()), &[], vec![]).unwrap();
        assert_eq!(config.models.list.len(), 2);
        assert_eq!(config.models.list[1].pooling, PoolingKind::Cls);
        assert_eq!(config.batching.max_wait, Duration::from_millis(5));
        config.validate().unwrap();

        std::fs::write(file.path(), "[models]\ncache = \"/x\"\n").unwrap();
        let error = berth_server::config::load_from_env::<Config>(Some(file.path()), &[], vec![])
            .unwrap_err()
            .to_string();
        assert!(error.contains("cache"), "{error}");
    }
}
