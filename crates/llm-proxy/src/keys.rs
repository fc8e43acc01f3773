//! Virtual keys: secrets handed to clients in place of the master key, each
//! with the models it may use and its own limits (requests and tokens per
//! minute, requests in flight, budget). Only a SHA-256 of each secret is
//! stored: the secrets are 192 random bits, so a plain hash is as strong as
//! a slow one and keeps the lookup on every request cheap.
//!
//! The store is one JSON file (mode 0600), rewritten whole through a
//! temporary file and a rename on change, and flushed periodically for spend.
//! Without a path, keys live in memory only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::limits::{Exceeded, MinuteWindow};
use crate::usage::Usage;

/// What a key may do; LiteLLM's `/key/generate` field names. Unset or 0: unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeySpec {
    pub key_alias: String,
    /// Model names the key may use; empty: all.
    pub models: Vec<String>,
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub max_parallel_requests: Option<u64>,
    /// USD.
    pub max_budget: Option<f64>,
}

/// What a key has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spent {
    pub spend: f64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One key as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredKey {
    id: String,
    /// Hex SHA-256 of the secret.
    hash: String,
    #[serde(flatten)]
    spec: KeySpec,
    spent: Spent,
    /// Unix seconds.
    created_at: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    keys: Vec<StoredKey>,
}

#[derive(Debug)]
pub struct VirtualKey {
    pub id: String,
    pub spec: KeySpec,
    pub created_at: u64,
    hash: String,
    spent: Mutex<Spent>,
    minute: MinuteWindow,
    in_flight: AtomicU64,
    dirty: Arc<AtomicBool>,
}

