/// mimalloc returns the memory of an overload's connections to the system
/// once they close; glibc's malloc kept it (docs/benchmarks.md, issue #24).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-llm-proxy",
        "berth LLM proxy: an OpenAI-compatible gateway configured like LiteLLM",
        |config| async move { Ok(berth_llm_proxy::start(config).await?) },
    )
}
