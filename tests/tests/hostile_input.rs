//! Hostile input, end to end: the real binaries of the llm-proxy, the power
//! sampler, the agent (process runtime, unix socket), the orchestrator and
//! the embedding service (when its model is installed), each driven with
//! malformed
//! requests over gRPC and HTTP: oversized, deeply nested, invalid UTF-8,
//! wrong types, huge repeated fields, a stream opened and abandoned, and a
//! slowloris client. Each is answered with the right status within
//! [`ANSWER_WITHIN`], its peak RSS grows by less than [`MAX_RSS_GROWTH_KIB`]
//! (the peak is reset before each case), and the service serves a good
//! request afterwards, its RSS back within that of where it started and
//! its open file descriptors (connections included) back within
//! [`MAX_FD_GROWTH`] of where they started. Each case prints its figures
//! (`--nocapture`): docs/benchmarks.md has them.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{CreateWorkloadRequest, ExecRequest, InfoRequest};
use berth_proto::common::v1::{EnvVar, Runtime, WorkloadSpec};
use berth_proto::embedding::v1::EmbedRequest;
use berth_proto::llmproxy::v1::{ChatCompletionRequest, ChatMessage, ListModelsRequest};
use berth_proto::power::v1::{ListDevicesRequest, StartSessionRequest};
use berth_server::client::AuthChannel;
use berth_tests::{Part, Process, free_port, require, wait_for};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Longest a refusal may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Most a service's peak RSS may grow in one case, and its RSS over all.
const MAX_RSS_GROWTH_KIB: u64 = 50 << 10;
/// Most file descriptors a service may hold after all cases beyond those it
/// held before them: the test's own client connections still open.
const MAX_FD_GROWTH: usize = 8;
/// Most tasks a service may have alive after all cases beyond those it had
/// before them: one for a connection of the test's still being closed. A
/// task left behind by each refused request would be dozens.
const MAX_TASK_GROWTH: f64 = 1.0;
/// The gauge of the tasks alive on a service's runtime.
const ALIVE_TASKS: &str = "berth_runtime_alive_tasks";
/// The header timeout the services are started with, so the slowloris case
/// is short.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The file descriptors a process holds open (its sockets among them).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's fd directory")
        .count()
}

/// A running service under test: its process and the RSS and file
/// descriptors it started from.
struct Target {
    name: &'static str,
    process: Process,
    /// The HTTP address of its `/metrics`.
    metrics_addr: String,
    baseline_kib: u64,
    baseline_fds: usize,
    baseline_tasks: f64,
}

impl Target {
    async fn new(name: &'static str, process: Process, metrics_addr: &str) -> Self {
        let pid = process.child.id();
        Self {
            name,
            baseline_kib: status_kib(pid, "VmRSS"),
            baseline_fds: open_fds(pid),
            baseline_tasks: metric(metrics_addr, ALIVE_TASKS).await,
            metrics_addr: metrics_addr.to_string(),
            process,
        }
    }

    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Runs one case, checks its answer, time and peak RSS growth, and
    /// prints its figures.
    async fn case<F: Future<Output = String>>(&self, case: &str, run: F) {
        // Writing 5 to clear_refs resets VmHWM to the current RSS.
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .expect("reset the peak RSS");
        let before = status_kib(self.pid(), "VmRSS");
        let started = Instant::now();
        let answer = run.await;
        let took = started.elapsed();
        let growth = status_kib(self.pid(), "VmHWM").saturating_sub(before);
        println!(
            "hostile {} | {case} | {answer} | {:.1} ms | peak RSS +{growth} KiB",
            self.name,
            took.as_secs_f64() * 1000.0,
        );
        assert!(
            took < ANSWER_WITHIN,
            "{} {case}: answered after {took:?}",
            self.name
        );
        assert!(
            growth < MAX_RSS_GROWTH_KIB,
            "{} {case}: peak RSS grew by {growth} KiB",
            self.name
        );
    }