impl VirtualKey {
    pub fn spent(&self) -> Spent {
        *self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the key may use `model` (and see it listed).
    pub fn allows(&self, model: &str) -> bool {
        self.spec.models.is_empty() || self.spec.models.iter().any(|m| m == model)
    }

    /// Admits one request for `model`, or says which limit stops it.
    pub fn admit(self: &Arc<Self>, model: &str) -> Result<KeyLease, ProxyError> {
        let spec = &self.spec;
        if !self.allows(model) {
            return Err(ProxyError::ModelNotAllowed(model.to_string()));
        }
        if let Some(max_budget) = spec.max_budget.filter(|b| *b > 0.0) {
            let spend = self.spent().spend;
            if spend >= max_budget {
                return Err(ProxyError::BudgetExceeded { spend, max_budget });
            }
        }
        let limit = |l: Option<u64>| l.filter(|l| *l > 0);
        if let Some(max) = limit(spec.max_parallel_requests) {
            // Taken first, given back below if a per-minute limit refuses.
            if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(ProxyError::RateLimited {
                    what: format!("{max} parallel requests"),
                    // No window to wait for: a request in flight ends soon.
                    retry_after: std::time::Duration::from_secs(1),
                });
            }
        } else {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        let lease = KeyLease(self.clone());
        self.minute
            .admit(Instant::now(), limit(spec.rpm_limit), limit(spec.tpm_limit))
            .map_err(|e| {
                let what = match e {
                    Exceeded::Requests(_) => {
                        format!("{} requests per minute", spec.rpm_limit.unwrap_or(0))
                    }
                    Exceeded::Tokens(_) => {
                        format!("{} tokens per minute", spec.tpm_limit.unwrap_or(0))
                    }
                };
                ProxyError::RateLimited {
                    what,
                    retry_after: e.retry_after(),
                }
            })?;
        Ok(lease)
    }
}

/// A request admitted for a key: counts as in flight until dropped.
#[derive(Debug)]
pub struct KeyLease(Arc<VirtualKey>);

impl KeyLease {
    pub fn charge(&self, usage: &Usage, cost: f64) {
        let key = &self.0;
        key.minute.add_tokens(Instant::now(), usage.total());
        let mut spent = key.spent.lock().unwrap_or_else(|e| e.into_inner());
        spent.spend += cost;
        // Saturating, as the usage they add is the upstream's word.
        spent.prompt_tokens = spent.prompt_tokens.saturating_add(usage.prompt_tokens);
        spent.completion_tokens = spent
            .completion_tokens
            .saturating_add(usage.completion_tokens);
        key.dirty.store(true, Ordering::Release);
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct KeyStore {
    path: Option<PathBuf>,
    by_hash: RwLock<HashMap<String, Arc<VirtualKey>>>,
    dirty: Arc<AtomicBool>,
    /// Serialises writers of the file.
    write: Mutex<()>,
}

fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn store_error(path: &Path, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::Store(format!("{}: {e}", path.display()))
}

impl KeyStore {
    /// Opens the store at `path` (created on first write), or an in-memory one.
    pub fn open(path: Option<PathBuf>) -> Result<Self, ProxyError> {
        let dirty = Arc::new(AtomicBool::new(false));
        let mut by_hash = HashMap::new();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let file: StoreFile =
                        serde_json::from_slice(&bytes).map_err(|e| store_error(path, e))?;
                    for stored in file.keys {
                        by_hash.insert(stored.hash.clone(), Arc::new(Self::entry(stored, &dirty)));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(store_error(path, e)),
            }
        }
        Ok(Self {
            path,
            by_hash: RwLock::new(by_hash),
            dirty,
            write: Mutex::new(()),
        })
    }

    fn entry(stored: StoredKey, dirty: &Arc<AtomicBool>) -> VirtualKey {
        VirtualKey {
            id: stored.id,
            spec: stored.spec,
            created_at: stored.created_at,
            hash: stored.hash,
            spent: Mutex::new(stored.spent),
            minute: MinuteWindow::default(),
            in_flight: AtomicU64::new(0),
            dirty: dirty.clone(),
        }
    }

    /// Creates a key; the secret is returned once and never stored.
    pub fn create(&self, spec: KeySpec) -> Result<(Arc<VirtualKey>, String), ProxyError> {
        let random: [u8; 24] = rand::random();
        let secret = format!(
            "sk-{}",
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let id_bytes: [u8; 8] = rand::random();
        let stored = StoredKey {
            id: format!(
                "key-{}",
                id_bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
            hash: hash(&secret),
            spec,
            spent: Spent::default(),
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let key = Arc::new(Self::entry(stored, &self.dirty));
        self.by_hash
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.hash.clone(), key.clone());
        self.save()?;
        Ok((key, secret))
    }

    pub fn lookup(&self, secret: &str) -> Option<Arc<VirtualKey>> {
        self.by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash(secret))
            .cloned()
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<Arc<VirtualKey>> {
        let mut keys: Vec<_> = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys
    }

    /// Deletes a key by id; false when there is none.
    pub fn delete(&self, id: &str) -> Result<bool, ProxyError> {
        let removed = {
            let mut keys = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            let before = keys.len();
            keys.retain(|_, key| key.id != id);
            keys.len() != before
        };
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    /// Writes the store if spend changed since the last write.
    pub fn flush(&self) -> Result<(), ProxyError> {
        if self.dirty.load(Ordering::Acquire) {
            self.save()
        } else {
            Ok(())
        }
    }

    fn save(&self) -> Result<(), ProxyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        self.dirty.store(false, Ordering::Release);
        let keys = self
            .list()
            .iter()
            .map(|key| StoredKey {
                id: key.id.clone(),
                hash: key.hash.clone(),
                spec: key.spec.clone(),
                spent: key.spent(),
                created_at: key.created_at,
            })
            .collect();
        let bytes =
            serde_json::to_vec_pretty(&StoreFile { keys }).map_err(|e| store_error(path, e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| store_error(path, e))?;
        }
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| store_error(&tmp, e))?;
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| store_error(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| store_error(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_at_rest_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let store = KeyStore::open(Some(path.clone())).unwrap();
        let (key, secret) = store
            .create(KeySpec {
                key_alias: "ci".into(),
                ..KeySpec::default()
            })
            .unwrap();
        let lease = key.admit("any").unwrap();
        lease.charge(
            &Usage {
                prompt_tokens: 2,
                completion_tokens: 3,
                total_tokens: 5,
            },
            0.25,
        );
        drop(lease);
        store.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret), "secret stored in clear");
        assert!(text.contains(&hash(&secret)));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let reopened = KeyStore::open(Some(path)).unwrap();
        let found = reopened.lookup(&secret).unwrap();
        assert_eq!(found.spec.key_alias, "ci");
        assert_eq!(
            found.spent(),
            Spent {
                spend: 0.25,
                prompt_tokens: 2,
                completion_tokens: 3
            }
        );
        assert!(reopened.lookup("sk-wrong").is_none());
        assert!(reopened.delete(&found.id).unwrap());
        assert!(reopened.lookup(&secret).is_none());
    }

    #[test]
    fn limits_models_parallel_rpm_budget() {
        let store = KeyStore::open(None).unwrap();
        let spec = KeySpec {
            models: vec!["a".into()],
            max_parallel_requests: Some(1),
            rpm_limit: Some(2),
            max_budget: Some(1.0),
            ..KeySpec::default()
        };
        let (key, _) = store.create(spec).unwrap();
        assert!(matches!(
            key.admit("b"),
            Err(ProxyError::ModelNotAllowed(_))
        ));
        let first = key.admit("a").unwrap();
        assert!(matches!(
            key.admit("a"),
            Err(ProxyError::RateLimited { .. })
        ));
        drop(first);
        let second = key.admit("a").unwrap();
        drop(second);
        match key.admit("a") {
            Err(ProxyError::RateLimited { what, retry_after }) => {
                assert!(what.contains("2 requests per minute"), "{what}");
                assert!(retry_after.as_secs() <= 60);
            }
            other => panic!("{other:?}"),
        }
        let (rich, _) = store
            .create(KeySpec {
                max_budget: Some(1.0),
                ..KeySpec::default()
            })
            .unwrap();
        rich.admit("a").unwrap().charge(&Usage::default(), 1.5);
        assert!(matches!(
            rich.admit("a"),
            Err(ProxyError::BudgetExceeded { .. })
        ));
    }
}
