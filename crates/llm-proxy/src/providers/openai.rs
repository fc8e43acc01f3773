//! OpenAI-compatible upstreams: the client's body goes on with the model name
//! replaced by the deployment's and any dropped parameters left out.
//!
//! A streamed completion carries token usage only when the request says
//! `stream_options: {"include_usage": true}` (OpenAI, vLLM, llama.cpp and
//! Ollama all follow this), and without usage the proxy could neither price
//! the request nor hold the key to its tokens per minute or budget. So every
//! stream is asked for usage; where the client did not ask, the stream is
//! marked for the usage to be taken out again on its way back.

use http::header::AUTHORIZATION;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value, json};

use super::{Dialect, Endpoint, UpstreamRequest, api_key_header, upstream_request};
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
        let value = api_key_header(deployment, format!("Bearer {}", key.expose()))?;
        headers.insert(AUTHORIZATION, value);
    }
    let forwarded = |key: &str| keep(key) && !deployment.drop_params.iter().any(|d| d == key);
    // The Responses API's streams always end with their usage (in
    // `response.completed`), and it has no `include_usage`.
    let streams_tokens = matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        && body.get("stream") == Some(&Value::Bool(true))
        // A deployment that drops stream_options has a server that rejects it.
        && forwarded("stream_options");
    let client_stream_options = body.get("stream_options");
    let client_wants_usage =
        client_stream_options.and_then(|o| o.get("include_usage")) == Some(&Value::Bool(true));
    let stream_options = (streams_tokens && !client_wants_usage).then(|| {
        let mut options = client_stream_options
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        options.insert("include_usage".into(), json!(true));
        Value::Object(options)
    });
    let rewritten = Rewritten {
        body,
        model: &deployment.upstream_model,
        stream_options: stream_options.as_ref(),
        keep: &forwarded,
    };
    let dialect = Dialect::OpenAi {
        strip_usage: stream_options.is_some(),
    };
    upstream_request(uri, headers, &rewritten, dialect)
}

/// The client's body serialised with another model name, without cloning it
/// (messages can be megabytes).
struct Rewritten<'a> {
    body: &'a Map<String, Value>,
    model: &'a str,
    /// Sent in place of the client's `stream_options`, when set.
    stream_options: Option<&'a Value>,
    keep: &'a dyn Fn(&str) -> bool,
}

impl Serialize for Rewritten<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("model", self.model)?;
        if let Some(stream_options) = self.stream_options {
            map.serialize_entry("stream_options", stream_options)?;
        }
        for (key, value) in self.body {
            let replaced =
                key == "model" || (key == "stream_options" && self.stream_options.is_some());
            if !replaced && (self.keep)(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(drop_params: &[&str], body: Value) -> (Value, Dialect) {
        let mut deployment = crate::router::tests::deployment("m", "d");
        deployment.upstream_model = "upstream-model".into();
        deployment.drop_params = drop_params.iter().map(|p| p.to_string()).collect();
        let request = prepare(
            &deployment,
            Endpoint::ChatCompletions,
            body.as_object().unwrap(),
            &|_| true,
        )
        .unwrap();
        (
            serde_json::from_slice(&request.body).unwrap(),
            request.dialect,
        )
    }

    #[test]
    fn streams_are_asked_for_usage_and_marked_when_the_client_did_not() {
        let (body, dialect) = sent(&[], json!({"model": "m", "stream": true, "messages": []}));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(body["model"], "upstream-model");
        assert_eq!(dialect, Dialect::OpenAi { strip_usage: true });

        // The client's other stream options go on beside it.
        let (body, dialect) = sent(
            &[],
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": false, "continuous_usage_stats": true}}),
        );
        assert_eq!(
            body["stream_options"],
            json!({"include_usage": true, "continuous_usage_stats": true})
        );
        assert_eq!(dialect, Dialect::OpenAi { strip_usage: true });

        // Asked for by the client: sent and returned as it is.
        let (body, dialect) = sent(
            &[],
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
        );
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        assert_eq!(dialect, Dialect::OpenAi { strip_usage: false });
    }

    #[test]
    fn no_stream_options_without_a_stream_or_where_dropped() {
        let (body, dialect) = sent(&[], json!({"model": "m", "messages": []}));
        assert!(body.get("stream_options").is_none(), "{body}");
        assert_eq!(dialect, Dialect::OpenAi { strip_usage: false });
        let (body, dialect) = sent(
            &["stream_options"],
            json!({"model": "m", "stream": true, "messages": []}),
        );
        assert!(body.get("stream_options").is_none(), "{body}");
        assert_eq!(dialect, Dialect::OpenAi { strip_usage: false });
    }
}