    /// After all cases the service's RSS is back within the bound of where
    /// it started, and it holds no more file descriptors (connections
    /// included) than it did, but for the test's own clients. A connection
    /// the client dropped may take the server a moment to close.
    async fn check_nothing_held(&self) {
        let now = status_kib(self.pid(), "VmRSS");
        let growth = now.saturating_sub(self.baseline_kib);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut fds = open_fds(self.pid());
        let mut tasks = metric(&self.metrics_addr, ALIVE_TASKS).await;
        while (fds > self.baseline_fds + MAX_FD_GROWTH
            || tasks > self.baseline_tasks + MAX_TASK_GROWTH)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            fds = open_fds(self.pid());
            tasks = metric(&self.metrics_addr, ALIVE_TASKS).await;
        }
        println!(
            "hostile {} | RSS at start {} KiB, after all cases {now} KiB (+{growth} KiB) | fds {} → {fds} | tasks {} → {tasks}",
            self.name, self.baseline_kib, self.baseline_fds, self.baseline_tasks
        );
        assert!(
            growth < MAX_RSS_GROWTH_KIB,
            "{}: RSS stayed {growth} KiB above where it started",
            self.name
        );
        assert!(
            fds <= self.baseline_fds + MAX_FD_GROWTH,
            "{}: holds {fds} file descriptors after the cases, {} before",
            self.name,
            self.baseline_fds
        );
        assert!(
            tasks <= self.baseline_tasks + MAX_TASK_GROWTH,
            "{}: {tasks} tasks alive after the cases, {} before",
            self.name,
            self.baseline_tasks
        );
    }
}

/// One HTTP/1.1 request written as it is; the status line's code.
async fn http_raw(addr: &str, request: &[u8]) -> u16 {
    http_raw_answer(addr, request).await.0
}

/// One HTTP/1.1 request written as it is; the status line's code and the
/// whole answer as text.
async fn http_raw_answer(addr: &str, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before all of a large body is sent.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    (status, text)
}

async fn http_post(addr: &str, path: &str, body: &[u8]) -> u16 {
    http_post_answer(addr, path, body).await.0
}

async fn http_post_answer(addr: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    http_raw_answer(addr, &request).await
}

async fn http_get(addr: &str, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    http_raw(addr, request.as_bytes()).await
}

/// Asserts an HTTP status among `expected`; the answer as printed.
fn expect_http(status: u16, expected: &[u16]) -> String {
    assert!(
        expected.contains(&status),
        "HTTP {status}, expected {expected:?}"
    );
    format!("HTTP {status}")
}

/// A slowloris client: headers a byte per 100 ms. The service cuts it off
/// within its header timeout and serves `good_path` meanwhile.
async fn slowloris(target: &Target, addr: &str, good_path: &str) {
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let head = format!("GET {good_path} HTTP/1.1\r\nhost: {addr}\r\nx-slow: ");
    let mut bytes = head.bytes().chain(std::iter::repeat(b'a'));
    let mut answer = Vec::new();
    loop {
        let byte = bytes.next().expect("endless");
        if slow.write_all(&[byte]).await.is_err() {
            break;
        }
        assert_eq!(
            http_get(addr, good_path).await,
            200,
            "others are served meanwhile"
        );
        let mut buffer = [0; 256];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buffer[..n]);
                break;
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < HEADER_TIMEOUT * 5,
            "{}: a slowloris client was never cut off",
            target.name
        );
    }
    let waited = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    println!(
        "hostile {} | slowloris (a header byte per 100 ms) | cut off ({}) | {:.1} s | header timeout {:?}",
        target.name,
        if answer.is_empty() { "closed" } else { "408" },
        waited.as_secs_f64(),
        HEADER_TIMEOUT
    );
    assert!(waited < HEADER_TIMEOUT * 3, "cut off after {waited:?}");
}

