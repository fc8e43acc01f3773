//! Both services as their users run them: each in its own process, serving
//! `POST /embed` over HTTP, driven by the same client (keep-alive HTTP/1.1,
//! one connection and one thread per concurrent client, every answer parsed
//! and checked). berth is the `berth-embedding` binary; the peer is seed
//! 000's FastAPI service (scripts/embedding/seed_embedding_service.py).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::{fail, peak_rss_mib};

/// How long a service may take from spawn to its first embedding.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest answer a client waits for (a request of 256 texts takes well
/// under a second on either side).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer body read: 256 vectors of 384 floats take about 2 MB.
const MAX_BODY_BYTES: usize = 64 << 20;

/// A service under test in its own process; killed when dropped.
pub struct Served {
    name: &'static str,
    child: Child,
    addr: String,
    log: PathBuf,
    /// Spawn to first embedding, in seconds.
    pub cold_start_s: f64,
    /// Peak RSS (VmHWM) at that first embedding, in MiB.
    pub first_rss_mib: f64,
}

impl Served {
    /// Spawns `command`, which must serve `POST /embed` on `addr`, and waits
    /// for its first embedding. Its output goes to a log file, printed if it
    /// never answers.
    pub fn start(name: &'static str, mut command: Command, addr: String) -> Self {
        let log = std::env::temp_dir().join(format!("embed_bench-{name}.log"));
        let output = std::fs::File::create(&log)
            .and_then(|file| Ok((file.try_clone()?, file)))
            .unwrap_or_else(|e| fail(&format!("{}: {e}", log.display())));
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(output.0)
            .stderr(output.1)
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {name}: {e}")));
        let mut served = Self {
            name,
            child,
            addr,
            log,
            cold_start_s: 0.0,
            first_rss_mib: 0.0,
        };
        let first = ["The first embedding of this process.".to_string()];
        loop {
            if let Ok(Some(status)) = served.child.try_wait() {
                served.fail(&format!("exited ({status}) before its first embedding"));
            }
            if started.elapsed() > START_TIMEOUT {
                served.fail(&format!("gave no embedding within {START_TIMEOUT:?}"));
            }
            // berth binds its port before the model loads (a connection then
            // waits in the backlog); uvicorn binds only once the model is
            // loaded, so until then connecting fails and is tried again.
            match Connection::open(&served.addr).map(|mut c| c.embed(&first)) {
                Ok(Ok(_)) => break,
                Ok(Err(Failure::Answer(reason))) => served.fail(&reason),
                Ok(Err(Failure::Connection(_))) | Err(_) => {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        served.cold_start_s = started.elapsed().as_secs_f64();
        served.first_rss_mib = served.peak_rss_mib();
        served
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(&self.pid())
    }

    fn fail(&mut self, reason: &str) -> ! {
        let _ = self.child.kill();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        for line in tail.into_iter().rev() {
            eprintln!("  {line}");
        }
        fail(&format!(
            "{}: {reason} (log: {})",
            self.name,
            self.log.display()
        ))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a request got no vectors.
enum Failure {
    /// The connection failed or closed: the service is not (yet) there.
    Connection(std::io::Error),
    /// The service answered, but not with the vectors asked for.
    Answer(String),
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::Connection(error)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connection(error) => write!(f, "connection: {error}"),
            Self::Answer(reason) => f.write_str(reason),
        }
    }
}

/// The seed's answer shape, which berth's `/embed` keeps.
#[derive(Deserialize)]
struct Answer {
    embeddings: Vec<Vec<f32>>,
}

/// One keep-alive HTTP/1.1 connection to a service.
struct Connection {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    fn open(addr: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        Ok(Self {
            reader: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// Posts `texts` as the seed's JSON list and checks that as many vectors
    /// of one non-zero dimension come back.
    fn embed(&mut self, texts: &[String]) -> Result<(), Failure> {
        let body = serde_json::to_vec(texts).map_err(|e| Failure::Answer(e.to_string()))?;
        let mut request = format!(
            "POST /embed HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        self.reader.get_mut().write_all(&request)?;

        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(Failure::Connection(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Failure::Answer(format!(
                    "answer in transfer-encoding {}: only Content-Length is read",
                    value.trim()
                )));
            }
        }
        let length = length.filter(|&n| n <= MAX_BODY_BYTES).ok_or_else(|| {
            Failure::Answer(format!(
                "HTTP {status} without a Content-Length up to {MAX_BODY_BYTES}"
            ))
        })?;
        let mut answer = vec![0; length];
        self.reader.read_exact(&mut answer)?;
        if status != "200" {
            let text = String::from_utf8_lossy(&answer);
            return Err(Failure::Answer(format!("HTTP {status}: {text:.200}")));
        }
        let Answer { embeddings } =
            serde_json::from_slice(&answer).map_err(|e| Failure::Answer(format!("answer: {e}")))?;
        let dimension = embeddings.first().map_or(0, Vec::len);
        if embeddings.len() != texts.len()
            || dimension == 0
            || embeddings.iter().any(|v| v.len() != dimension)
        {
            return Err(Failure::Answer(format!(
                "{} vectors (first of dimension {dimension}) for {} texts",
                embeddings.len(),
                texts.len()
            )));
        }
        Ok(())
    }
}

/// Sentences per second of each of `runs` timed runs (after one warm-up),
/// each embedding `sentences` over HTTP in requests of `batch` texts from
/// `clients` concurrent clients; the first failure ends it.
pub fn throughput(
    served: &Served,
    sentences: &[String],
    batch: usize,
    clients: usize,
    runs: usize,
) -> Result<Vec<f64>, String> {
    let chunks: Vec<&[String]> = sentences.chunks(batch).collect();
    let per_client = chunks.len().div_ceil(clients);
    let mut connections = (0..chunks.len().div_ceil(per_client))
        .map(|_| Connection::open(served.addr()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: cannot connect: {e}", served.name))?;
    let mut once = || {
        std::thread::scope(|scope| {
            let clients: Vec<_> = connections
                .iter_mut()
                .zip(chunks.chunks(per_client))
                .map(|(connection, mine)| {
                    scope.spawn(move || {
                        mine.iter()
                            .try_for_each(|texts| connection.embed(texts))
                            .map_err(|failure| format!("{}: {failure}", served.name))
                    })
                })
                .collect();
            clients.into_iter().try_for_each(|client| {
                client
                    .join()
                    .unwrap_or_else(|_| Err(format!("{}: a client panicked", served.name)))
            })
        })
    };
    once()?;
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            once()?;
            Ok(sentences.len() as f64 / started.elapsed().as_secs_f64())
        })
        .collect()
}
