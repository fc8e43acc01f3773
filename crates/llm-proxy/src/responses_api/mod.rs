//! `POST /v1/responses`: OpenAI's Responses API, for every model the proxy
//! serves. A model whose deployments serve the API themselves
//! (`DeploymentConfig::responses_api`) gets the request passed through, its
//! events relayed and `previous_response_id` left to the upstream's store;
//! any other is translated to the internal chat-completions call
//! (`request`) and its answer back (`response`), with `previous_response_id`
//! continuing a conversation kept in a bounded in-memory store (`store`).

mod request;
mod response;
mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Map, Value, json};

pub use response::{Context, Events};
pub use store::ResponseStore;

use crate::chat::{Completion, answer_id};
use crate::error::ProxyError;
use crate::gateway::Call;
use crate::providers::Endpoint;
use request::Request;

/// A Responses request ready for the gateway.
#[derive(Debug)]
pub enum Prepared {
    /// Sent as it is to deployments that serve the Responses API; their
    /// answer is the client's.
    PassThrough(Call),
    /// Translated to chat completions; the answer is translated back with
    /// `context`.
    Translated { call: Call, context: Context },
}

impl Prepared {
    /// The API the upstream is asked in (the `x-berth-upstream-api` header).
    pub fn upstream_api(&self) -> &'static str {
        match self {
            Self::PassThrough(_) => "responses",
            Self::Translated { .. } => "chat.completions",
        }
    }
}

/// Prepares the call a Responses request body asks for: passed through when
/// `serves_responses` says the model's deployments serve the API, else
/// translated.
pub fn prepare(
    bytes: &[u8],
    store: &Arc<ResponseStore>,
    serves_responses: impl FnOnce(&str) -> bool,
) -> Result<Prepared, ProxyError> {
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
    match body {
        Value::Object(body)
            if body
                .get("model")
                .and_then(Value::as_str)
                .is_some_and(serves_responses) =>
        {
            Ok(Prepared::PassThrough(Call::from_body(
                Endpoint::Responses,
                body,
            )?))
        }
        body => translate(body, store),
    }
}

/// The chat-completions call of a Responses request, and its context.
fn translate(body: Value, store: &Arc<ResponseStore>) -> Result<Prepared, ProxyError> {
    let mut request = Request::parse(body)?;
    let history = match &request.previous_response_id {
        Some(id) => store
            .get(id)
            .ok_or_else(|| ProxyError::UnknownPreviousResponse(id.clone()))?,
        None => Arc::default(),
    };
    let conversation = request.conversation(&history)?;
    let chat = request.chat_body(&conversation);
    let echo = [
        ("instructions", json!(request.instructions)),
        ("tools", request.tools_json()),
        ("tool_choice", request.tool_choice_json()),
        ("temperature", json!(request.temperature.unwrap_or(1.0))),
        ("top_p", json!(request.top_p.unwrap_or(1.0))),
        ("max_output_tokens", json!(request.max_output_tokens)),
        ("previous_response_id", json!(request.previous_response_id)),
        (
            "parallel_tool_calls",
            json!(request.parallel_tool_calls.unwrap_or(true)),
        ),
        (
            "metadata",
            json!(request.metadata.take().unwrap_or_default()),
        ),
        ("store", json!(request.store != Some(false))),
        ("text", json!({"format": {"type": "text"}})),
    ];
    let context = Context {
        id: answer_id("resp_", ""),
        model: request.model.clone(),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs(),
        echo: echo
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Map<_, _>>(),
        conversation: (request.store != Some(false)).then_some(conversation),
        store: store.clone(),
    };
    Ok(Prepared::Translated {
        call: Call::from_body(Endpoint::ChatCompletions, chat)?,
        context,
    })
}

/// A whole chat answer as a `response` object.
pub fn whole(body: &[u8], context: Context) -> Result<Bytes, ProxyError> {
    let completion = Completion::parse(body).map_err(ProxyError::UnreadableAnswer)?;
    Ok(response::whole(&completion, context).to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Arc<ResponseStore> {
        Arc::new(ResponseStore::new(4, 1 << 20, Duration::from_secs(60)))
    }

    /// Passed through, a request goes as the client wrote it, with its
    /// `previous_response_id` for the upstream's store; translated, an id
    /// the proxy did not store is refused.
    #[test]
    fn a_model_that_serves_the_api_gets_the_request_as_it_is() {
        let body = |model: &str| {
            json!({"model": model, "input": [{"role": "user", "content": "hi"}], "stream": true,
                   "previous_response_id": "resp_upstream", "reasoning": {"effort": "low"}})
            .to_string()
        };
        match prepare(body("native").as_bytes(), &store(), |m| m == "native").unwrap() {
            Prepared::PassThrough(call) => {
                assert_eq!(call.endpoint, Endpoint::Responses);
                assert!(call.stream);
                assert_eq!(call.body["previous_response_id"], "resp_upstream");
                assert_eq!(call.body["reasoning"], json!({"effort": "low"}));
                assert!(call.body.get("messages").is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            prepare(body("other").as_bytes(), &store(), |m| m == "native"),
            Err(ProxyError::UnknownPreviousResponse(id)) if id == "resp_upstream"
        ));
        // Bad bodies are refused by name either way.
        assert!(matches!(
            prepare(br#"{"model":"native","stream":"yes"}"#, &store(), |_| true),
            Err(ProxyError::InvalidRequest(_))
        ));
        assert!(matches!(
            prepare(b"[1]", &store(), |_| true),
            Err(ProxyError::InvalidField { .. })
        ));
    }
}

/// Fuzz target `responses` (seeds in `tests/fuzz_corpus/responses/`): any
/// body is a call or a refusal, never a panic; a refused field is named.
#[cfg(test)]
mod fuzz {
    use berth_tests::fuzz;
    use proptest::prelude::*;

    use super::*;

    const KEYS: &[&[u8]] = &[
        b"\"type\":\"message\"",
        b"\"type\":\"function_call\"",
        b"\"type\":\"function_call_output\"",
        b"\"call_id\":\"call_1\"",
        b"\"role\":\"assistant\"",
        b"\"type\":\"input_text\"",
        b"\"input\":[",
        b"\\u0000",
    ];

    proptest! {
        #![proptest_config(fuzz::config())]

        #[test]
        fn any_body_is_a_call_or_a_named_refusal(
            input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "responses"), fuzz::json_tokens(KEYS)),
        ) {
            let store = Arc::new(ResponseStore::new(4, 1 << 20, Duration::from_secs(60)));
            store.insert("resp_stored".into(), Arc::new(vec![json!({"role": "user", "content": "before"})]));
            fuzz::timed("responses", || match prepare(&input, &store, |_| false) {
                Err(ProxyError::InvalidField { field, .. }) => {
                    prop_assert!(!field.is_empty());
                    Ok(())
                }
                Ok(Prepared::Translated { call, .. }) => {
                    prop_assert!(call.body["messages"].is_array());
                    Ok(())
                }
                Ok(Prepared::PassThrough(_)) => {
                    prop_assert!(false, "passed through with no deployment serving the API");
                    Ok(())
                }
                Err(_) => Ok(()),
            })??;
        }
    }
}
