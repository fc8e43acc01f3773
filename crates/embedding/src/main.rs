fn main() -> std::process::ExitCode {
    berth_server::cli::service_main(
        "berth-embedding",
        "berth embedding service: sentence embeddings over gRPC and HTTP",
        |config| async move { Ok(berth_embedding::start(config).await?) },
    )
}
