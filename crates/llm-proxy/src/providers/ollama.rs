//! Ollama, through the OpenAI-compatible API it serves under `/v1`
//! (<https://github.com/ollama/ollama/blob/main/docs/openai.md>). Ollama
//! ignores parameters it does not know, so like LiteLLM the proxy refuses
//! them unless `drop_params` is set, rather than letting them vanish.

/// Parameters Ollama's OpenAI-compatible endpoints honour.
pub(super) const SUPPORTED: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "input",
    "suffix",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "dimensions",
    "encoding_format",
    "user",
];
