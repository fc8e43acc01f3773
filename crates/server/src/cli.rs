//! The flags every service binary takes, and the shape of its `main`.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::{self, ConfigError};

/// Flags shared by the five service binaries.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML config file; every field can also be set by a `BERTH_<SECTION>__<FIELD>` env var.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC address, `HOST:PORT` or `unix:///path` (sets server.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// HTTP address for metrics and HTTP APIs, empty to disable (sets server.http_listen).
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Sets any config field, e.g. `--set store.path=/var/lib/berth/state.db`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl CommonArgs {
    /// Loads the service's config with these flags applied last.
    pub fn load<T: DeserializeOwned + Serialize + Default>(&self) -> Result<T, ConfigError> {
        let mut overrides = config::parse_overrides(&self.overrides)?;
        if let Some(listen) = &self.listen {
            overrides.push(("server.listen".into(), listen.clone()));
        }
        if let Some(http) = &self.http_listen {
            overrides.push(("server.http_listen".into(), http.clone()));
        }
        config::load(self.config.as_deref(), &overrides)
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = terminate => tracing::info!("SIGTERM received"),
        }
        token.cancel();
    });
}

/// Prints a start-up or serving error the way every binary does, and gives
/// the exit code.
pub fn exit_with(service: &str, result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "{service}: error: {}",
                crate::client::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Flags of a service binary.
#[derive(Debug, clap::Parser)]
struct ServiceArgs {
    #[command(flatten)]
    common: CommonArgs,
}

/// The whole `main` of a service binary: parse flags, load the config (a
/// type with a `[server]` section), start telemetry, start the service with
/// `start`, stop it on SIGTERM/SIGINT. Errors go to stderr and exit 1.
pub fn service_main<C, F, Fut>(name: &'static str, about: &'static str, start: F) -> ExitCode
where
    C: DeserializeOwned + Serialize + Default + HasServerConfig,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<crate::RunningService, Box<dyn std::error::Error>>>,
{
    use clap::{CommandFactory, FromArgMatches};
    let matches = ServiceArgs::command()
        .name(name)
        .about(about)
        .version(env!("CARGO_PKG_VERSION"))
        .get_matches();
    let args = match ServiceArgs::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(error) => error.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return exit_with(name, Err(error.into())),
    };
    let result = runtime.block_on(async move {
        let config: C = args.common.load()?;
        let _telemetry = crate::telemetry::init(name, config.server_config())?;
        let running = start(config).await?;
        tracing::info!(grpc = %running.grpc_addr, http = ?running.http_addr, "{name} started");
        cancel_on_signal(running.shutdown_token());
        running.wait().await?;
        Ok(())
    });
    exit_with(name, result)
}

/// A service config that has the shared `[server]` section.
pub trait HasServerConfig {
    fn server_config(&self) -> &crate::ServerConfig;
}
