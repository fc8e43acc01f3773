//! berth-embedding against seed 000's embedding service (FastAPI +
//! sentence-transformers) on the same machine, from one run: both served
//! over HTTP by their own processes and driven by the same client (see
//! `served`), and both engines in-process (berth's request path against
//! sentence-transformers' `encode`). Throughput on the same 256 sentences in
//! requests of 256, 32 and 1 texts from one client and of 1 text from 8 and
//! 64 concurrent clients, cold start (process start to first embedding),
//! peak RSS at that first embedding and after all the throughput rows, and
//! cosine against sentence-transformers' own vectors. Every row gives
//! berth's figure, the peer's and their ratio.
//!
//! ```text
//! cargo build --release -p berth-embedding --bins --examples
//! target/release/examples/embed_bench [--runs 7] [--cold-runs 3] [--python PATH]
//! ```
//! Needs the model cache (scripts/setup-embedding-model.sh) and, for the
//! peer, a Python with torch + sentence-transformers, and FastAPI + uvicorn
//! for the seed's service (default /tmp/berth-st-venv/bin/python, or
//! $BERTH_ST_PYTHON); without them only berth's figures are printed. Prints
//! a Markdown report on stdout.
//!
//! Each throughput figure comes with the CPU time other processes took while
//! it was measured: on a small machine a neighbour's build cuts throughput several
//! times, so only runs with that near 0 are worth keeping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use berth_embedding::Config;
use berth_embedding::service::Embedder;

mod served;

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

/// CPU seconds used so far by the whole machine and by the processes
/// measured (this one and, for rows served over HTTP, the service), to tell
/// how much other processes took during a measurement (Linux).
struct CpuMark {
    machine: f64,
    measured: f64,
}

impl CpuMark {
    fn now(service: Option<&str>) -> Self {
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
        let measured = process_cpu_ticks("self") + service.map_or(0.0, process_cpu_ticks);
        let ticks = 100.0; // USER_HZ, 100 on Linux
        Self {
            machine: machine / ticks,
            measured: measured / ticks,
        }
    }

    /// CPU seconds other processes took since `self`.
    fn others_since(&self, service: Option<&str>) -> f64 {
        let now = Self::now(service);
        ((now.machine - self.machine) - (now.measured - self.measured)).max(0.0)
    }
}

