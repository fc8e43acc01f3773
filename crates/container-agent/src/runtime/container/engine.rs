//! The connection to one container engine over its Docker-compatible API
//! socket, and the [`Dialect`] trait that holds the few places where docker
//! and podman differ.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::common::v1::{GpuRequest, Runtime};
use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::{DeviceRequest, HostConfig};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::AgentError;

/// Seconds bollard waits for response headers (streams are not bounded by it).
const REQUEST_TIMEOUT_S: u64 = 120;
/// Largest JSON answer read by [`Engine::get_json`].
const MAX_JSON_BYTES: u64 = 64 << 20;
/// Where CDI specs live (the CDI spec's default directories).
const CDI_DIRS: [&str; 2] = ["/etc/cdi", "/var/run/cdi"];

/// What differs between engines that speak the Docker API.
pub trait Dialect: Send + Sync + 'static {
    fn runtime(&self) -> Runtime;
    fn name(&self) -> &'static str;
    /// Sockets tried in order when the config says `auto`.
    fn default_sockets(&self) -> Vec<PathBuf>;
    /// Puts a GPU request into the host config, or says why this host and
    /// engine cannot honour it.
    fn gpus(
        &self,
        request: &GpuRequest,
        versions: EngineVersions,
        host: &mut HostConfig,
    ) -> Result<(), AgentError>;
}

/// What an engine speaks and what it is, for features that depend on either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineVersions {
    /// The negotiated Docker API version, e.g. (1, 41).
    pub api: (usize, usize),
    /// The engine's own release, major and minor (docker 20.10, podman 4.3).
    pub engine: (usize, usize),
}

pub struct DockerDialect;
pub struct PodmanDialect;

fn unix_env(name: &str) -> Option<PathBuf> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.strip_prefix("unix://").map(PathBuf::from))
}

impl Dialect for DockerDialect {
    fn runtime(&self) -> Runtime {
        Runtime::Docker
    }

    fn name(&self) -> &'static str {
        "docker"
    }

    fn default_sockets(&self) -> Vec<PathBuf> {
        unix_env("DOCKER_HOST")
            .into_iter()
            .chain([PathBuf::from("/var/run/docker.sock")])
            .collect()
    }

    fn gpus(
        &self,
        request: &GpuRequest,
        versions: EngineVersions,
        host: &mut HostConfig,
    ) -> Result<(), AgentError> {
        let api = versions.api;
        let mut requests = Vec::new();
        if !request.cdi_devices.is_empty() {
            // Docker reads CDI devices from DeviceRequests only since Engine 25 (API 1.44).
            if api < (1, 44) {
                return Err(AgentError::Unsupported {
                    field: "spec.gpus.cdi_devices",
                    reason: format!(
                        "this docker engine speaks API {}.{} and has no CDI support (Docker Engine 25 / API 1.44 or newer); use count or device_ids",
                        api.0, api.1
                    ),
                });
            }
            check_cdi_specs(&request.cdi_devices)?;
            requests.push(cdi_request(request.cdi_devices.clone()));
        }
        if request.count != 0 || !request.device_ids.is_empty() {
            let driver = if request.driver.is_empty() {
                "nvidia"
            } else {
                request.driver.as_str()
            };
            if driver == "nvidia" {
                require_nvidia()?;
            }
            requests.push(DeviceRequest {
                driver: Some(driver.to_string()),
                count: request
                    .device_ids
                    .is_empty()
                    .then_some(i64::from(request.count)),
                device_ids: (!request.device_ids.is_empty()).then(|| request.device_ids.clone()),
                capabilities: Some(vec![vec!["gpu".to_string()]]),
                ..Default::default()
            });
        }
        host.device_requests = Some(requests);
        Ok(())
    }
}

impl Dialect for PodmanDialect {
    fn runtime(&self) -> Runtime {
        Runtime::Podman
    }

