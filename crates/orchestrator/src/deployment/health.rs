//! Health checks of a replica, each bounded by the recipe's timeout: HTTP,
//! gRPC and TCP from the orchestrator to the replica's endpoint on its
//! host's address, exec through the replica's agent (so it works wherever
//! the agent does, SSH-tunnelled hosts included).

use std::time::Duration;

use berth_proto::agent::v1::{ExecRequest, exec_output};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::recipe::{CheckKind, HealthCheck};
use crate::hosts::{AgentClient, describe_status};

/// The most of an HTTP answer read to find its status line.
const HTTP_HEAD_BYTES: usize = 1024;

/// Where a check reaches the replica.
pub struct Target<'a> {
    /// The host's address and the replica's port of the check.
    pub address: Option<(&'a str, u16)>,
    pub client: &'a mut AgentClient,
    pub workload_id: &'a str,
}

/// Runs one check: `Ok` when healthy, else why not.
pub async fn check(health: &HealthCheck, target: Target<'_>) -> Result<(), String> {
    let timeout = health.timeout;
    let outcome = tokio::time::timeout(timeout, probe(health, target)).await;
    outcome.unwrap_or_else(|_| {
        Err(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))
    })
}

async fn probe(health: &HealthCheck, target: Target<'_>) -> Result<(), String> {
    if health.check == CheckKind::Exec {
        return exec(
            target.client,
            target.workload_id,
            &health.command,
            health.timeout,
        )
        .await;
    }
    let (host, port) = target
        .address
        .ok_or_else(|| "the replica has no address for its health port".to_string())?;
    match health.check {
        CheckKind::Tcp => TcpStream::connect((host, port))
            .await
            .map(drop)
            .map_err(|e| format!("tcp {host}:{port}: {e}")),
        CheckKind::Http => http(host, port, &health.path).await,
        CheckKind::Grpc => grpc(host, port, &health.service).await,
        CheckKind::Exec => unreachable!("handled above"),
    }
}

/// A GET answered with 2xx or 3xx. HTTP/1.0 with `Connection: close`, so
/// that the status line is all that has to be read.
async fn http(host: &str, port: u16, path: &str) -> Result<(), String> {
    let path = if path.is_empty() { "/" } else { path };
    let url = format!("http://{host}:{port}{path}");
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut head = Vec::with_capacity(HTTP_HEAD_BYTES);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < HTTP_HEAD_BYTES {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status_line = status_line.lines().next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET {url}: not an HTTP answer: `{status_line}`"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {url}: {status_line}"))
    }
}

async fn grpc(host: &str, port: u16, service: &str) -> Result<(), String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let endpoint = format!("http://{host}:{port}");
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|e| format!("grpc {endpoint}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("grpc {endpoint}: {e}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|s| format!("grpc health of {endpoint}: {}", describe_status(&s)))?
        .into_inner();
    if answer.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!(
            "grpc health of {endpoint}: {}",
            ServingStatus::try_from(answer.status).map_or("unknown status", |s| s.as_str_name())
        ))
    }
}

async fn exec(
    client: &mut AgentClient,
    workload_id: &str,
    command: &[String],
    timeout: Duration,
) -> Result<(), String> {
    let request = ExecRequest {
        workload_id: workload_id.to_string(),
        command: command.to_vec(),
        timeout: prost_types::Duration::try_from(timeout).ok(),
        ..Default::default()
    };
    let mut output = client
        .exec(request)
        .await
        .map_err(|s| format!("exec {command:?}: {}", describe_status(&s)))?
        .into_inner();
    while let Some(message) = output
        .message()
        .await
        .map_err(|s| format!("exec {command:?}: {}", describe_status(&s)))?
    {
        if let Some(exec_output::Output::Exit(exit)) = message.output {
            return if exit.exit_code == 0 {
                Ok(())
            } else {
                Err(format!("exec {command:?}: exit code {}", exit.exit_code))
            };
        }
    }
    Err(format!("exec {command:?}: ended without an exit status"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot HTTP server answering `status_line`.
    async fn serve_once(status_line: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 512];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(format!("{status_line}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await;
        });
        port
    }

    #[tokio::test]
    async fn http_checks_read_the_status_line() {
        let ok = serve_once("HTTP/1.1 200 OK").await;
        assert_eq!(http("127.0.0.1", ok, "/health").await, Ok(()));
        let failing = serve_once("HTTP/1.1 503 Service Unavailable").await;
        let error = http("127.0.0.1", failing, "/health").await.unwrap_err();
        assert!(error.ends_with("503 Service Unavailable"), "{error}");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap().port();
        drop(listener);
        assert!(http("127.0.0.1", closed, "/").await.is_err());
    }
}
