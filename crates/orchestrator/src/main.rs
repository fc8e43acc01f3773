fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-orchestrator",
        "berth orchestrator: runs campaigns across the agents of many hosts",
        |config| async move { Ok(berth_orchestrator::start(config).await?) },
    )
}
