//! The bounded in-memory store behind `previous_response_id`: each stored
//! response's conversation (the chat messages up to and including its
//! answer), at most `max_entries` of them and `max_bytes` of their JSON,
//! each for at most `ttl`; one conversation takes at most a 16th of the
//! bytes (a chain of continuations grows each one). A conversation
//! continued from an evicted, expired or oversized response gets 404, as
//! OpenAI answers for one it no longer has.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A stored response's conversation, shared by the responses that continue it.
pub type History = Arc<Vec<Value>>;

/// One conversation takes at most this share of `max_bytes`.
const MAX_ENTRY_SHARE: usize = 16;

#[derive(Debug)]
pub struct ResponseStore {
    max_entries: usize,
    max_bytes: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each with when it was stored and its size in bytes of JSON.
    entries: HashMap<String, (Instant, usize, History)>,
    bytes: usize,
    /// Ids oldest first: with one TTL for all, the oldest expires first.
    order: VecDeque<String>,
}

impl ResponseStore {
    pub fn new(max_entries: usize, max_bytes: usize, ttl: Duration) -> Self {
        Self {
            max_entries,
            max_bytes,
            ttl,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, id: &str) -> Option<History> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (at, _, history) = inner.entries.get(id)?;
        (at.elapsed() < self.ttl).then(|| history.clone())
    }

    pub fn insert(&self, id: String, history: History) {
        if self.max_entries == 0 {
            return;
        }
        let size = json_len(&history);
        if size > self.max_bytes / MAX_ENTRY_SHARE {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(oldest) = inner.order.front() {
            let expired = inner
                .entries
                .get(oldest)
                .is_none_or(|(at, _, _)| now.duration_since(*at) >= self.ttl);
            let full =
                inner.entries.len() >= self.max_entries || inner.bytes + size > self.max_bytes;
            if !expired && !full {
                break;
            }
            if let Some(oldest) = inner.order.pop_front()
                && let Some((_, gone, _)) = inner.entries.remove(&oldest)
            {
                inner.bytes -= gone;
            }
        }
        inner.bytes += size;
        inner.order.push_back(id.clone());
        inner.entries.insert(id, (now, size, history));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

/// The length of `messages` as JSON, without writing it anywhere.
fn json_len(messages: &[Value]) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting cannot fail.
    let _ = serde_json::to_writer(&mut count, messages);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_cap_and_ttl() {
        let store = ResponseStore::new(2, 1 << 20, Duration::from_secs(60));
        for id in ["a", "b", "c"] {
            store.insert(id.into(), Arc::new(vec![Value::from(id)]));
        }
        assert_eq!(store.len(), 2);
        assert!(store.get("a").is_none());
        assert_eq!(store.get("c").unwrap()[0], "c");

        let store = ResponseStore::new(10, 1 << 20, Duration::from_millis(20));
        store.insert("old".into(), Arc::new(Vec::new()));
        std::thread::sleep(Duration::from_millis(30));
        assert!(store.get("old").is_none());
        store.insert("new".into(), Arc::new(Vec::new()));
        assert_eq!(
            store.len(),
            1,
            "the expired entry is dropped by the next insert"
        );

        let off = ResponseStore::new(0, 1 << 20, Duration::from_secs(60));
        off.insert("x".into(), Arc::new(Vec::new()));
        assert!(off.get("x").is_none());
    }

    #[test]
    fn byte_cap() {
        // 16 × 100 bytes: each conversation at most 100 bytes of JSON.
        let store = ResponseStore::new(100, 1600, Duration::from_secs(60));
        let conversation = |bytes: usize| Arc::new(vec![Value::from("x".repeat(bytes - 2))]);
        assert_eq!(json_len(&conversation(50)), 52);
        store.insert("big".into(), conversation(101));
        assert!(store.get("big").is_none(), "over a 16th of the bytes");
        for i in 0..20 {
            store.insert(format!("r{i}"), conversation(98));
        }
        assert_eq!(store.len(), 16);
        assert!(store.get("r3").is_none() && store.get("r4").is_some());
    }
}
