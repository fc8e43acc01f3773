//! Starting the service in-process for tests, with the real model when the
//! setup script has put it in the cache (the same rule the service uses).

#![allow(dead_code)] // each test file uses its own part of this module

use berth_embedding::Config;
use berth_proto::embedding::v1::embedding_client::EmbeddingClient;
use berth_server::RunningService;
use tonic::transport::Channel;

/// A config on free loopback ports.
pub fn config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.server.http_listen = "127.0.0.1:0".into();
    config.models.sessions = 1;
    // A debug build reads tokens several times slower than a release one,
    // so the default budget (10 s) would refuse some of these tests' larger
    // requests; tests/cost.rs sets its own.
    config.server.request_cpu_budget = std::time::Duration::from_secs(600);
    config
}

/// The default config if the model and ONNX Runtime are installed; None if
/// not (the test skips, or fails on CI: see berth_tests::parts).
pub fn with_model() -> Option<Config> {
    let config = config();
    let found = match config.models.first_missing_file() {
        None => Ok(config),
        Some(path) => Err(format!("{} is missing", path.display())),
    };
    berth_tests::require(berth_tests::Part::Model, found)
}

pub async fn grpc(running: &RunningService) -> EmbeddingClient<Channel> {
    EmbeddingClient::connect(running.grpc_uri()).await.unwrap()
}

/// One HTTP/1.1 request; the status and the body.
pub async fn http(
    running: &RunningService,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = running.http_addr.expect("HTTP port");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}
