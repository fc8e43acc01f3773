//! OpenAI-compatible upstreams: the client's body goes on with the model name
//! replaced by the deployment's and any dropped parameters left out.

use http::HeaderValue;
use http::header::AUTHORIZATION;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::{Dialect, Endpoint, UpstreamRequest};
use crate::error::ProxyError;
use crate::litellm_config::DeploymentConfig as Deployment;

/// Builds the request to `{base_url}/{endpoint}`; `keep` decides which of the
/// client's parameters go on (the model is always replaced).
pub(super) fn prepare(
    deployment: &Deployment,
    endpoint: Endpoint,
    body: &Map<String, Value>,
    keep: &dyn Fn(&str) -> bool,
) -> Result<UpstreamRequest, ProxyError> {
    let uri = format!("{}/{}", deployment.base_url, endpoint.path())
        .parse()
        .map_err(|e| {
            ProxyError::InvalidRequest(format!("deployment {}: bad api_base: {e}", deployment.id))
        })?;
    let mut headers = http::HeaderMap::new();
    if let Some(key) = &deployment.api_key {
        let mut value =
            HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                ProxyError::InvalidRequest(format!(
                    "deployment {}: the api_key is not a valid header value",
                    deployment.id
                ))
            })?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let rewritten = Rewritten {
        body,
        model: &deployment.upstream_model,
        keep: &|key| keep(key) && !deployment.drop_params.iter().any(|d| d == key),
    };
    let body = serde_json::to_vec(&rewritten)
        .map_err(|e| ProxyError::InvalidRequest(e.to_string()))?
        .into();
    Ok(UpstreamRequest {
        uri,
        headers,
        body,
        dialect: Dialect::OpenAi,
    })
}

/// The client's body serialised with another model name, without cloning it
/// (messages can be megabytes).
struct Rewritten<'a> {
    body: &'a Map<String, Value>,
    model: &'a str,
    keep: &'a dyn Fn(&str) -> bool,
}

impl Serialize for Rewritten<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        for (key, value) in self.body {
            if key != "model" && (self.keep)(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}
