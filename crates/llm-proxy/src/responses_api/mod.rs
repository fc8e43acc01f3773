//! `POST /v1/responses`: OpenAI's Responses API, for every model the proxy
//! serves, translated to the internal chat-completions call (`request`) and
//! its answer back (`response`). `previous_response_id` continues a
//! conversation kept in a bounded in-memory store (`store`).

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

/// A Responses request ready for the gateway, and what its answer needs.
#[derive(Debug)]
pub struct Prepared {
    pub call: Call,
    pub context: Context,
}

/// Prepares the call a Responses request body asks for.
pub fn prepare(bytes: &[u8], store: &Arc<ResponseStore>) -> Result<Prepared, ProxyError> {
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
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
    Ok(Prepared {
        call: Call::from_body(Endpoint::ChatCompletions, chat)?,
        context,
    })
}

/// A whole chat answer as a `response` object.
pub fn whole(body: &[u8], context: Context) -> Result<Bytes, ProxyError> {
    let completion = Completion::parse(body).map_err(ProxyError::UnreadableAnswer)?;
    Ok(response::whole(&completion, context).to_string().into())
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
            fuzz::timed("responses", || match prepare(&input, &store) {
                Err(ProxyError::InvalidField { field, .. }) => {
                    prop_assert!(!field.is_empty());
                    Ok(())
                }
                Ok(prepared) => {
                    prop_assert!(prepared.call.body["messages"].is_array());
                    Ok(())
                }
                Err(_) => Ok(()),
            })??;
        }
    }
}
