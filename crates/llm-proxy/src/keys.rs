//! Virtual keys: secrets handed to clients in place of the master key, each
//! with the models it may use and its own limits (requests and tokens per
//! minute, requests in flight, budget). Only a SHA-256 of each secret is
//! stored: the secrets are 192 random bits, so a plain hash is as strong as
//! a slow one and keeps the lookup on every request cheap.
//!
//! The store is one JSON file (mode 0600), rewritten whole through a
//! temporary file and a rename on change, and periodically for spend; each
//! charge in between is appended to the spend journal (`journal`) first, and
//! replayed on open, so no recorded spend is lost to a crash. Without a
//! path, keys live in memory only.
//!
//! A key's budget holds across retries and fallbacks: before each upstream
//! attempt the request reserves its worst-case cost at that deployment's
//! prices ([`KeyLease::reserve`]), and only what is neither spent nor
//! reserved by other requests in flight is available to it. So does its
//! budget for one model (LiteLLM's `model_max_budget`): each attempt on a
//! deployment of that model reserves from it too, whichever model the
//! client asked for (a fallback to it spends from it); these are kept in
//! memory, each for its `time_period`, as LiteLLM keeps them without Redis.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::journal::Journal;
use crate::limits::{Exceeded, MinuteWindow};
use crate::litellm_config::{BudgetLimit, DeploymentConfig, budget_duration};
use crate::router::budget::PeriodBudget;
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
    /// Budgets for single models (model names), LiteLLM's shape:
    /// `{"gpt-4o": {"budget_limit": 0.5, "time_period": "1d"}}`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_max_budget: BTreeMap<String, ModelMaxBudget>,
}

/// A key's budget for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMaxBudget {
    /// USD; LiteLLM's clients send it as a number or a string.
    #[serde(deserialize_with = "usd")]
    pub budget_limit: f64,
    /// `30s`, `10m`, `1h`, `1d`, `1w`, `1mo`; none: for the process's life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_period: Option<String>,
}

/// A number of USD, written as a JSON number or a string of one.
fn usd<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Usd {
        Number(f64),
        Text(String),
    }
    match Usd::deserialize(deserializer)? {
        Usd::Number(usd) => Ok(usd),
        Usd::Text(text) => text
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a number of USD"))),
    }
}

impl KeySpec {
    /// The budget of each model of `model_max_budget`, refusing one that is
    /// not a positive amount per a period LiteLLM knows, by its field.
    fn model_budgets(&self, now: Instant) -> Result<HashMap<String, PeriodBudget>, ProxyError> {
        self.model_max_budget
            .iter()
            .map(|(model, budget)| {
                let field = |name: &str| format!("model_max_budget.{model}.{name}");
                let max_usd = budget.budget_limit;
                if !(max_usd.is_finite() && max_usd > 0.0) {
                    return Err(ProxyError::InvalidField {
                        field: field("budget_limit"),
                        message: format!("must be a number of USD above 0, got {max_usd}"),
                    });
                }
                let period = budget
                    .time_period
                    .as_deref()
                    .map(budget_duration)
                    .transpose()
                    .map_err(|message| ProxyError::InvalidField {
                        field: field("time_period"),
                        message,
                    })?;
                let limit = BudgetLimit { max_usd, period };
                Ok((model.clone(), PeriodBudget::new(limit, now)))
            })
            .collect()
    }
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
    /// The last spend journal entry this file includes.
    #[serde(default)]
    journal_seq: u64,
}

/// A key's spend, and what requests in flight have reserved of its budget.
#[derive(Debug, Default)]
struct Ledger {
    spent: Spent,
    /// USD.
    reserved: f64,
}

/// What every key of a store shares: whether spend changed since the last
/// write, and the journal charges go to first.
#[derive(Debug, Default)]
struct Shared {
    dirty: AtomicBool,
    journal: Option<Mutex<Journal>>,
}

