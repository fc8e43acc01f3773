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
    /// `BERTH_CONFIG` names the file when the flag is not given (container images set it, so
    /// that `healthcheck` reads the same file as the server).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        global = true,
        env = "BERTH_CONFIG"
    )]
    pub config: Option<PathBuf>,
    /// gRPC address, `HOST:PORT` or `unix:///path` (sets server.listen).
    #[arg(long, value_name = "ADDR", global = true)]
    pub listen: Option<String>,
    /// HTTP address for metrics and HTTP APIs, empty to disable (sets server.http_listen).
    #[arg(long, value_name = "ADDR", global = true)]
    pub http_listen: Option<String>,
    /// Sets any config field, e.g. `--set store.path=/var/lib/berth/state.db`.
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
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

/// SIGTERM and SIGINT, caught from the moment this is made: a stop asked
/// for while the service starts (or the instant it is ready) is a clean
/// exit, never the default action that kills the process mid-write.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Registers both handlers now; needs a running tokio runtime.
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next of them to arrive, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }

    /// Cancels `token` on the first of them.
    fn cancel_on_first(mut self, token: CancellationToken) {
        tokio::spawn(async move {
            let signal = self.next().await;
            tracing::info!("{signal} received");
            token.cancel();
        });
    }
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
    #[command(subcommand)]
    command: Option<ServiceCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum ServiceCommand {
    /// Asks the service at its configured gRPC address (the same config, env
    /// and flags as serving) for grpc.health.v1 Check, and exits 0 if it is
    /// SERVING, 1 otherwise with the reason on one line. For container health
    /// checks: it needs no shell and no other tool in the image.
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct HealthcheckArgs {
    /// Service name to ask about; empty (the default) asks about the server as a whole.
    #[arg(long, default_value = "")]
    service: String,
    /// Longest wait for the connection and the answer together.
    #[arg(long, default_value = "5s", value_parser = humantime_serde::re::humantime::parse_duration)]
    timeout: std::time::Duration,
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
    if let Some(ServiceCommand::Healthcheck(check)) = &args.command {
        return healthcheck::<C>(name, &args.common, check);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return exit_with(name, Err(error.into())),
    };
    let result = runtime.block_on(async move {
        let mut signals = StopSignals::catch()?;
        let config: C = args.common.load()?;
        let _telemetry = crate::telemetry::init(name, config.server_config())?;
        // A stop while starting (a model loading, a store recovering) ends
        // the start where it is, as the signal's default would, but through
        // the usual exit: what was started is dropped, spans are flushed.
        let running = tokio::select! {
            running = start(config) => running?,
            signal = signals.next() => {
                tracing::info!("{signal} received while starting");
                return Ok(());
            }
        };
        tracing::info!(grpc = %running.grpc_addr, http = ?running.http_addr, "{name} started");
        signals.cancel_on_first(running.shutdown_token());
        running.wait().await?;
        Ok(())
    });
    exit_with(name, result)
}

/// A service config that has the shared `[server]` section.
pub trait HasServerConfig {
    fn server_config(&self) -> &crate::ServerConfig;
}

/// `<service> healthcheck`: loads the config as serving would, connects to
/// `server.listen` and asks grpc.health.v1 Check. Prints `SERVING` and exits 0,
/// or prints `<service>: unhealthy: <reason>` to stderr and exits 1.
fn healthcheck<C>(name: &str, common: &CommonArgs, check: &HealthcheckArgs) -> ExitCode
where
    C: DeserializeOwned + Serialize + Default + HasServerConfig,
{
    let result = (|| -> Result<(), String> {
        let config: C = common.load().map_err(|e| e.to_string())?;
        let address = health_address(&config.server_config().listen)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        runtime.block_on(async {
            match tokio::time::timeout(check.timeout, check_health(&address, &check.service)).await
            {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no answer from {address} within {}",
                    humantime_serde::re::humantime::format_duration(check.timeout)
                )),
            }
        })
    })();
    match result {
        Ok(()) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("{name}: unhealthy: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// The address a health check dials for `listen`: a wildcard bind address
/// (`0.0.0.0`, `::`) is asked on loopback.
fn health_address(listen: &str) -> Result<String, String> {
    match crate::listen::ListenAddr::parse("server.listen", listen).map_err(|e| e.to_string())? {
        crate::listen::ListenAddr::Unix(path) => Ok(format!("unix://{}", path.display())),
        crate::listen::ListenAddr::Tcp(mut addr) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            if addr.port() == 0 {
                return Err(format!(
                    "server.listen = \"{listen}\" has port 0: there is no fixed port to check"
                ));
            }
            Ok(format!("http://{addr}"))
        }
    }
}

async fn check_health(address: &str, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    // Health is served without the bearer token, so none is sent.
    let channel = crate::client::connect(address, "", std::time::Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| {
            format!(
                "grpc.health.v1 Check on {address}: {:?}: {}",
                status.code(),
                status.message()
            )
        })?;
    let status = response.into_inner().status;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(format!("{address} reports {}", other.as_str_name())),
        Err(_) => Err(format!("{address} reports unknown status {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_address_dials_loopback_for_wildcards() {
        assert_eq!(
            health_address("0.0.0.0:7700").unwrap(),
            "http://127.0.0.1:7700"
        );
        assert_eq!(health_address("[::]:7700").unwrap(), "http://[::1]:7700");
        assert_eq!(
            health_address("10.1.2.3:7702").unwrap(),
            "http://10.1.2.3:7702"
        );
        assert_eq!(
            health_address("unix:///run/berth/agent.sock").unwrap(),
            "unix:///run/berth/agent.sock"
        );
        assert!(
            health_address("127.0.0.1:0")
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            health_address("nope")
                .unwrap_err()
                .contains("server.listen")
        );
    }
}
