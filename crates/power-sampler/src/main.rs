fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-power-sampler",
        "berth power sampler: energy per run from NVML, RAPL or a replayed trace",
        |config| async move { Ok(berth_power_sampler::start(config).await?) },
    )
}
