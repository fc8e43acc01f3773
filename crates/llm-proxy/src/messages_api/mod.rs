//! `POST /v1/messages`: Anthropic's Messages API inbound, for every model the
//! proxy serves. A request becomes the internal chat-completions call
//! (`request`), and its answer, whole or streamed, an Anthropic answer
//! (`response`); the upstream may speak either API.

mod request;
mod response;

use bytes::Bytes;
use serde_json::Value;

pub use response::Events;

use crate::chat::Completion;
use crate::error::ProxyError;
use crate::gateway::Call;
use crate::providers::Endpoint;

/// The call a Messages request body asks for.
pub fn call(bytes: &[u8]) -> Result<Call, ProxyError> {
    let body: Value =
        serde_json::from_slice(bytes).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
    Call::from_body(Endpoint::ChatCompletions, request::to_chat(body)?)
}

/// A whole chat answer as a Messages answer for `model`.
pub fn whole(body: &[u8], model: &str) -> Result<Bytes, ProxyError> {
    let completion = Completion::parse(body).map_err(ProxyError::UnreadableAnswer)?;
    Ok(response::whole(&completion, model).to_string().into())
}

/// Fuzz target `messages` (seeds in `tests/fuzz_corpus/messages/`): any body
/// is a call or a refusal, never a panic; a refused field is named.
#[cfg(test)]
mod fuzz {
    use berth_tests::fuzz;
    use proptest::prelude::*;

    use super::*;

    const KEYS: &[&[u8]] = &[
        b"18446744073709551616",
        b"\"type\":\"text\"",
        b"\"type\":\"tool_use\"",
        b"\"type\":\"tool_result\"",
        b"\"type\":\"image\"",
        b"\"tool_use_id\":\"toolu_1\"",
        b"\"role\":\"assistant\"",
        b"\"content\":",
        b"\"messages\":[",
        b"\\u0000",
    ];

    proptest! {
        #![proptest_config(fuzz::config())]

        #[test]
        fn any_body_is_a_call_or_a_named_refusal(
            input in fuzz::inputs(fuzz::corpus(env!("CARGO_MANIFEST_DIR"), "messages"), fuzz::json_tokens(KEYS)),
        ) {
            fuzz::timed("messages", || match call(&input) {
                Err(ProxyError::InvalidField { field, .. }) => {
                    prop_assert!(!field.is_empty());
                    Ok(())
                }
                Ok(call) => {
                    prop_assert!(call.body["messages"].is_array());
                    Ok(())
                }
                Err(_) => Ok(()),
            })??;
        }
    }
}
