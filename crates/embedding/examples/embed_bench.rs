//! berth-embedding against sentence-transformers (seed 000's service) on the
//! same machine, from one run: throughput on the same 256 sentences in
//! requests of 256, 32 and 1 texts from one client and of 1 text from 8 and
//! 64 concurrent clients, cold start (process start to first embedding), peak
//! RSS at that first embedding and after all the throughput runs, and cosine
//! against sentence-transformers' own vectors. Every row gives berth's figure,
//! the peer's and their ratio.
//!
//! ```text
//! cargo build --release -p berth-embedding --bins --examples
//! target/release/examples/embed_bench [--runs 7] [--cold-runs 3] [--python PATH]
//! ```
//! Needs the model cache (scripts/setup-embedding-model.sh) and, for the
//! peer, a Python with torch + sentence-transformers (default
//! /tmp/berth-st-venv/bin/python, or $BERTH_ST_PYTHON); without it only
//! berth's figures are printed. Prints a Markdown report on stdout.
//!
//! Each throughput figure comes with the CPU time other processes took while
//! it was measured: on a small machine a neighbour's build cuts throughput several
//! times, so only runs with that near 0 are worth keeping.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_embedding::Config;
use berth_embedding::service::Embedder;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The sentences of scripts/embedding/bench_sentence_transformers.py, made the same way.
fn bench_sentences() -> Vec<String> {
    const TOPICS: [&str; 8] = [
        "containers",
        "virtual machines",
        "GPU scheduling",
        "batch jobs",
        "network tunnels",
        "health checks",
        "log shipping",
        "model serving",
    ];
    (0..256)
        .map(|i| {
            format!(
                "Sentence number {i} is a short example about {}.",
                TOPICS[i % TOPICS.len()]
            )
        })
        .collect()
}

/// (texts per request, concurrent clients) of the throughput rows; the same
/// list as SHAPES in scripts/embedding/bench_sentence_transformers.py, which
/// the rows of its output are matched against.
const SHAPES: [(usize, usize); 5] = [(256, 1), (32, 1), (1, 1), (1, 8), (1, 64)];

/// Timed runs of a throughput row: `--runs` for the batch of 256, the
/// headline figure, at most 3 for the others, whose single-text requests
/// take several times longer per run.
fn runs_of(batch: usize, runs: usize) -> usize {
    if batch == 256 { runs } else { runs.min(3) }
}

struct Args {
    runs: usize,
    cold_runs: usize,
    python: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        runs: 7,
        cold_runs: 3,
        python: std::env::var_os("BERTH_ST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/berth-st-venv/bin/python")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--runs" => args.runs = value.parse().unwrap_or_else(|_| fail("--runs: a number")),
            "--cold-runs" => {
                args.cold_runs = value
                    .parse()
                    .unwrap_or_else(|_| fail("--cold-runs: a number"))
            }
            "--python" => args.python = value.into(),
            _ => fail(&format!("unknown flag {flag}")),
        }
    }
    args
}

fn fail(message: &str) -> ! {
    eprintln!("embed_bench: {message}");
    std::process::exit(2)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// CPU seconds the whole machine and this process have used so far (Linux),
/// to tell how much other processes took during a measurement.
fn cpu_seconds() -> (f64, f64) {
    let ticks = 100.0; // USER_HZ, 100 on Linux
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: all but idle and iowait.
            Some(
                fields
                    .iter()
                    .take(8)
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4)
                    .map(|(_, v)| v)
                    .sum::<f64>(),
            )
        })
        .unwrap_or(0.0);
    let own = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the `(name)`: state is the first, utime and stime
            // (fields 14 and 15 of the line) the 12th and 13th.
            let fields: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    (machine / ticks, own / ticks)
}

fn others_during(before: (f64, f64)) -> f64 {
    let after = cpu_seconds();
    ((after.0 - before.0) - (after.1 - before.1)).max(0.0)
}

struct Throughput {
    per_s: f64,
    runs: Vec<f64>,
    others_cpu_s: f64,
}