    fn name(&self) -> &'static str {
        "podman"
    }

    fn default_sockets(&self) -> Vec<PathBuf> {
        let user = std::env::var("XDG_RUNTIME_DIR")
            .ok()
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(&d).join("podman/podman.sock"));
        unix_env("CONTAINER_HOST")
            .into_iter()
            .chain(user)
            .chain([PathBuf::from("/run/podman/podman.sock")])
            .collect()
    }

    /// podman ignores DeviceRequests; it takes CDI names as devices, so counts
    /// and ids become `nvidia.com/gpu=…` names.
    fn gpus(
        &self,
        request: &GpuRequest,
        versions: EngineVersions,
        host: &mut HostConfig,
    ) -> Result<(), AgentError> {
        if !request.driver.is_empty() && request.driver != "nvidia" {
            return Err(AgentError::InvalidArgument {
                field: "spec.gpus.driver",
                reason: format!(
                    "podman takes GPUs as CDI devices only; driver `{}` has no meaning there",
                    request.driver
                ),
            });
        }
        let mut names = request.cdi_devices.clone();
        if !request.device_ids.is_empty() {
            names.extend(
                request
                    .device_ids
                    .iter()
                    .map(|id| format!("nvidia.com/gpu={id}")),
            );
        } else if request.count == -1 {
            names.push("nvidia.com/gpu=all".into());
        } else if request.count > 0 {
            names.extend((0..request.count).map(|i| format!("nvidia.com/gpu={i}")));
        }
        if names.len() > request.cdi_devices.len() {
            require_nvidia()?;
        }
        check_cdi_specs(&names)?;
        // Podman's Docker-compatible API stats a CDI name put in
        // HostConfig.Devices as a host path, and before 5.4 ignores CDI
        // DeviceRequests too (measured on 4.3.1); 5.4 honours DeviceRequests
        // with driver "cdi" (containers/podman#25171).
        if versions.engine < (5, 4) {
            return Err(AgentError::Unsupported {
                field: "spec.gpus",
                reason: format!(
                    "podman {}.{} cannot attach CDI devices ({}) through its Docker-compatible API (podman 5.4 or newer can); upgrade podman, or use the docker runtime",
                    versions.engine.0,
                    versions.engine.1,
                    names.join(", ")
                ),
            });
        }
        host.device_requests = Some(vec![cdi_request(names)]);
        Ok(())
    }
}

fn cdi_request(names: Vec<String>) -> DeviceRequest {
    DeviceRequest {
        driver: Some("cdi".into()),
        device_ids: Some(names),
        ..Default::default()
    }
}

/// A GPU request on a host without NVIDIA devices fails here, clearly,
/// instead of as an engine error at start with a half-made container.
fn require_nvidia() -> Result<(), AgentError> {
    if Path::new("/dev/nvidiactl").exists() {
        return Ok(());
    }
    Err(AgentError::Unsupported {
        field: "spec.gpus",
        reason:
            "this host has no NVIDIA GPU (no /dev/nvidiactl): the request cannot be honoured here"
                .into(),
    })
}

/// Each CDI name `vendor/class=device` needs a spec of kind `vendor/class`.
fn check_cdi_specs(names: &[String]) -> Result<(), AgentError> {
    let specs: Vec<String> = CDI_DIRS
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .collect();
    for name in names {
        let Some((kind, device)) = name
            .split_once('=')
            .filter(|(k, d)| k.contains('/') && !d.is_empty())
        else {
            return Err(AgentError::InvalidArgument {
                field: "spec.gpus.cdi_devices",
                reason: format!("`{name}` is not a CDI device name (vendor/class=device)"),
            });
        };
        if !specs.iter().any(|spec| spec.contains(kind)) {
            return Err(AgentError::Unsupported {
                field: "spec.gpus",
                reason: format!(
                    "no CDI spec for `{kind}` (device `{device}`) in {}: this host cannot provide it",
                    CDI_DIRS.join(" or ")
                ),
            });
        }
    }
    Ok(())
}

/// The engine's socket and a negotiated client, made again after the engine
/// went away (its API version may have changed).
pub struct Engine {
    pub dialect: &'static dyn Dialect,
    pub socket: PathBuf,
    client: tokio::sync::Mutex<Option<Docker>>,
}

