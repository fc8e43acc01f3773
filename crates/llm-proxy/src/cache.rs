//! The response cache: an answer kept in memory under its normalized request
//! (the endpoint and the whole chat body: model, messages, parameters; JSON
//! objects hash the same whatever their keys' order, as serde_json's map is
//! sorted), at most `max_bytes` of answers, each for at most `ttl`. Only
//! complete successful answers are stored: a whole 2xx body, or a stream
//! that reached its `[DONE]`. A streamed request is served its recorded
//! stream, a whole one the recorded body.
//!
//! Per request (LiteLLM's `cache` body field, or `Cache-Control`):
//! `no-cache` skips the lookup, `no-store` keeps the answer out.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::providers::Endpoint;
use crate::usage::Usage;

/// One answer takes at most this share of the cache, so that no single
/// answer evicts all others (and a recorded stream stops growing there).
const MAX_ENTRY_SHARE: usize = 16;

pub type Key = [u8; 32];

/// A stored answer.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The JSON body, or the SSE stream as the client got it.
    pub body: Bytes,
    pub usage: Option<Usage>,
}

/// What one request allows the cache to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub no_cache: bool,
    pub no_store: bool,
}

impl Policy {
    /// Takes the `cache` field out of a request body (it is the proxy's,
    /// not the upstream's): `{"no-cache": bool, "no-store": bool}`.
    pub fn take(body: &mut Map<String, Value>) -> Result<Self, ProxyError> {
        let invalid = |message: &str| ProxyError::InvalidField {
            field: "cache".into(),
            message: message.into(),
        };
        let Some(cache) = body.remove("cache") else {
            return Ok(Self::default());
        };
        let Value::Object(cache) = cache else {
            return Err(invalid("must be an object like {\"no-store\": true}"));
        };
        let mut policy = Self::default();
        for (key, value) in cache {
            let Value::Bool(set) = value else {
                return Err(invalid(&format!("`{key}` must be a boolean")));
            };
            match key.as_str() {
                "no-cache" => policy.no_cache = set,
                "no-store" => policy.no_store = set,
                // LiteLLM's per-request ttl/namespace: the proxy's one ttl applies.
                "ttl" | "s-maxage" | "namespace" => {}
                _ => {
                    return Err(invalid(&format!(
                        "unknown setting `{key}` (no-cache, no-store)"
                    )));
                }
            }
        }
        Ok(policy)
    }

    /// Adds what a `Cache-Control` header asks for.
    pub fn with_headers(mut self, headers: &HeaderMap) -> Self {
        for value in headers.get_all(http::header::CACHE_CONTROL) {
            for directive in value.to_str().unwrap_or("").split(',') {
                match directive.trim().to_ascii_lowercase().as_str() {
                    "no-store" => self.no_store = true,
                    "no-cache" => self.no_cache = true,
                    _ => {}
                }
            }
        }
        self
    }
}

#[derive(Debug)]
pub struct ResponseCache {
    max_bytes: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, (Instant, Cached)>,
    /// Keys oldest first: with one TTL for all, the oldest expires first.
    order: VecDeque<Key>,
    bytes: usize,
}

impl ResponseCache {
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self {
            max_bytes,
            ttl,
            inner: Mutex::default(),
        }
    }

    /// The key of a request: its endpoint and its body, hashed.
    pub fn key(endpoint: Endpoint, body: &Map<String, Value>) -> Key {
        let mut hasher = Sha256::new();
        hasher.update(endpoint.path().as_bytes());
        hasher.update([0]);
        // Writing JSON into a hasher cannot fail.
        let _ = serde_json::to_writer(HashWriter(&mut hasher), body);
        hasher.finalize().into()
    }

    /// Largest answer stored.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_bytes / MAX_ENTRY_SHARE
    }

    pub fn get(&self, key: &Key) -> Option<Cached> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (at, cached) = inner.entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| cached.clone())
    }

    pub fn insert(&self, key: Key, cached: Cached) {
        let size = cached.body.len();
        if size > self.max_entry_bytes() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = inner.entries.remove(&key) {
            inner.bytes -= old.body.len();
            inner.order.retain(|k| *k != key);
        }
        while let Some(oldest) = inner.order.front().copied() {
            let expired = inner
                .entries
                .get(&oldest)
                .is_none_or(|(at, _)| now.duration_since(*at) >= self.ttl);
            if !expired && inner.bytes + size <= self.max_bytes {
                break;
            }
            inner.order.pop_front();
            if let Some((_, gone)) = inner.entries.remove(&oldest) {
                inner.bytes -= gone.body.len();
            }
        }
        inner.bytes += size;
        inner.order.push_back(key);
        inner.entries.insert(key, (now, cached));
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn answer(bytes: usize) -> Cached {
        Cached {
            body: Bytes::from(vec![b'x'; bytes]),
            usage: None,
        }
    }

    #[test]
    fn keys_ignore_key_order_and_see_every_parameter() {
        let a = map(
            json!({"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let b = map(
            json!({"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "m"}),
        );
        let c = map(
            json!({"model": "m", "temperature": 1, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let chat = Endpoint::ChatCompletions;
        assert_eq!(ResponseCache::key(chat, &a), ResponseCache::key(chat, &b));
        assert_ne!(ResponseCache::key(chat, &a), ResponseCache::key(chat, &c));
        assert_ne!(
            ResponseCache::key(chat, &a),
            ResponseCache::key(Endpoint::Completions, &a)
        );
    }

    #[test]
    fn size_cap_ttl_and_entry_share() {
        let cache = ResponseCache::new(16 * 100, Duration::from_secs(60));
        for i in 0..20u8 {
            cache.insert([i; 32], answer(100));
        }
        let kept = (0..20u8).filter(|i| cache.get(&[*i; 32]).is_some()).count();
        assert_eq!(kept, 16, "the oldest went first");
        assert!(cache.get(&[0; 32]).is_none() && cache.get(&[19; 32]).is_some());
        cache.insert([99; 32], answer(101));
        assert!(
            cache.get(&[99; 32]).is_none(),
            "larger than a 16th of the cache"
        );

        let cache = ResponseCache::new(1 << 20, Duration::from_millis(20));
        cache.insert([1; 32], answer(10));
        std::thread::sleep(Duration::from_millis(30));
        assert!(cache.get(&[1; 32]).is_none());
    }

    #[test]
    fn policies_from_body_and_headers() {
        let mut body = map(json!({"model": "m", "cache": {"no-store": true}}));
        let policy = Policy::take(&mut body).unwrap();
        assert!(policy.no_store && !policy.no_cache);
        assert!(!body.contains_key("cache"), "the upstream never sees it");
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CACHE_CONTROL,
            "max-age=0, No-Cache".parse().unwrap(),
        );
        assert!(Policy::default().with_headers(&headers).no_cache);
        for bad in [
            json!("no-store"),
            json!({"no-store": "yes"}),
            json!({"forever": true}),
        ] {
            let mut body = map(json!({"model": "m", "cache": bad}));
            assert!(
                matches!(Policy::take(&mut body), Err(ProxyError::InvalidField { field, .. }) if field == "cache")
            );
        }
    }
}