/// Sentences per second embedding `sentences` in requests of `batch` texts
/// from `clients` concurrent clients, median of `runs` after one warm-up.
async fn throughput(
    embedder: &Embedder,
    sentences: &[String],
    batch: usize,
    clients: usize,
    runs: usize,
) -> Throughput {
    let once = || async {
        let chunks: Vec<Vec<String>> = sentences.chunks(batch).map(<[String]>::to_vec).collect();
        let per_client = chunks.len().div_ceil(clients);
        let work = chunks.chunks(per_client).map(|mine| async move {
            for chunk in mine {
                let embedded = embedder.embed("", chunk.clone(), true).await.unwrap();
                assert_eq!(embedded.vectors.len(), chunk.len());
            }
        });
        futures::future::join_all(work).await;
    };
    once().await;
    let before = cpu_seconds();
    let mut rates = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        once().await;
        rates.push(sentences.len() as f64 / started.elapsed().as_secs_f64());
    }
    Throughput {
        per_s: median(rates.clone()),
        runs: rates,
        others_cpu_s: others_during(before),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(&format!("no free port: {e}")))
}

/// Spawns the berth-embedding binary and times until its first `/embed`
/// answer; also its peak RSS (VmHWM) at that point, in MiB.
fn cold_start(binary: &Path) -> (f64, f64) {
    let http = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--http-listen",
            &http,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", binary.display())));
    let body = br#"["The first embedding of this process."]"#;
    let response = loop {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            fail("berth-embedding gave no embedding within 60 s");
        }
        // The port is bound before the model loads: a connection waits in
        // the backlog until the service answers.
        let Ok(mut stream) = TcpStream::connect(&http) else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let head = format!(
            "POST /embed HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut response = String::new();
        let sent = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body));
        if sent
            .and_then(|()| stream.read_to_string(&mut response))
            .is_ok()
            && !response.is_empty()
        {
            break response;
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let rss_mib = peak_rss_mib(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    if !response.starts_with("HTTP/1.1 200") {
        fail(&format!(
            "berth-embedding answered: {}",
            response.lines().next().unwrap_or("")
        ));
    }
    (elapsed, rss_mib)
}

/// Peak RSS (VmHWM) in MiB of process `pid` ("self" for this one), 0 where
/// /proc does not tell.
fn peak_rss_mib(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Lowest cosine between berth's vectors and sentence-transformers' in the
/// committed fixture.
async fn min_cosine(embedder: &Embedder) -> f64 {
    let path = format!(
        "{}/tests/fixtures/reference_vectors.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("{path}: {e}"))),
    )
    .unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    let items = fixture["items"].as_array().cloned().unwrap_or_default();
    let texts: Vec<String> = items
        .iter()
        .filter_map(|i| i["text"].as_str().map(String::from))
        .collect();
    let got = embedder
        .embed("", texts, true)
        .await
        .unwrap_or_else(|e| fail(&e.to_string()));
    items
        .iter()
        .zip(&got.vectors)
        .map(|(item, v)| {
            let reference: Vec<f64> =
                serde_json::from_value(item["vector"].clone()).unwrap_or_default();
            let dot: f64 = reference
                .iter()
                .zip(v)
                .map(|(a, b)| a * f64::from(*b))
                .sum();
            let norm = |x: f64| x.sqrt();
            dot / (norm(reference.iter().map(|a| a * a).sum())
                * norm(v.iter().map(|b| f64::from(*b).powi(2)).sum()))
        })
        .fold(f64::INFINITY, f64::min)
}

/// sentence-transformers' figures from its script: its stdout JSON (figures)
/// and the `detail` object of its stderr JSON (runs, load, versions).
struct Peer {
    summary: serde_json::Value,
    detail: serde_json::Value,
}

impl Peer {
    /// The summary or detail entry of the throughput row (batch, clients).
    fn row(of: &serde_json::Value, batch: usize, clients: usize) -> Option<&serde_json::Value> {
        of["throughput"].as_array()?.iter().find(|r| {
            r["batch"].as_u64() == Some(batch as u64)
                && r["clients"].as_u64() == Some(clients as u64)
        })
    }
}

fn sentence_transformers(args: &Args) -> Option<Peer> {
    if !args.python.exists() {
        eprintln!(
            "embed_bench: {} not found: sentence-transformers skipped (set BERTH_ST_PYTHON or --python)",
            args.python.display()
        );
        return None;
    }
    eprintln!("embed_bench: running sentence-transformers (a few minutes)…");
    let output = Command::new(&args.python)
        .arg(format!(
            "{REPO}/scripts/embedding/bench_sentence_transformers.py"
        ))
        .args([
            "--runs",
            &runs_of(256, args.runs).to_string(),
            "--other-runs",
            &runs_of(1, args.runs).to_string(),
            "--cold-runs",
            &args.cold_runs.to_string(),
        ])
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", args.python.display())));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        fail("bench_sentence_transformers.py failed");
    }
    let parse = |bytes: &[u8]| -> Option<serde_json::Value> {
        String::from_utf8_lossy(bytes)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
    };
    let summary = parse(&output.stdout)?;
    let detail = parse(&output.stderr)
        .map(|d| d["detail"].clone())
        .unwrap_or_default();
    Some(Peer { summary, detail })
}

fn main() {
    let args = args();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("berth-embedding")))
        .filter(|b| b.exists())
        .unwrap_or_else(|| fail("berth-embedding is not built: cargo build --release -p berth-embedding --bins --examples"));

    let peer = sentence_transformers(&args);

    eprintln!("embed_bench: berth cold starts…");
    let colds: Vec<(f64, f64)> = (0..args.cold_runs.max(1))
        .map(|_| cold_start(&binary))
        .collect();
    let cold_s = median(colds.iter().map(|c| c.0).collect());
    let first_rss_mib = median(colds.iter().map(|c| c.1).collect());

    eprintln!("embed_bench: berth throughput…");
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&e.to_string()));
    // The service's own config rules (env BERTH_*), so that e.g.
    // BERTH_MODELS__SESSIONS=1 shapes both the cold-start process and this one.
    let config: Config =
        berth_server::config::load(None, &[]).unwrap_or_else(|e| fail(&e.to_string()));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = berth_embedding::metrics::Metrics::register(&mut registry);
    let embedder = Embedder::load(&config, &metrics).unwrap_or_else(|e| fail(&e.to_string()));
    if let Some(reason) = embedder.unavailable() {
        fail(&format!("{reason}: run scripts/setup-embedding-model.sh"));
    }
    let sentences = bench_sentences();
    let (rows, peak_rss_mib, cosine) = runtime.block_on(async {
        let mut rows = Vec::new();
        for (batch, clients) in SHAPES {
            let runs = runs_of(batch, args.runs);
            rows.push(throughput(&embedder, &sentences, batch, clients, runs).await);
        }
        // Read before the cosine check, so that both sides' peak covers the
        // model loaded and the same matrix served, nothing more.
        let peak_rss_mib = peak_rss_mib("self");
        (rows, peak_rss_mib, min_cosine(&embedder).await)
    });

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (sessions, threads) = config.models.pool_shape(cores);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    println!("Machine: {cpu}, {cores} cores; {date}");
    println!(
        "berth: {sessions} ONNX Runtime session(s) × {threads} thread(s), all-MiniLM-L6-v2 fp32, max 256 tokens"
    );
    if let Some(p) = &peer {
        println!(
            "sentence-transformers: torch {} with {} thread(s); concurrent clients are threads sharing one model",
            p.detail["torch"].as_str().unwrap_or("?"),
            p.detail["torch_threads"]
        );
    }
    println!();
    println!("| | berth-embedding | sentence-transformers | ratio |");
    println!("|---|---|---|---|");
    let st = |key: &str| peer.as_ref().and_then(|p| p.summary[key].as_f64());
    let cell = |v: Option<f64>, digits: usize, unit: &str| {
        v.map_or("—".to_string(), |v| format!("{v:.digits$}{unit}"))
    };
    // top / bottom, only where both were measured (0 is "/proc did not tell").
    let ratio = |top: Option<f64>, bottom: Option<f64>, unit: &str| {
        let both = top.zip(bottom).filter(|(t, b)| *t > 0.0 && *b > 0.0);
        cell(both.map(|(t, b)| t / b), 2, unit)
    };
    for ((batch, clients), ours) in SHAPES.iter().zip(&rows) {
        let theirs = peer
            .as_ref()
            .and_then(|p| Peer::row(&p.summary, *batch, *clients))
            .and_then(|r| r["sentences_per_s"].as_f64());
        let texts = if *batch == 1 { "text" } else { "texts" };
        let clients_label = if *clients == 1 {
            "1 client".to_string()
        } else {
            format!("{clients} concurrent clients")
        };
        println!(
            "| sentences/s, {batch} {texts} per request, {clients_label} (median of {}) | {:.1} | {} | {} |",
            ours.runs.len(),
            ours.per_s,
            cell(theirs, 1, ""),
            ratio(Some(ours.per_s), theirs, "×")
        );
    }
    let st_cold = st("cold_start_s");
    println!(
        "| cold start: process start → first embedding (median of {}) | {cold_s:.3} s | {} | {} |",
        colds.len(),
        cell(st_cold, 2, " s"),
        ratio(st_cold, Some(cold_s), "× faster")
    );
    let st_first_rss = st("first_embedding_rss_mib");
    println!(
        "| peak RSS of that process at its first embedding (median) | {first_rss_mib:.0} MiB | {} | {} |",
        cell(st_first_rss, 0, " MiB"),
        ratio(st_first_rss, Some(first_rss_mib), "× less")
    );
    let st_peak_rss = st("peak_rss_mib");
    println!(
        "| peak RSS of the bench process after all the throughput rows | {peak_rss_mib:.0} MiB | {} | {} |",
        cell(st_peak_rss, 0, " MiB"),
        ratio(st_peak_rss, Some(peak_rss_mib), "× less")
    );
    println!("| lowest cosine vs sentence-transformers' vectors (22 texts) | {cosine:.7} | 1 | |");
    println!();

    println!("Runs (sentences/s) and the CPU other processes took during each row's timed runs:\n");
    println!(
        "| texts per request × clients | berth runs | others' CPU | sentence-transformers runs | others' CPU |"
    );
    println!("|---|---|---|---|---|");
    let listed = |r: &[f64]| {
        r.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for ((batch, clients), ours) in SHAPES.iter().zip(&rows) {
        let theirs = peer
            .as_ref()
            .and_then(|p| Peer::row(&p.detail, *batch, *clients));
        let their_runs: Option<Vec<f64>> = theirs
            .and_then(|r| r["sentences_per_s_runs"].as_array())
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect());
        println!(
            "| {batch} × {clients} | {} | {:.2} CPU-s | {} | {} |",
            listed(&ours.runs),
            ours.others_cpu_s,
            their_runs.as_deref().map_or("—".into(), listed),
            cell(
                theirs.and_then(|r| r["other_processes_cpu_s"].as_f64()),
                2,
                " CPU-s"
            ),
        );
    }
    println!();
    let detail = |key: &str| {
        peer.as_ref()
            .map_or("—".into(), |p| p.detail[key].to_string())
    };
    println!(
        "Cold starts: berth {:?} s; sentence-transformers {} s.",
        colds
            .iter()
            .map(|c| (c.0 * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        detail("cold_start_runs_s"),
    );
    println!(
        "Peak RSS at first embedding: berth {:?} MiB; sentence-transformers {} MiB.",
        colds.iter().map(|c| c.1.round()).collect::<Vec<_>>(),
        detail("first_embedding_rss_runs_mib"),
    );
}