impl Engine {
    pub fn new(dialect: &'static dyn Dialect, socket: PathBuf) -> Self {
        Self {
            dialect,
            socket,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Resolves `configured` (`auto`, `off`, a path or `unix://` URL) to a
    /// socket, or says why there is none.
    pub fn locate(dialect: &dyn Dialect, configured: &str) -> Result<PathBuf, String> {
        match configured {
            "off" => Err("disabled by config (engines.*= \"off\")".into()),
            "auto" => {
                let candidates = dialect.default_sockets();
                candidates
                    .iter()
                    .find(|p| p.exists())
                    .cloned()
                    .ok_or_else(|| {
                        format!(
                            "no socket found (tried {})",
                            candidates
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            }
            path => Ok(PathBuf::from(path.strip_prefix("unix://").unwrap_or(path))),
        }
    }

    pub fn name(&self) -> &'static str {
        self.dialect.name()
    }

    /// A client that has negotiated the API version with the engine.
    pub async fn client(&self) -> Result<Docker, AgentError> {
        let mut client = self.client.lock().await;
        if let Some(docker) = client.as_ref() {
            return Ok(docker.clone());
        }
        let socket = self.socket.to_string_lossy();
        let docker =
            Docker::connect_with_unix(&socket, REQUEST_TIMEOUT_S, bollard::API_DEFAULT_VERSION)
                .map_err(|e| self.unavailable(e))?
                .negotiate_version()
                .await
                .map_err(|e| self.unavailable(e))?;
        let version = docker.client_version();
        tracing::info!(engine = self.name(), socket = %socket, api = %format!("{}.{}", version.major_version, version.minor_version), "connected to container engine");
        *client = Some(docker.clone());
        Ok(docker)
    }

    /// The negotiated API version, e.g. (1, 41).
    pub async fn api_version(&self) -> Result<(usize, usize), AgentError> {
        let version = self.client().await?.client_version();
        Ok((version.major_version, version.minor_version))
    }

    /// The API version and the engine's own release (asked of the engine).
    pub async fn versions(&self) -> Result<EngineVersions, AgentError> {
        let docker = self.client().await?;
        let api = self.api_version().await?;
        let release = match docker.version().await {
            Ok(version) => version.version.unwrap_or_default(),
            Err(e) => return Err(self.error("version", e).await),
        };
        Ok(EngineVersions {
            api,
            engine: major_minor(&release),
        })
    }

    /// Forgets the client: the next call connects and negotiates again.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    fn unavailable(&self, error: impl std::fmt::Display) -> AgentError {
        AgentError::EngineUnavailable {
            engine: self.name(),
            socket: self.socket.display().to_string(),
            reason: error.to_string(),
        }
    }

    /// Maps an engine error for `action`; a transport error drops the client
    /// so that the next call connects and negotiates again.
    pub async fn error(&self, action: &'static str, error: EngineError) -> AgentError {
        match error {
            EngineError::DockerResponseServerError { message, .. } => AgentError::Engine {
                engine: self.name(),
                action,
                message,
            },
            EngineError::SocketNotFoundError(_)
            | EngineError::IOError { .. }
            | EngineError::HyperResponseError { .. }
            | EngineError::HttpClientError { .. }
            | EngineError::HyperLegacyError { .. }
            | EngineError::RequestTimeoutError => {
                self.reset().await;
                self.unavailable(error)
            }
            other => AgentError::Engine {
                engine: self.name(),
                action,
                message: other.to_string(),
            },
        }
    }

    /// GET of a JSON document, decoded into our own lenient types rather than
    /// bollard's: bollard's enums reject states only podman reports (e.g.
    /// `stopped`), which would fail a whole listing. `None` on 404.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        action: &'static str,
        path_and_query: &str,
    ) -> Result<Option<T>, AgentError> {
        let (major, minor) = self.api_version().await?;
        let (status, body) = match self
            .raw_get(&format!("/v{major}.{minor}{path_and_query}"))
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                self.reset().await;
                return Err(self.unavailable(error));
            }
        };
        match status {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| AgentError::Engine {
                    engine: self.name(),
                    action,
                    message: format!("unexpected answer: {e}"),
                }),
            404 => Ok(None),
            _ => Err(AgentError::Engine {
                engine: self.name(),
                action,
                message: String::from_utf8_lossy(&body).trim().to_string(),
            }),
        }
    }

    /// HTTP/1.0, so the engine answers without chunking and closes.
    async fn raw_get(&self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let mut stream = tokio::net::UnixStream::connect(&self.socket).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: engine\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(REQUEST_TIMEOUT_S),
            (&mut stream).take(MAX_JSON_BYTES).read_to_end(&mut answer),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "engine did not answer")
        })??;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("malformed HTTP answer"))?;
        let status = std::str::from_utf8(&answer[..split])
            .ok()
            .and_then(|head| head.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed HTTP status line"))?;
        Ok((status, answer[split + 4..].to_vec()))
    }
}

