fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-llm-proxy",
        "berth LLM proxy: an OpenAI-compatible gateway configured like LiteLLM",
        |config| async move { Ok(berth_llm_proxy::start(config).await?) },
    )
}