/// utime + stime of process `pid` ("self" for this one), in ticks.
fn process_cpu_ticks(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(name)`: state is the first, utime and stime
            // (fields 14 and 15 of the line) the 12th and 13th.
            let fields: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0)
}

#[derive(Clone)]
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
    let before = CpuMark::now(None);
    let mut rates = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        once().await;
        rates.push(sentences.len() as f64 / started.elapsed().as_secs_f64());
    }
    Throughput {
        per_s: median(rates.clone()),
        runs: rates,
        others_cpu_s: before.others_since(None),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(&format!("no free port: {e}")))
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

impl Peer {
    /// The throughput rows of the script's output, in SHAPES order (None
    /// where a row is missing).
    fn throughput(&self) -> Vec<Option<Throughput>> {
        SHAPES
            .iter()
            .map(|&(batch, clients)| {
                let summary = Self::row(&self.summary, batch, clients)?;
                let detail = Self::row(&self.detail, batch, clients);
                Some(Throughput {
                    per_s: summary["sentences_per_s"].as_f64()?,
                    runs: detail
                        .and_then(|r| r["sentences_per_s_runs"].as_array())
                        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                        .unwrap_or_default(),
                    others_cpu_s: detail
                        .and_then(|r| r["other_processes_cpu_s"].as_f64())
                        .unwrap_or(0.0),
                })
            })
            .collect()
    }
}

/// The seed's service over HTTP, where the Python can run it: its versions,
/// or why not.
fn seed_service_versions(python: &Path) -> Result<String, String> {
    let output = Command::new(python)
        .args([
            "-c",
            "import fastapi, uvicorn, sentence_transformers, torch; \
             print(f'FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__}, \
             sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} \
             with {torch.get_num_threads()} thread(s)')",
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{} cannot run the seed's service: {}",
            python.display(),
            stderr.lines().last().unwrap_or("")
        ))
    }
}

/// Rows served over HTTP by one service: its cold starts (the last process
/// started serves the rows) and throughput.
struct ServedRows {
    cold_starts: Vec<(f64, f64)>,
    rows: Vec<Throughput>,
    peak_rss_mib: f64,
}

/// Starts `cold_runs` processes of a service one after another (each timed
/// to its first embedding); the last one stays up to serve the rows.
fn start_service(
    name: &'static str,
    cold_runs: usize,
    command: impl Fn(&str) -> Command,
) -> (served::Served, Vec<(f64, f64)>) {
    eprintln!("embed_bench: {name} cold starts…");
    let mut colds = Vec::new();
    loop {
        let addr = format!("127.0.0.1:{}", free_port());
        let service = served::Served::start(name, command(&addr), addr);
        colds.push((service.cold_start_s, service.first_rss_mib));
        if colds.len() >= cold_runs.max(1) {
            return (service, colds);
        }
    }
}

/// Both services over HTTP, shape by shape in turn (berth, then the seed's),
/// so that outside load hits both alike. A failure stops both services.
fn served_rows(
    args: &Args,
    binary: &Path,
    sentences: &[String],
    with_seed: bool,
) -> Result<(ServedRows, Option<ServedRows>), String> {
    let berth = start_service("berth-embedding", args.cold_runs, |http| {
        let mut command = Command::new(binary);
        let grpc = format!("127.0.0.1:{}", free_port());
        command.args(["--listen", &grpc, "--http-listen", http]);
        command
    });
    let seed = with_seed.then(|| {
        start_service("seed-service", args.cold_runs, |http| {
            let port = http.rsplit(':').next().unwrap_or_default();
            let mut command = Command::new(&args.python);
            command
                .arg(format!(
                    "{REPO}/scripts/embedding/seed_embedding_service.py"
                ))
                .arg(port)
                .env("HF_HUB_OFFLINE", "1")
                .env("HF_HUB_DISABLE_PROGRESS_BARS", "1");
            command
        })
    });
    eprintln!("embed_bench: throughput over HTTP…");
    let mut berth_rows = Vec::new();
    let mut seed_rows = Vec::new();
    let measure = |service: &served::Served, batch, clients| {
        let pid = service.pid();
        let before = CpuMark::now(Some(&pid));
        let runs = served::throughput(
            service,
            sentences,
            batch,
            clients,
            runs_of(batch, args.runs),
        )?;
        Ok::<_, String>(Throughput {
            per_s: median(runs.clone()),
            runs,
            others_cpu_s: before.others_since(Some(&pid)),
        })
    };
    for (batch, clients) in SHAPES {
        berth_rows.push(measure(&berth.0, batch, clients)?);
        if let Some((service, _)) = &seed {
            seed_rows.push(measure(service, batch, clients)?);
        }
    }
    let rows_of = |(service, cold_starts): (served::Served, Vec<(f64, f64)>), rows| ServedRows {
        peak_rss_mib: service.peak_rss_mib(),
        cold_starts,
        rows,
    };
    Ok((
        rows_of(berth, berth_rows),
        seed.map(|seed| rows_of(seed, seed_rows)),
    ))
}

/// `top / bottom` as a table cell, where both were measured (0 is "/proc
/// did not tell").
fn ratio(top: Option<f64>, bottom: Option<f64>, unit: &str) -> String {
    let both = top.zip(bottom).filter(|(t, b)| *t > 0.0 && *b > 0.0);
    cell(both.map(|(t, b)| t / b), 2, unit)
}

fn cell(value: Option<f64>, digits: usize, unit: &str) -> String {
    value.map_or("—".to_string(), |v| format!("{v:.digits$}{unit}"))
}

/// The throughput rows of a table: ours, theirs and the ratio per shape.
fn print_throughput(ours: &[Throughput], theirs: &[Option<Throughput>]) {
    for (i, (batch, clients)) in SHAPES.iter().enumerate() {
        let theirs = theirs.get(i).and_then(Option::as_ref).map(|t| t.per_s);
        let texts = if *batch == 1 { "text" } else { "texts" };
        let clients_label = if *clients == 1 {
            "1 client".to_string()
        } else {
            format!("{clients} concurrent clients")
        };
        println!(
            "| sentences/s, {batch} {texts} per request, {clients_label} (median of {}) | {:.1} | {} | {} |",
            ours[i].runs.len(),
            ours[i].per_s,
            cell(theirs, 1, ""),
            ratio(Some(ours[i].per_s), theirs, "×")
        );
    }
}

/// Every run of every row, with the CPU other processes took meanwhile.
fn print_runs(peer: &str, ours: &[Throughput], theirs: &[Option<Throughput>]) {
    println!(
        "| texts per request × clients | berth runs | others' CPU | {peer} runs | others' CPU |"
    );
    println!("|---|---|---|---|---|");
    let listed = |r: &[f64]| {
        r.iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, (batch, clients)) in SHAPES.iter().enumerate() {
        let theirs = theirs.get(i).and_then(Option::as_ref);
        println!(
            "| {batch} × {clients} | {} | {:.2} CPU-s | {} | {} |",
            listed(&ours[i].runs),
            ours[i].others_cpu_s,
            theirs.map_or("—".into(), |t| listed(&t.runs)),
            cell(theirs.map(|t| t.others_cpu_s), 2, " CPU-s"),
        );
    }
    println!();
}

fn medians(colds: &[(f64, f64)]) -> (f64, f64) {
    (
        median(colds.iter().map(|c| c.0).collect()),
        median(colds.iter().map(|c| c.1).collect()),
    )
}

fn main() {
    let args = args();
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("berth-embedding")))
        .filter(|b| b.exists())
        .unwrap_or_else(|| fail("berth-embedding is not built: cargo build --release -p berth-embedding --bins --examples"));
    let seed_versions = if args.python.exists() {
        seed_service_versions(&args.python)
    } else {
        Err(format!(
            "{} not found (set BERTH_ST_PYTHON or --python)",
            args.python.display()
        ))
    };
    if let Err(reason) = &seed_versions {
        eprintln!("embed_bench: {reason}: the seed's service is skipped");
    }

    let peer = sentence_transformers(&args);

    eprintln!("embed_bench: berth in-process throughput…");
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| fail(&e.to_string()));
    // The service's own config rules (env BERTH_*), so that e.g.
    // BERTH_MODELS__SESSIONS=1 shapes both the served process and this one.
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
    // Its session threads end, leaving the cores to the served rows.
    drop(embedder);

    let (berth_served, seed_served) =
        served_rows(&args, &binary, &sentences, seed_versions.is_ok()).unwrap_or_else(|e| fail(&e));

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
    match &seed_versions {
        Ok(versions) => println!("seed 000's service: {versions}, one uvicorn worker"),
        Err(reason) => println!("seed 000's service: not measured ({reason})"),
    }
    println!();

    println!("Served over HTTP (`POST /embed`, the same client for both):\n");
    println!("| | berth-embedding | seed 000's service | ratio |");
    println!("|---|---|---|---|");
    let seed_rows: Vec<Option<Throughput>> = seed_served
        .as_ref()
        .map(|s| s.rows.iter().cloned().map(Some).collect())
        .unwrap_or_default();
    print_throughput(&berth_served.rows, &seed_rows);
    let (cold_s, first_rss_mib) = medians(&berth_served.cold_starts);
    let seed_medians = seed_served.as_ref().map(|s| medians(&s.cold_starts));
    let seed_cold = seed_medians.map(|m| m.0);
    println!(
        "| cold start: process start → first embedding (median of {}) | {cold_s:.3} s | {} | {} |",
        berth_served.cold_starts.len(),
        cell(seed_cold, 2, " s"),
        ratio(seed_cold, Some(cold_s), "× faster")
    );
    let seed_first_rss = seed_medians.map(|m| m.1);
    println!(
        "| peak RSS of that process at its first embedding (median) | {first_rss_mib:.0} MiB | {} | {} |",
        cell(seed_first_rss, 0, " MiB"),
        ratio(seed_first_rss, Some(first_rss_mib), "× less")
    );
    let seed_peak = seed_served.as_ref().map(|s| s.peak_rss_mib);
    println!(
        "| peak RSS of the serving process after all the rows | {:.0} MiB | {} | {} |",
        berth_served.peak_rss_mib,
        cell(seed_peak, 0, " MiB"),
        ratio(seed_peak, Some(berth_served.peak_rss_mib), "× less")
    );
    println!();

    println!(
        "In-process (berth's request path without HTTP against sentence-transformers' `encode`):\n"
    );
    println!("| | berth-embedding | sentence-transformers | ratio |");
    println!("|---|---|---|---|");
    let st_rows = peer.as_ref().map(Peer::throughput).unwrap_or_default();
    print_throughput(&rows, &st_rows);
    let st = |key: &str| peer.as_ref().and_then(|p| p.summary[key].as_f64());
    let st_cold = st("cold_start_s");
    println!(
        "| cold start to a first embedding: berth's binary, a bare `python` (no web server) (median) | {cold_s:.3} s | {} | {} |",
        cell(st_cold, 2, " s"),
        ratio(st_cold, Some(cold_s), "× faster")
    );
    let st_peak_rss = st("peak_rss_mib");
    println!(
        "| peak RSS of the bench process after all the throughput rows | {peak_rss_mib:.0} MiB | {} | {} |",
        cell(st_peak_rss, 0, " MiB"),
        ratio(st_peak_rss, Some(peak_rss_mib), "× less")
    );
    println!("| lowest cosine vs sentence-transformers' vectors (22 texts) | {cosine:.7} | 1 | |");
    println!();

    println!(
        "Runs (sentences/s) and the CPU other processes took during each row's timed runs, served:\n"
    );
    print_runs("seed service", &berth_served.rows, &seed_rows);
    println!("In-process:\n");
    print_runs("sentence-transformers", &rows, &st_rows);
    let rounded = |colds: &[(f64, f64)]| {
        colds
            .iter()
            .map(|c| ((c.0 * 1000.0).round() / 1000.0, c.1.round()))
            .collect::<Vec<_>>()
    };
    println!(
        "Cold starts (s, MiB at first embedding): berth {:?}; seed service {}; bare python {} s.",
        rounded(&berth_served.cold_starts),
        seed_served
            .as_ref()
            .map_or("—".into(), |s| format!("{:?}", rounded(&s.cold_starts))),
        peer.as_ref()
            .map_or("—".into(), |p| p.detail["cold_start_runs_s"].to_string()),
    );
}
