//! Who is calling: the master key, a virtual key, or anyone (when no master
//! key is configured, as in LiteLLM: the proxy is then open and has no
//! virtual keys).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::ProxyError;
use crate::keys::{KeyStore, VirtualKey};
use crate::litellm_config::Secret;

#[derive(Debug)]
pub enum Caller {
    Master,
    /// No master key configured: no auth at all.
    Anyone,
    Key(Arc<VirtualKey>),
}

impl Caller {
    /// The virtual key whose limits apply, if any.
    pub fn key(&self) -> Option<&Arc<VirtualKey>> {
        match self {
            Self::Key(key) => Some(key),
            _ => None,
        }
    }

    /// Whether the caller may see and use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.key().is_none_or(|key| key.allows(model))
    }

    /// Admin operations (virtual keys) need the master key.
    pub fn require_master(&self) -> Result<(), ProxyError> {
        match self {
            Self::Master => Ok(()),
            _ => Err(ProxyError::NotMasterKey),
        }
    }
}

#[derive(Debug)]
pub struct Auth {
    /// SHA-256 of the master key: comparing digests keeps the comparison's
    /// timing independent of how much of a guess is right.
    master: Option<[u8; 32]>,
    keys: Arc<KeyStore>,
}

impl Auth {
    pub fn new(master_key: Option<&Secret>, keys: Arc<KeyStore>) -> Self {
        Self {
            master: master_key.map(|k| Sha256::digest(k.expose().as_bytes()).into()),
            keys,
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// The caller of a request with this `Authorization` header value.
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ProxyError> {
        let Some(master) = &self.master else {
            return Ok(Caller::Anyone);
        };
        let token = authorization
            .map(str::trim)
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ProxyError::MissingKey)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if &digest == master {
            return Ok(Caller::Master);
        }
        self.keys
            .lookup(token)
            .map(Caller::Key)
            .ok_or(ProxyError::InvalidKey)
    }
}