/// gRPC messages as raw bytes, to send what no generated client would.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// A unary call of `method` (`/package.Service/Method`) with `message` as
/// its bytes; the status it ends with.
async fn grpc_raw_status(
    channel: &AuthChannel,
    method: &'static str,
    message: Vec<u8>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    match grpc.unary(tonic::Request::new(message), path, Raw).await {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

/// [`grpc_raw_status`]'s code.
async fn grpc_raw(channel: &AuthChannel, method: &'static str, message: Vec<u8>) -> Code {
    grpc_raw_status(channel, method, message).await.code()
}

/// Asserts a gRPC code among `expected`; the answer as printed.
fn expect_code(code: Code, expected: &[Code]) -> String {
    assert!(expected.contains(&code), "{code:?}, expected {expected:?}");
    format!("{code:?}")
}

/// `field` (a string or bytes field number) holding `bytes`, as protobuf encodes it.
fn length_delimited(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// A message of a string field over a service's limit on messages.
fn oversized_message(limit: usize) -> Vec<u8> {
    length_delimited(1, &vec![b'x'; limit + 1])
}

/// `count` empty entries of repeated message field `field`, 2 bytes each:
/// the most a decoder builds per byte received.
fn empty_entries(field: u32, count: usize) -> Vec<u8> {
    length_delimited(field, &[]).repeat(count)
}

/// The common cases over gRPC: invalid UTF-8 in a string field (field 1 of
/// `method`'s request is a string), a message over the service's size
/// limit, and as many empty entries of a repeated field as the limit takes
/// (up to 1M).
async fn grpc_cases(
    target: &Target,
    channel: &AuthChannel,
    method: &'static str,
    max_message: usize,
    repeated_field: u32,
) {
    // gRPC's status table: a request that does not parse is INTERNAL.
    target
        .case("gRPC invalid UTF-8 in a string", async {
            expect_code(
                grpc_raw(channel, method, length_delimited(1, b"\xff\xfe\xc3\x28")).await,
                &[Code::Internal],
            )
        })
        .await;
    target
        .case("gRPC message over the size limit", async {
            expect_code(
                grpc_raw(channel, method, oversized_message(max_message)).await,
                &[Code::OutOfRange, Code::ResourceExhausted],
            )
        })
        .await;
    // At most 1M: decoding the embedding service's 16 MiB of them takes
    // ~4 s in a debug build (docs/benchmarks.md).
    let entries = (max_message / 2 - 16).min(1_000_000);
    target
        .case(&format!("gRPC {entries} empty repeated entries"), async {
            expect_code(
                grpc_raw(channel, method, empty_entries(repeated_field, entries)).await,
                &[
                    Code::InvalidArgument,
                    Code::NotFound,
                    Code::ResourceExhausted,
                ],
            )
        })
        .await;
}

/// A server-streaming call opened and dropped at once, many times: the
/// service neither leaks nor stops serving.
async fn abandoned_streams(
    target: &Target,
    channel: &AuthChannel,
    method: &'static str,
    message: Vec<u8>,
) {
    target
        .case("100 streams opened and abandoned", async {
            for _ in 0..100 {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.expect("ready");
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
                let call = grpc.server_streaming(tonic::Request::new(message.clone()), path, Raw);
                // Dropped before or just after its headers.
                let _ = tokio::time::timeout(Duration::from_millis(1), call).await;
            }
            "dropped".to_string()
        })
        .await;
}

/// The HTTP cases every JSON endpoint gets: a body over the limit
/// (declared, and sent chunked), deeply nested JSON, invalid UTF-8, wrong
/// types, and a huge array of small objects under the limit.
async fn json_cases(target: &Target, addr: &str, path: &str, max_body: usize) {
    target
        .case("HTTP body over the limit (with its length)", async {
            expect_http(
                http_post(addr, path, &vec![b' '; max_body + 1]).await,
                &[413],
            )
        })
        .await;
    target
        .case("HTTP body over the limit (chunked)", async {
            let mut request = format!(
                "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            )
            .into_bytes();
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..=(max_body >> 20) {
                request.extend(format!("{:x}\r\n", chunk.len()).bytes());
                request.extend(&chunk);
                request.extend(b"\r\n");
            }
            request.extend(b"0\r\n\r\n");
            expect_http(http_raw(addr, &request).await, &[413])
        })
        .await;
    target
        .case("HTTP JSON nested 100000 deep", async {
            let body = format!("{{\"model\":\"m\",\"input\":{}}}", "[".repeat(100_000));
            expect_http(http_post(addr, path, body.as_bytes()).await, &[400, 422])
        })
        .await;
    target
        .case("HTTP invalid UTF-8", async {
            expect_http(
                http_post(
                    addr,
                    path,
                    b"{\"model\":\"\xff\xfe\",\"input\":\"\xc3\x28\"}",
                )
                .await,
                &[400, 422],
            )
        })
        .await;
    target
        .case("HTTP wrong types", async {
            expect_http(
                http_post(addr, path, br#"{"model":5,"input":{"a":1},"stream":"yes"}"#).await,
                &[400, 422],
            )
        })
        .await;
    target
        .case("HTTP 1M small objects under the limit", async {
            let mut body = String::from("{\"model\":\"m\",\"input\":[");
            let item = "{\"a\":0},";
            let count = (max_body - 64) / item.len();
            body.push_str(&item.repeat(count.min(1_000_000)));
            body.push_str("{}]}");
            expect_http(
                http_post(addr, path, body.as_bytes()).await,
                &[400, 404, 413, 422],
            )
        })
        .await;
}

fn env_of(data: &Path) -> Vec<(&'static str, String)> {
    let dir = data.display().to_string();
    vec![
        ("XDG_DATA_HOME", dir.clone()),
        ("XDG_RUNTIME_DIR", dir),
        (
            "BERTH_SERVER__HTTP_HEADER_TIMEOUT",
            format!("{}ms", HEADER_TIMEOUT.as_millis()),
        ),
    ]
}

fn spawn(binary: &str, args: &[&str], env: &[(&str, String)]) -> Process {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Process::spawn(binary, args, &env)
}

/// A service on a gRPC and an HTTP port of its own (`args` after those),
/// once its gRPC port answers: the process, a channel to it, and its HTTP
/// address.
async fn serve(
    binary: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> (Process, AuthChannel, String) {
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut all = vec!["--listen", &grpc, "--http-listen", &http];
    all.extend_from_slice(args);
    let process = spawn(binary, &all, env);
    let channel = wait_for(&format!("http://{grpc}")).await;
    (process, channel, http)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_llm_proxy_refuses_hostile_input_in_bounded_time_and_memory() {
    let data = tempfile::tempdir().unwrap();
    let litellm = data.path().join("litellm.yaml");
    // An upstream nothing listens on: the cases never get that far.
    std::fs::write(
        &litellm,
        "model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, api_base: 'http://127.0.0.1:9/v1'}\n",
    )
    .unwrap();
    let mut env = env_of(data.path());
    env.push(("BERTH_PROXY__LITELLM_CONFIG", litellm.display().to_string()));
    let (process, channel, addr) = serve("berth-llm-proxy", &[], &env).await;
    assert_eq!(http_get(&addr, "/v1/models").await, 200);
    let target = Target::new("llm-proxy", process, &addr).await;

    json_cases(&target, &addr, "/v1/embeddings", 8 << 20).await;
    json_cases(&target, &addr, "/v1/chat/completions", 8 << 20).await;
    grpc_cases(
        &target,
        &channel,
        "/berth.llmproxy.v1.LlmProxy/ChatCompletion",
        1 << 20,
        2,
    )
    .await;
    target
        .case("gRPC extra_json nested 100000 deep", async {
            let request = ChatCompletionRequest {
                model: "m".into(),
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                    name: String::new(),
                }],
                extra_json: format!("{{\"x\":{}}}", "[".repeat(100_000)),
                ..Default::default()
            };
            expect_code(
                grpc_raw(
                    &channel,
                    "/berth.llmproxy.v1.LlmProxy/ChatCompletion",
                    request.encode_to_vec(),
                )
                .await,
                &[Code::InvalidArgument, Code::ResourceExhausted],
            )
        })
        .await;
    abandoned_streams(
        &target,
        &channel,
        "/berth.llmproxy.v1.LlmProxy/ChatCompletionStream",
        ChatCompletionRequest {
            model: "m".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;
    slowloris(&target, &addr, "/v1/models").await;

    assert_eq!(http_get(&addr, "/v1/models").await, 200, "still serves");
    assert_eq!(
        grpc_raw(
            &channel,
            "/berth.llmproxy.v1.LlmProxy/ListModels",
            ListModelsRequest {}.encode_to_vec()
        )
        .await,
        Code::Ok
    );
    target.check_nothing_held().await;
}

/// The llm-proxy's CPU budget in [`the_llm_proxy_stops_a_body_costlier_than_its_cpu_budget`]:
/// far less than parsing the body below takes, in a debug build or release.
const PROXY_CPU_BUDGET: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread")]
async fn the_llm_proxy_stops_a_body_costlier_than_its_cpu_budget() {
    let data = tempfile::tempdir().unwrap();
    let litellm = data.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        "model_list:\n  - model_name: m\n    litellm_params: {model: openai/m, api_base: 'http://127.0.0.1:9/v1'}\n",
    )
    .unwrap();
    let http = free_port();
    let mut env = env_of(data.path());
    env.extend([
        ("BERTH_PROXY__LITELLM_CONFIG", litellm.display().to_string()),
        (
            "BERTH_SERVER__REQUEST_CPU_BUDGET",
            format!("{}ms", PROXY_CPU_BUDGET.as_millis()),
        ),
    ]);
    let process = spawn(
        "berth-llm-proxy",
        &[
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
        ],
        &env,
    );
    let addr = format!("127.0.0.1:{http}");
    wait_for_http(&addr, "/v1/models").await;
    let target = Target::new("llm-proxy", process, &addr).await;

    // Within proxy.max_request_bytes (8 MiB) and max_request_json_bytes
    // (32 MiB estimated): 1M escaped characters, 6 MiB, one string.
    let body = format!(
        "{{\"model\":\"m\",\"input\":\"{}\"}}",
        "\\u00e9".repeat(1 << 20)
    );
    target
        .case("HTTP 6 MiB of escapes, over a 1 ms CPU budget", async {
            let started = Instant::now();
            let (status, answer) = http_post_answer(&addr, "/v1/embeddings", body.as_bytes()).await;
            assert!(
                answer.contains("server.request_cpu_budget"),
                "HTTP {status}: {answer}"
            );
            assert!(started.elapsed() < PROXY_CPU_BUDGET + Duration::from_secs(1));
            expect_http(status, &[429])
        })
        .await;
    assert_eq!(http_get(&addr, "/v1/models").await, 200, "still serves");
    target.check_nothing_held().await;
}

/// Waits until `path` answers 200 on `addr`.
async fn wait_for_http(addr: &str, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(addr, path).await, 200);
}

/// The orchestrator over gRPC and its HTTP listener (its manifests and
/// recipes have their own cases in hostile_manifest.rs).
#[tokio::test(flavor = "multi_thread")]
async fn the_orchestrator_refuses_hostile_input_in_bounded_time_and_memory() {
    let data = tempfile::tempdir().unwrap();
    let store = format!("store.path={}", data.path().join("state.db").display());
    let (process, channel, addr) = serve(
        "berth-orchestrator",
        &["--set", &store],
        &env_of(data.path()),
    )
    .await;
    let list = "/berth.orchestrator.v1.Orchestrator/ListCampaigns";
    assert_eq!(grpc_raw(&channel, list, Vec::new()).await, Code::Ok);
    let target = Target::new("orchestrator", process, &addr).await;

    // RegisterHost: field 1 is the host's name, field 4 its labels (a map:
    // repeated entries); a request may be manifest.max_bytes (1 MiB) and
    // 64 KiB more.
    grpc_cases(
        &target,
        &channel,
        "/berth.orchestrator.v1.Orchestrator/RegisterHost",
        (1 << 20) + (64 << 10),
        4,
    )
    .await;
    abandoned_streams(
        &target,
        &channel,
        "/berth.orchestrator.v1.Orchestrator/WatchCampaign",
        length_delimited(1, b"no-such-campaign"),
    )
    .await;
    slowloris(&target, &addr, "/metrics").await;

    assert_eq!(grpc_raw(&channel, list, Vec::new()).await, Code::Ok);
    assert_eq!(http_get(&addr, "/metrics").await, 200);
    target.check_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_power_sampler_refuses_hostile_input_in_bounded_time_and_memory() {
    let data = tempfile::tempdir().unwrap();
    let trace = berth_tests::repo_root().join("examples/power/llm-inference.csv");
    let mut env = env_of(data.path());
    env.extend([
        ("BERTH_SAMPLER__NVML", "false".to_string()),
        ("BERTH_SAMPLER__POWERCAP_ROOT", String::new()),
        (
            "BERTH_SAMPLER__REPLAY_TRACES",
            format!("[\"{}\"]", trace.display()),
        ),
    ]);
    let (process, channel, addr) = serve("berth-power-sampler", &[], &env).await;
    let list = "/berth.power.v1.PowerSampler/ListDevices";
    assert_eq!(
        grpc_raw(&channel, list, ListDevicesRequest {}.encode_to_vec()).await,
        Code::Ok
    );
    let target = Target::new("power-sampler", process, &addr).await;

    grpc_cases(
        &target,
        &channel,
        "/berth.power.v1.PowerSampler/StartSession",
        64 << 10,
        2,
    )
    .await;
    target
        .case("gRPC 5000 unknown devices", async {
            let request = StartSessionRequest {
                run_id: "r".into(),
                devices: (0..5000).map(|i| format!("gpu{i}")).collect(),
                ..Default::default()
            };
            expect_code(
                grpc_raw(
                    &channel,
                    "/berth.power.v1.PowerSampler/StartSession",
                    request.encode_to_vec(),
                )
                .await,
                &[Code::InvalidArgument, Code::NotFound],
            )
        })
        .await;
    abandoned_streams(
        &target,
        &channel,
        "/berth.power.v1.PowerSampler/StreamSamples",
        length_delimited(1, b"no-such-session"),
    )
    .await;
    slowloris(&target, &addr, "/metrics").await;

    assert_eq!(
        grpc_raw(&channel, list, ListDevicesRequest {}.encode_to_vec()).await,
        Code::Ok
    );
    assert_eq!(http_get(&addr, "/metrics").await, 200);
    target.check_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_hostile_input_in_bounded_time_and_memory() {
    let data = tempfile::tempdir().unwrap();
    let socket = data.path().join("agent.sock");
    let listen = format!("unix://{}", socket.display());
    let mut env = env_of(data.path());
    env.extend([
        ("BERTH_ENGINES__DOCKER", "off".to_string()),
        ("BERTH_ENGINES__PODMAN", "off".to_string()),
        ("BERTH_LIBVIRT__URI", "off".to_string()),
        (
            "BERTH_ENGINES__STATE_DIR",
            data.path().join("state").display().to_string(),
        ),
    ]);
    let http = format!("127.0.0.1:{}", free_port());
    let process = spawn(
        "berth-agent",
        &["--listen", &listen, "--http-listen", &http],
        &env,
    );
    let channel = wait_for(&listen).await;
    let mut agent = ContainerAgentClient::new(channel.clone());
    agent.info(InfoRequest {}).await.expect("Info");
    let target = Target::new("agent", process, &http).await;
    let create = "/berth.agent.v1.ContainerAgent/CreateWorkload";

    grpc_cases(&target, &channel, create, 1 << 20, 2).await;
    target
        .case("gRPC spec of 500k empty env vars (1 MiB)", async {
            let mut spec = Vec::new();
            prost::encoding::encode_key(1, prost::encoding::WireType::Varint, &mut spec);
            prost::encoding::encode_varint(Runtime::Process as u64, &mut spec);
            spec.extend(empty_entries(4, 500_000));
            let mut request = length_delimited(1, b"w");
            request.extend(length_delimited(2, &spec));
            expect_code(
                grpc_raw(&channel, create, request).await,
                &[Code::InvalidArgument],
            )
        })
        .await;
    let process_spec = |f: fn(&mut WorkloadSpec)| {
        let mut spec = WorkloadSpec {
            runtime: Runtime::Process as i32,
            ..Default::default()
        };
        f(&mut spec);
        CreateWorkloadRequest {
            name: "w".into(),
            spec: Some(spec),
        }
        .encode_to_vec()
    };
    let spec_cases: [(&str, Vec<u8>); 4] = [
        (
            "gRPC spec with 100000 env vars",
            process_spec(|s| {
                s.env = vec![
                    EnvVar {
                        name: "A".into(),
                        value: "1".into()
                    };
                    100_000
                ];
            }),
        ),
        (
            "gRPC spec with 50000 labels",
            process_spec(|s| {
                s.labels = (0..50_000)
                    .map(|i| (i.to_string(), String::new()))
                    .collect()
            }),
        ),
        (
            "gRPC spec with a 512 KiB argument",
            process_spec(|s| s.command = vec!["sh".into(), "x".repeat(512 << 10)]),
        ),
        (
            "gRPC spec with a NUL in an argument",
            process_spec(|s| s.command = vec!["sh\0".into()]),
        ),
    ];
    for (case, message) in spec_cases {
        target
            .case(case, async {
                expect_code(
                    grpc_raw(&channel, create, message).await,
                    &[Code::InvalidArgument],
                )
            })
            .await;
    }
    target
        .case("gRPC workload name of 512 KiB", async {
            let request = CreateWorkloadRequest {
                name: "w".repeat(512 << 10),
                spec: Some(WorkloadSpec {
                    runtime: Runtime::Process as i32,
                    ..Default::default()
                }),
            };
            expect_code(
                grpc_raw(&channel, create, request.encode_to_vec()).await,
                &[Code::InvalidArgument],
            )
        })
        .await;
    abandoned_streams(
        &target,
        &channel,
        "/berth.agent.v1.ContainerAgent/Exec",
        ExecRequest {
            workload_id: "nope".into(),
            command: vec!["true".into()],
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .await;

    agent.info(InfoRequest {}).await.expect("still serves");
    target.check_nothing_held().await;
}

/// The embedding service's defaults: `server.max_message_bytes` (gRPC;
/// prost builds 24 bytes per 2-byte empty text before anything checks
/// them, so the limit bounds that) and `limits.max_http_body_bytes`.
const EMBEDDING_MAX_MESSAGE: usize = 2 << 20;
const EMBEDDING_MAX_HTTP_BODY: usize = 16 << 20;

/// The gRPC limit is the configured one, and at the default one the
/// costliest message (as many empty texts as it holds, which prost builds
/// before anything checks them) is answered within the bounds. Model or
/// not: the message is decoded, or refused, before the model is asked.
#[tokio::test(flavor = "multi_thread")]
async fn the_embedding_grpc_limit_is_server_max_message_bytes() {
    let data = tempfile::tempdir().unwrap();
    let embed = "/berth.embedding.v1.Embedding/Embed";
    for limit in [EMBEDDING_MAX_MESSAGE, 100_000] {
        let (grpc, http) = (free_port(), format!("127.0.0.1:{}", free_port()));
        let mut env = env_of(data.path());
        env.push(("BERTH_MODELS__SESSIONS", "1".to_string()));
        if limit != EMBEDDING_MAX_MESSAGE {
            env.push(("BERTH_SERVER__MAX_MESSAGE_BYTES", limit.to_string()));
        }
        let process = spawn(
            "berth-embedding",
            &[
                "--listen",
                &format!("127.0.0.1:{grpc}"),
                "--http-listen",
                &http,
            ],
            &env,
        );
        let channel = wait_for(&format!("http://127.0.0.1:{grpc}")).await;
        // A first request, so that the RSS measured from is that of a
        // service that has served (the model's first run, if installed).
        let good = EmbedRequest {
            texts: vec!["a cat".into()],
            ..Default::default()
        };
        let first = grpc_raw(&channel, embed, good.encode_to_vec()).await;
        assert!(matches!(first, Code::Ok | Code::Unavailable), "{first:?}");
        let target = Target::new("embedding", process, &http).await;
        target
            .case(&format!("gRPC Embed over a {limit}-byte limit"), async {
                let status = grpc_raw_status(&channel, embed, oversized_message(limit)).await;
                assert!(
                    matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
                    "{status:?}"
                );
                assert!(
                    status
                        .message()
                        .contains(&format!("the limit is: {limit} bytes")),
                    "{status:?}"
                );
                format!("{:?}: {}", status.code(), status.message())
            })
            .await;
        let entries = limit / 2 - 16;
        target
            .case(&format!("gRPC Embed of {entries} empty texts"), async {
                // Too many texts with the model, no model without.
                expect_code(
                    grpc_raw(&channel, embed, empty_entries(2, entries)).await,
                    &[Code::InvalidArgument, Code::Unavailable],
                )
            })
            .await;
        target.check_nothing_held().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedding_service_refuses_hostile_input_in_bounded_time_and_memory() {
    let data = tempfile::tempdir().unwrap();
    let mut env = env_of(data.path());
    env.push(("BERTH_MODELS__SESSIONS", "1".to_string()));
    let (process, channel, addr) = serve("berth-embedding", &[], &env).await;
    let embed = "/berth.embedding.v1.Embedding/Embed";
    // Refused before it is decoded, model or not, naming the limit.
    let status = grpc_raw_status(&channel, embed, oversized_message(EMBEDDING_MAX_MESSAGE)).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("the limit is: {EMBEDDING_MAX_MESSAGE} bytes")),
        "{status:?}"
    );
    // The service's own status: the server's ("") is SERVING either way.
    let serving = berth_tests::health(channel.clone(), "berth.embedding.v1.Embedding").await;
    let model = serving == tonic_health::pb::health_check_response::ServingStatus::Serving;
    let found = if model {
        Ok(())
    } else {
        Err(format!(
            "berth-embedding is {serving:?}: the model is not in {} (scripts/setup-embedding-model.sh)",
            berth_tests::model_cache().display()
        ))
    };
    if require(Part::Model, found).is_none() {
        return;
    }
    let good = EmbedRequest {
        texts: vec!["a cat".into()],
        ..Default::default()
    };
    assert_eq!(
        grpc_raw(&channel, embed, good.encode_to_vec()).await,
        Code::Ok
    );
    let target = Target::new("embedding", process, &addr).await;

    json_cases(&target, &addr, "/v1/embeddings", EMBEDDING_MAX_HTTP_BODY).await;
    grpc_cases(&target, &channel, embed, EMBEDDING_MAX_MESSAGE, 2).await;
    slowloris(&target, &addr, "/health").await;

    assert_eq!(
        grpc_raw(&channel, embed, good.encode_to_vec()).await,
        Code::Ok
    );
    assert_eq!(http_get(&addr, "/health").await, 200);
    target.check_nothing_held().await;
}

/// The embedding service's CPU budget in
/// [`the_embedding_service_refuses_a_request_costlier_than_its_cpu_budget`]:
/// the request below is estimated at minutes of CPU on any machine.
const EMBEDDING_CPU_BUDGET: Duration = Duration::from_secs(1);

/// A line of the service's /metrics: the value of `name{labels}`.
async fn metric(addr: &str, series: &str) -> f64 {
    let request = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    let (_, answer) = http_raw_answer(addr, request.as_bytes()).await;
    answer
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

/// A request within every size limit (2048 texts of 990 bytes: 2 MiB of
/// gRPC, `limits.max_texts`, `max_text_bytes`, the queue) is estimated
/// before it is queued (crates/embedding/src/cost.rs) at 2048 × 256 tokens,
/// far over a 1 s budget, and refused at once, naming the budget, over gRPC
/// and HTTP; nothing is embedded, so memory stays near idle; a good request
/// is served afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_embedding_service_refuses_a_request_costlier_than_its_cpu_budget() {
    let data = tempfile::tempdir().unwrap();
    let mut env = env_of(data.path());
    env.extend([
        ("BERTH_MODELS__SESSIONS", "1".to_string()),
        (
            "BERTH_SERVER__REQUEST_CPU_BUDGET",
            format!("{}ms", EMBEDDING_CPU_BUDGET.as_millis()),
        ),
    ]);
    let (process, channel, addr) = serve("berth-embedding", &[], &env).await;
    let embed = "/berth.embedding.v1.Embedding/Embed";
    let serving = berth_tests::health(channel.clone(), "berth.embedding.v1.Embedding").await;
    let found = if serving == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!(
            "berth-embedding is {serving:?}: the model is not in {} (scripts/setup-embedding-model.sh)",
            berth_tests::model_cache().display()
        ))
    };
    if require(Part::Model, found).is_none() {
        return;
    }
    let good = EmbedRequest {
        texts: vec!["a cat".into()],
        ..Default::default()
    };
    assert_eq!(
        grpc_raw(&channel, embed, good.encode_to_vec()).await,
        Code::Ok
    );
    let rate = metric(
        &addr,
        "berth_embedding_tokens_per_second{model=\"all-MiniLM-L6-v2\"}",
    )
    .await;
    println!("hostile embedding | {rate:.0} tokens/s a session, measured at load");
    let target = Target::new("embedding", process, &addr).await;

    let text = "the quick brown fox jumps over the lazy dog ".repeat(23)[..990].to_string();
    let texts = vec![text; 2048];
    let message = EmbedRequest {
        texts: texts.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(message.len() < EMBEDDING_MAX_MESSAGE);
    // Were it embedded rather than refused, it would take minutes: the
    // test fails within seconds instead.
    let refused_within = ANSWER_WITHIN * 5;
    target
        .case(
            "gRPC Embed 2048 × 990 bytes, over a 1 s CPU budget",
            async {
                let status =
                    tokio::time::timeout(refused_within, grpc_raw_status(&channel, embed, message))
                        .await
                        .expect("refused rather than embedded");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("server.request_cpu_budget"),
                    "{status:?}"
                );
                assert_eq!(
                    berth_server::error_reason(&status),
                    Some(berth_server::error::reasons::REQUEST_BUDGET_EXCEEDED)
                );
                format!("{:?}: {}", status.code(), status.message())
            },
        )
        .await;
    for (path, body) in [
        ("/embed", serde_json::json!(texts)),
        ("/v1/embeddings", serde_json::json!({ "input": texts })),
    ] {
        let body = body.to_string();
        target
            .case(
                &format!("HTTP {path} 2048 × 990 bytes, over a 1 s CPU budget"),
                async {
                    let (status, answer) = tokio::time::timeout(
                        refused_within,
                        http_post_answer(&addr, path, body.as_bytes()),
                    )
                    .await
                    .expect("refused rather than embedded");
                    assert!(
                        answer.contains("server.request_cpu_budget"),
                        "HTTP {status}: {answer}"
                    );
                    expect_http(status, &[429])
                },
            )
            .await;
    }

    assert_eq!(
        grpc_raw(&channel, embed, good.encode_to_vec()).await,
        Code::Ok
    );
    assert_eq!(http_get(&addr, "/health").await, 200);
    target.check_nothing_held().await;
}