/// The status code of an engine's error answer.
pub fn status_of(error: &EngineError) -> Option<u16> {
    match error {
        EngineError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// "4.3.1" → (4, 3); what is not a number counts as 0.
fn major_minor(release: &str) -> (usize, usize) {
    let mut parts = release
        .split(['.', '-', '+'])
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_20_10: EngineVersions = EngineVersions {
        api: (1, 41),
        engine: (20, 10),
    };
    const PODMAN_4_3: EngineVersions = EngineVersions {
        api: (1, 41),
        engine: (4, 3),
    };

    #[test]
    fn releases_read_as_major_minor() {
        assert_eq!(major_minor("4.3.1"), (4, 3));
        assert_eq!(major_minor("20.10.24+dfsg1"), (20, 10));
        assert_eq!(major_minor("5.4.0-rc1"), (5, 4));
        assert_eq!(major_minor(""), (0, 0));
    }

    /// What `dialect` answers a GPU request on this host, which must be a
    /// refusal.
    fn gpus_refusal(
        dialect: &dyn Dialect,
        request: &GpuRequest,
        versions: EngineVersions,
    ) -> AgentError {
        dialect
            .gpus(request, versions, &mut HostConfig::default())
            .unwrap_err()
    }

    fn request_for_cdi(device: &str) -> GpuRequest {
        GpuRequest {
            cdi_devices: vec![device.into()],
            ..Default::default()
        }
    }

    #[test]
    fn gpu_request_without_gpus_is_a_clear_error() {
        if Path::new("/dev/nvidiactl").exists() {
            return; // a GPU host honours it
        }
        let request = GpuRequest {
            count: 1,
            ..Default::default()
        };
        for (dialect, versions) in [
            (&DockerDialect as &dyn Dialect, DOCKER_20_10),
            (&PodmanDialect, PODMAN_4_3),
        ] {
            let error = gpus_refusal(dialect, &request, versions).to_string();
            assert!(
                error.contains("spec.gpus") && error.contains("no NVIDIA GPU"),
                "{error}"
            );
        }
    }

    #[test]
    fn cdi_on_an_old_docker_names_the_version() {
        let request = request_for_cdi("nvidia.com/gpu=all");
        let error = gpus_refusal(&DockerDialect, &request, DOCKER_20_10).to_string();
        assert!(
            error.contains("API 1.41") && error.contains("CDI"),
            "{error}"
        );
    }

    #[test]
    fn malformed_cdi_names_are_invalid() {
        let error = gpus_refusal(&PodmanDialect, &request_for_cdi("gpu0"), PODMAN_4_3);
        assert!(
            matches!(
                error,
                AgentError::InvalidArgument {
                    field: "spec.gpus.cdi_devices",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn locate_honours_off_and_paths() {
        assert!(Engine::locate(&DockerDialect, "off").is_err());
        assert_eq!(
            Engine::locate(&PodmanDialect, "unix:///tmp/p.sock").unwrap(),
            PathBuf::from("/tmp/p.sock")
        );
    }
}