#[derive(Debug)]
pub struct VirtualKey {
    pub id: String,
    pub spec: KeySpec,
    pub created_at: u64,
    hash: String,
    ledger: Mutex<Ledger>,
    minute: MinuteWindow,
    in_flight: AtomicU64,
    shared: Arc<Shared>,
    /// `spec.model_max_budget`, by model name.
    model_budgets: HashMap<String, PeriodBudget>,
}

impl VirtualKey {
    pub fn spent(&self) -> Spent {
        self.ledger().spent
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
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
        let lease = KeyLease {
            key: self.clone(),
            reserved: 0.0,
            model_reserved: None,
        };
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

/// A request admitted for a key: counts as in flight until dropped, and
/// holds what it reserved of the key's budget until charged or dropped.
#[derive(Debug)]
pub struct KeyLease {
    key: Arc<VirtualKey>,
    /// USD reserved for the attempt under way.
    reserved: f64,
    /// The model budget the attempt under way reserved from, and how much.
    model_reserved: Option<(String, f64)>,
}

impl KeyLease {
    /// Reserves, for one upstream attempt on `deployment`, the most it can
    /// cost: `worst()` (None: no bound, as when no `max_tokens` limits the
    /// answer of a priced deployment; then all that is left of the budget,
    /// so such requests of a key run one at a time). Refused when that does
    /// not fit in the budget less what is spent and reserved by the key's
    /// other requests in flight. A key without a budget reserves nothing.
    ///
    /// The key's budget for the deployment's model, when it has one, is
    /// reserved from first, the same way (see [`PeriodBudget::reserve`]).
    pub fn reserve(
        &mut self,
        deployment: &DeploymentConfig,
        worst: impl FnOnce() -> Option<f64>,
    ) -> Result<(), ProxyError> {
        self.release();
        let max_budget = self.key.spec.max_budget.filter(|b| *b > 0.0);
        let model_budget = self.key.model_budgets.get(&deployment.model_name);
        if max_budget.is_none() && model_budget.is_none() {
            return Ok(());
        }
        let worst = worst();
        if let Some(budget) = model_budget {
            let reserved = budget.reserve(worst, Instant::now()).map_err(|refusal| {
                let (why, retry_after) = refusal.explain(budget.max_usd());
                ProxyError::ModelBudget {
                    model: deployment.model_name.clone(),
                    why,
                    retry_after,
                }
            })?;
            self.model_reserved = Some((deployment.model_name.clone(), reserved));
        }
        let Some(max_budget) = max_budget else {
            return Ok(());
        };
        let result = self.reserve_from_key(&deployment.id, max_budget, worst);
        if result.is_err() {
            self.release();
        }
        result
    }

    /// The key's own share of [`reserve`](Self::reserve).
    fn reserve_from_key(
        &mut self,
        deployment: &str,
        max_budget: f64,
        worst: Option<f64>,
    ) -> Result<(), ProxyError> {
        let mut ledger = self.key.ledger();
        let spend = ledger.spent.spend;
        let left = max_budget - spend;
        if left <= 0.0 {
            return Err(ProxyError::BudgetExceeded { spend, max_budget });
        }
        if let Some(worst) = worst.filter(|w| *w > left) {
            return Err(ProxyError::BudgetTooSmall {
                deployment: deployment.to_string(),
                worst,
                left,
            });
        }
        let free = left - ledger.reserved;
        let take = worst.unwrap_or(free);
        if take > free.max(0.0) || (worst.is_none() && free <= 0.0) {
            return Err(ProxyError::RateLimited {
                what: format!(
                    "${:.6} of the key's max_budget ${max_budget:.6} is reserved by its requests in flight",
                    ledger.reserved
                ),
                // A request in flight ends soon.
                retry_after: std::time::Duration::from_secs(1),
            });
        }
        ledger.reserved += take;
        self.reserved = take;
        Ok(())
    }

    /// Gives back the reservation of an attempt that failed.
    pub fn release(&mut self) {
        if self.reserved > 0.0 {
            let mut ledger = self.key.ledger();
            ledger.reserved = (ledger.reserved - std::mem::take(&mut self.reserved)).max(0.0);
        }
        self.settle_model(0.0);
    }

    /// Ends the attempt's reservation from a model budget, `cost` spent.
    fn settle_model(&mut self, cost: f64) {
        if let Some((model, reserved)) = self.model_reserved.take()
            && let Some(budget) = self.key.model_budgets.get(&model)
        {
            budget.settle(reserved, cost, Instant::now());
        }
    }

    /// Settles the request: its reservation is given back and `cost` spent,
    /// written to the spend journal before the answer ends.
    pub fn charge(&mut self, usage: &Usage, cost: f64) {
        self.settle_model(cost);
        let key = &self.key;
        key.minute.add_tokens(Instant::now(), usage.total());
        let reserved = std::mem::take(&mut self.reserved);
        // The journal's lock first, so that a snapshot of the store sees
        // every charge either in the keys or after its journal_seq.
        let mut journal = key
            .shared
            .journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()));
        {
            let mut ledger = key.ledger();
            ledger.reserved = (ledger.reserved - reserved).max(0.0);
            let spent = &mut ledger.spent;
            spent.spend += cost;
            // Saturating, as the usage they add is the upstream's word.
            spent.prompt_tokens = spent.prompt_tokens.saturating_add(usage.prompt_tokens);
            spent.completion_tokens = spent
                .completion_tokens
                .saturating_add(usage.completion_tokens);
        }
        if let Some(journal) = journal.as_mut()
            && let Err(error) =
                journal.append(&key.id, cost, usage.prompt_tokens, usage.completion_tokens)
        {
            tracing::error!(journal = %journal.path().display(), %error, key = %key.id, "appending to the spend journal; the spend is kept until the next write of the key store");
        }
        key.shared.dirty.store(true, Ordering::Release);
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.release();
        self.key.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
pub struct KeyStore {
    path: Option<PathBuf>,
    by_hash: RwLock<HashMap<String, Arc<VirtualKey>>>,
    shared: Arc<Shared>,
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
    /// Opens the store at `path` (created on first write), or an in-memory
    /// one, and replays the spend journal's charges the file lacks.
    pub fn open(path: Option<PathBuf>) -> Result<Self, ProxyError> {
        let mut by_hash = HashMap::new();
        let mut journal = path.as_deref().map(Journal::beside);
        let mut stored = StoreFile::default();
        if let Some(path) = &path {
            match std::fs::read(path) {
                Ok(bytes) => {
                    stored = serde_json::from_slice(&bytes).map_err(|e| store_error(path, e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(store_error(path, e)),
            }
        }
        let mut replayed = 0;
        if let Some(journal) = &mut journal {
            let entries = journal
                .replay()
                .map_err(|e| store_error(journal.path(), e))?;
            for entry in entries.into_iter().filter(|e| e.seq > stored.journal_seq) {
                // A charge to a key deleted since is dropped with it.
                if let Some(key) = stored.keys.iter_mut().find(|k| k.id == entry.id) {
                    key.spent.spend += entry.spend;
                    key.spent.prompt_tokens =
                        key.spent.prompt_tokens.saturating_add(entry.prompt_tokens);
                    key.spent.completion_tokens = key
                        .spent
                        .completion_tokens
                        .saturating_add(entry.completion_tokens);
                    replayed += 1;
                }
            }
            journal.seq = journal.seq.max(stored.journal_seq);
        }
        let shared = Arc::new(Shared {
            dirty: AtomicBool::new(replayed > 0),
            journal: journal.map(Mutex::new),
        });
        if replayed > 0 {
            tracing::info!(charges = replayed, "spend replayed from the journal");
        }
        for key in stored.keys {
            let id = key.id.clone();
            let entry = Self::entry(key, &shared).map_err(|e| {
                let path = path.as_deref().unwrap_or(Path::new("(memory)"));
                store_error(path, format!("key {id}: {e}"))
            })?;
            by_hash.insert(entry.hash.clone(), Arc::new(entry));
        }
        Ok(Self {
            path,
            by_hash: RwLock::new(by_hash),
            shared,
            write: Mutex::new(()),
        })
    }

    fn entry(stored: StoredKey, shared: &Arc<Shared>) -> Result<VirtualKey, ProxyError> {
        let model_budgets = stored.spec.model_budgets(Instant::now())?;
        Ok(VirtualKey {
            id: stored.id,
            spec: stored.spec,
            created_at: stored.created_at,
            hash: stored.hash,
            ledger: Mutex::new(Ledger {
                spent: stored.spent,
                reserved: 0.0,
            }),
            minute: MinuteWindow::default(),
            in_flight: AtomicU64::new(0),
            shared: shared.clone(),
            model_budgets,
        })
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
        let key = Arc::new(Self::entry(stored, &self.shared)?);
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
        if self.shared.dirty.load(Ordering::Acquire) {
            // Written again at the next flush if this one failed.
            self.save()
                .inspect_err(|_| self.shared.dirty.store(true, Ordering::Release))
        } else {
            Ok(())
        }
    }

    fn save(&self) -> Result<(), ProxyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        // The snapshot and the journal's rotation under the journal's lock:
        // no charge lands between them. Charges wait for this only (the
        // file is written after), not for the disk.
        let (keys, journal_seq) = {
            let mut journal = self
                .shared
                .journal
                .as_ref()
                .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()));
            self.shared.dirty.store(false, Ordering::Release);
            let keys: Vec<StoredKey> = self
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
            let seq = match journal.as_mut() {
                Some(journal) => {
                    journal
                        .rotate()
                        .map_err(|e| store_error(journal.path(), e))?;
                    journal.seq
                }
                None => 0,
            };
            (keys, seq)
        };
        let bytes = serde_json::to_vec_pretty(&StoreFile { keys, journal_seq })
            .map_err(|e| store_error(path, e))?;
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
        std::fs::rename(&tmp, path).map_err(|e| store_error(path, e))?;
        if let Some(journal) = &self.shared.journal {
            let journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .drop_rotated()
                .map_err(|e| store_error(journal.path(), e))?;
        }
        Ok(())
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
        let mut lease = key.admit("any").unwrap();
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

    /// What a crash leaves: charges after the last write of the store are
    /// in the journal only, and opening the store replays them once.
    #[test]
    fn spend_after_the_last_write_is_replayed_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let store = KeyStore::open(Some(path.clone())).unwrap();
        let (key, secret) = store.create(KeySpec::default()).unwrap();
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
        };
        key.admit("m").unwrap().charge(&usage, 0.5);
        store.flush().unwrap();
        key.admit("m").unwrap().charge(&usage, 0.25);
        // No flush: the process dies here.
        drop(store);
        let reopened = KeyStore::open(Some(path.clone())).unwrap();
        let spent = reopened.lookup(&secret).unwrap().spent();
        assert_eq!((spent.spend, spent.completion_tokens), (0.75, 4));
        // Written, then opened again: the journal's entries count once.
        reopened.flush().unwrap();
        let again = KeyStore::open(Some(path)).unwrap();
        assert_eq!(again.lookup(&secret).unwrap().spent().spend, 0.75);
    }

    #[test]
    fn budget_reservations_bound_requests_in_flight() {
        let store = KeyStore::open(None).unwrap();
        let (key, _) = store
            .create(KeySpec {
                max_budget: Some(1.0),
                ..KeySpec::default()
            })
            .unwrap();
        let d = &crate::router::tests::deployment("m", "d");
        let mut a = key.admit("m").unwrap();
        a.reserve(d, || Some(0.6)).unwrap();
        let mut b = key.admit("m").unwrap();
        // 0.6 reserved: 0.5 more does not fit until a settles.
        assert!(matches!(
            b.reserve(d, || Some(0.5)),
            Err(ProxyError::RateLimited { .. })
        ));
        // More than the whole budget never fits.
        assert!(matches!(
            b.reserve(d, || Some(1.5)),
            Err(ProxyError::BudgetTooSmall { .. })
        ));
        // Unbounded: all that is left, so nothing more fits beside it.
        b.reserve(d, || None).unwrap();
        let mut c = key.admit("m").unwrap();
        assert!(c.reserve(d, || Some(0.01)).is_err());
        // A free deployment needs no budget.
        c.reserve(d, || Some(0.0)).unwrap();
        drop(b);
        a.charge(&Usage::default(), 0.25);
        // Spent 0.25, nothing reserved: 0.75 left.
        c.reserve(d, || Some(0.75)).unwrap();
        c.release();
        let mut e = key.admit("m").unwrap();
        assert!(matches!(
            e.reserve(d, || Some(0.76)),
            Err(ProxyError::BudgetTooSmall { .. })
        ));
    }

    /// A key's budget for one model: reserved from by attempts on that
    /// model only, beside the key's whole budget, and settled with what the
    /// attempt cost; bad ones are refused by their field.
    #[test]
    fn a_model_budget_bounds_attempts_on_its_model_only() {
        let store = KeyStore::open(None).unwrap();
        let spec: KeySpec = serde_json::from_value(serde_json::json!({
            "max_budget": 10.0,
            "model_max_budget": {"dear": {"budget_limit": "0.5", "time_period": "1d"}},
        }))
        .unwrap();
        let (key, _) = store.create(spec).unwrap();
        let dear = &crate::router::tests::deployment("dear", "dear-1");
        let cheap = &crate::router::tests::deployment("cheap", "cheap-1");
        let mut a = key.admit("dear").unwrap();
        a.reserve(dear, || Some(0.4)).unwrap();
        let mut b = key.admit("dear").unwrap();
        // 0.4 of the model's 0.5 reserved: 0.2 more does not fit on it…
        match b.reserve(dear, || Some(0.2)) {
            Err(error @ ProxyError::ModelBudget { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains("model_max_budget for `dear`") && text.contains("$0.100000 left"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        // …and nothing of the key's budget was reserved for it.
        assert_eq!(key.ledger().reserved, 0.4);
        // Another model (a fallback) spends from the key's budget only.
        b.reserve(cheap, || Some(5.0)).unwrap();
        b.release();
        // Settled at its cost: 0.5 - 0.3 is left for the model.
        a.charge(&Usage::default(), 0.3);
        b.reserve(dear, || Some(0.2)).unwrap();
        assert!(matches!(
            key.admit("dear").unwrap().reserve(dear, || Some(0.01)),
            Err(ProxyError::ModelBudget { .. })
        ));
        b.charge(&Usage::default(), 0.2);
        let spent = key.model_budgets["dear"].spent(Instant::now());
        assert!((spent - 0.5).abs() < 1e-12, "{spent}");
        match key.admit("dear").unwrap().reserve(dear, || Some(0.0)) {
            Err(error) => assert!(error.retry_after().is_some(), "{error}"),
            Ok(()) => panic!("a spent model budget let an attempt through"),
        }

        // Refused by the key's whole budget: the model's reservation is
        // given back with it.
        let spec: KeySpec = serde_json::from_value(serde_json::json!({
            "max_budget": 0.1,
            "model_max_budget": {"dear": {"budget_limit": 1}},
        }))
        .unwrap();
        let (small, _) = store.create(spec).unwrap();
        assert!(matches!(
            small.admit("dear").unwrap().reserve(dear, || Some(0.5)),
            Err(ProxyError::BudgetTooSmall { .. })
        ));
        let model = &small.model_budgets["dear"];
        assert_eq!(model.reserve(Some(1.0), Instant::now()), Ok(1.0));

        for (budget, field) in [
            (
                serde_json::json!({"budget_limit": 0}),
                "model_max_budget.m.budget_limit",
            ),
            (
                serde_json::json!({"budget_limit": 1, "time_period": "1 day"}),
                "model_max_budget.m.time_period",
            ),
        ] {
            let spec: KeySpec =
                serde_json::from_value(serde_json::json!({"model_max_budget": {"m": budget}}))
                    .unwrap();
            match store.create(spec) {
                Err(ProxyError::InvalidField { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{other:?}"),
            }
        }
        let error = serde_json::from_value::<KeySpec>(
            serde_json::json!({"model_max_budget": {"m": {"budget_limit": "lots"}}}),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("`lots` is not a number of USD"),
            "{error}"
        );
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
