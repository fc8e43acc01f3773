//! Listen addresses: `HOST:PORT` for TCP, `unix:///path` for a unix socket.
//! Binding happens before serving, so a port in use is reported at start-up
//! with the address and the field it came from.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, UnixListener};

/// An address that cannot be parsed or bound, naming the config field it
/// came from. [`crate::ServeError`] carries it as is.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{field} = \"{value}\" is not a valid address: {reason}")]
    BadAddress {
        field: String,
        value: String,
        reason: String,
    },
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        field: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `value`, naming `field` in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, ListenError> {
        if let Some(path) = value.strip_prefix("unix://") {
            if path.is_empty() || !path.starts_with('/') {
                return Err(ListenError::BadAddress {
                    field: field.to_string(),
                    value: value.to_string(),
                    reason: "a unix socket address is unix:///absolute/path".to_string(),
                });
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        value
            .parse::<SocketAddr>()
            .map(Self::Tcp)
            .map_err(|e| ListenError::BadAddress {
                field: field.to_string(),
                value: value.to_string(),
                reason: format!("{e} (expected HOST:PORT with an IP address, or unix:///path)"),
            })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// A bound gRPC listener.
#[derive(Debug)]
pub enum GrpcListener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl GrpcListener {
    pub async fn bind(field: &str, addr: &ListenAddr) -> Result<Self, ListenError> {
        let bind_error = |e: std::io::Error| ListenError::Bind {
            field: field.to_string(),
            addr: addr.to_string(),
            source: e,
        };
        match addr {
            ListenAddr::Tcp(socket) => TcpListener::bind(socket)
                .await
                .map(Self::Tcp)
                .map_err(bind_error),
            ListenAddr::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(bind_error)?;
                }
                remove_stale_socket(path).map_err(bind_error)?;
                let listener = UnixListener::bind(path).map_err(bind_error)?;
                // The agent can start root containers: only its owner may connect.
                set_owner_only(path).map_err(bind_error)?;
                Ok(Self::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address actually bound (the port is known even when 0 was asked).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Self::Tcp(listener) => listener
                .local_addr()
                .map(ListenAddr::Tcp)
                .unwrap_or_else(|_| ListenAddr::Unix(PathBuf::new())),
            Self::Unix { path, .. } => ListenAddr::Unix(path.clone()),
        }
    }
}

/// A socket file left by a process that is gone is replaced; one that a live
/// server still answers on is "address in use".
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "a server is already listening on this socket",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

fn set_owner_only(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            ListenAddr::parse("listen", "127.0.0.1:7700")
                .unwrap()
                .to_string(),
            "127.0.0.1:7700"
        );
        assert_eq!(
            ListenAddr::parse("listen", "unix:///run/berth/agent.sock").unwrap(),
            ListenAddr::Unix(PathBuf::from("/run/berth/agent.sock"))
        );
        let error = ListenAddr::parse("server.listen", "localhost:x")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server.listen") && error.contains("localhost:x"),
            "{error}"
        );
        assert!(ListenAddr::parse("listen", "unix://relative").is_err());
    }

    #[tokio::test]
    async fn port_in_use_names_port_and_field() {
        let first = GrpcListener::bind(
            "server.listen",
            &ListenAddr::parse("l", "127.0.0.1:0").unwrap(),
        )
        .await
        .unwrap();
        let taken = first.local_addr();
        let error = GrpcListener::bind("server.listen", &taken)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&taken.to_string()) && error.contains("server.listen"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn unix_socket_is_owner_only_and_stale_file_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        std::fs::write(&path, b"stale").unwrap();
        let addr = ListenAddr::Unix(path.clone());
        let bound = GrpcListener::bind("listen", &addr).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            GrpcListener::bind("listen", &addr).await.is_err(),
            "live socket must not be replaced"
        );
        drop(bound);
    }
}
