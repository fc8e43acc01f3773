//! berth-embedding against sentence-transformers (seed 000's service) on the
//! same machine, from one run: throughput on the same 256 sentences in one
//! batch of 256, cold start (process start to first embedding), peak RSS of
//! that process, and cosine against sentence-transformers' own vectors.
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
//! Each figure comes with the CPU time other processes took while it was
//! measured: on a small machine a neighbour's build cuts throughput several
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
    let rss_mib = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0);
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

/// sentence-transformers' figures from its script: (stdout JSON, stderr detail JSON).
fn sentence_transformers(args: &Args) -> Option<(serde_json::Value, serde_json::Value)> {
    if !args.python.exists() {
        eprintln!(
            "embed_bench: {} not found: sentence-transformers skipped (set BERTH_ST_PYTHON or --python)",
            args.python.display()
        );
        return None;
    }
    eprintln!("embed_bench: running sentence-transformers (about a minute)…");
    let output = Command::new(&args.python)
        .arg(format!(
            "{REPO}/scripts/embedding/bench_sentence_transformers.py"
        ))
        .args([
            "--runs",
            &args.runs.to_string(),
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
    Some((summary, detail))
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
    let rss_mib = median(colds.iter().map(|c| c.1).collect());

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
    let (batch256, cosine, others) = runtime.block_on(async {
        let batch256 = throughput(&embedder, &sentences, 256, 1, args.runs).await;
        let mut others = Vec::new();
        for (batch, clients) in [(1, 1), (32, 1), (1, 8), (1, 64)] {
            others.push((
                batch,
                clients,
                throughput(&embedder, &sentences, batch, clients, args.runs.min(3)).await,
            ));
        }
        (batch256, min_cosine(&embedder).await, others)
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
        "berth: {sessions} ONNX Runtime session(s) × {threads} thread(s), all-MiniLM-L6-v2 fp32, max 256 tokens\n"
    );
    println!("| | berth-embedding | sentence-transformers | ratio |");
    println!("|---|---|---|---|");
    let st = peer.as_ref().map(|(s, _)| s);
    let st_rate = st.and_then(|s| s["sentences_per_s"].as_f64());
    let st_cold = st.and_then(|s| s["cold_start_s"].as_f64());
    let cell =
        |v: Option<f64>, unit: &str| v.map_or("—".to_string(), |v| format!("{v:.2}{unit}"));
    println!(
        "| sentences/s, 256 sentences in one batch (median of {}) | {:.1} | {} | {} |",
        args.runs,
        batch256.per_s,
        cell(st_rate, ""),
        cell(st_rate.map(|s| batch256.per_s / s), "×")
    );
    println!(
        "| cold start: process start → first embedding (median of {}) | {cold_s:.3} s | {} | {} |",
        args.cold_runs,
        cell(st_cold, " s"),
        cell(st_cold.map(|s| s / cold_s), "× faster")
    );
    println!("| peak RSS of that process | {rss_mib:.0} MiB | — | |");
    println!("| lowest cosine vs sentence-transformers' vectors (22 texts) | {cosine:.7} | 1 | |");
    println!();
    println!("berth, same sentences, other request shapes (in-process, dynamic batching):\n");
    println!("| requests | clients | sentences/s |");
    println!("|---|---|---|");
    for (batch, clients, t) in &others {
        println!("| {batch} text(s) each | {clients} | {:.1} |", t.per_s);
    }
    println!();
    let runs = |r: &[f64]| {
        r.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "Load: other processes took {:.2} CPU-s during berth's timed batch-256 runs ({}), {} during sentence-transformers' ({}).",
        batch256.others_cpu_s,
        runs(&batch256.runs),
        peer.as_ref()
            .and_then(|(_, d)| d["other_processes_cpu_s"].as_f64())
            .map_or("—".into(), |v| format!("{v:.2} CPU-s")),
        peer.as_ref()
            .map_or("—".into(), |(_, d)| d["sentences_per_s_runs"].to_string()),
    );
    println!(
        "Cold starts: berth {:?} s; sentence-transformers {}.",
        colds
            .iter()
            .map(|c| (c.0 * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>(),
        peer.as_ref()
            .map_or("—".into(), |(_, d)| d["cold_start_runs_s"].to_string()),
    );
}
