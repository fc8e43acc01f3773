//! berth's llm-proxy beside the LiteLLM proxy, from one run: both in front of
//! the same fake upstream, both given the same LiteLLM config file, both
//! driven by the same open-loop load generator at fixed request rates. It
//! prints, per rate, the latency of calling the upstream directly and
//! through each proxy, the latency each proxy adds (medians over repeats),
//! the highest rate each sustains without errors, CPU time per request (its
//! threads' time on CPU, to the nanosecond) and RSS, with berth's figure,
//! LiteLLM's and the ratio, and each proxy's CPU per request against
//! berth's repeat by repeat, with their median.
//!
//!     scripts/llm/setup-peers.sh --litellm    # once
//!     cargo bench -p berth-llm-proxy --bench proxy_overhead
//!
//! berth's own figures come from the same runs: its `x-berth-overhead-us`
//! header (its time per request, upstream excluded), and a second berth
//! with `proxy.cache=true` (`berth-cache`): the generator sends one request
//! again and again, so every answer but the first is a cache hit.
//!
//! The floor beside them: nginx as a plain reverse proxy (`nginx`, Debian's
//! package), which does none of a gateway's work, so what it adds is what a
//! second HTTP hop costs on this machine; berth's figures less nginx's are
//! what berth's own work adds.
//!
//! Knobs: `BENCH_SECONDS` (length of each measured run, default 3),
//! `BENCH_REPEATS` (default 3), `BENCH_RATES` (requests/s, default
//! 25,50,100,200,500,1000,2000,4000; 8000 and 10000 are about what 2 cores
//! can generate and answer beside the proxy), `BENCH_PEER=0` to leave
//! LiteLLM out, `BENCH_FLOOR=0` to leave nginx out, `BENCH_PROXY_CPUS`
//! (e.g. `1`: the proxies run on these CPUs only, the generator and the
//! fake upstream on the others, so that neither side takes the other's
//! core; berth then gets one tokio worker per CPU given),
//! `BENCH_TRACED_OTLP` (an OTLP/gRPC endpoint, e.g. the tests'
//! `otlp_sink`: a third berth, `berth-traced`, exports every span there at
//! `BENCH_TRACED_RATIO`, default 1.0, measured in the same repeats as the
//! untraced one; run it with `BENCH_PEER=0`, and the ratio column is what
//! tracing costs), `BENCH_VARIANT` (settings, e.g.
//! `server.http_threads=0`, space-separated: another berth,
//! `berth-variant`, started with them and measured in the same repeats;
//! with `BENCH_PEER=0` the ratio column compares the two),
//! `BENCH_VARIANT_BIN` (the `berth-variant` runs this binary instead, e.g.
//! a copy of an earlier build: two builds compared in one run),
//! `BENCH_TOGETHER=1` (berth, `berth-traced` and `berth-variant` are driven
//! at the same time, each at the rate, so that whatever else loads the
//! machine loads them alike and their CPU per request compares over the
//! same seconds; their latencies are then under each other's load).
//! Rates are interleaved (each repeat walks every rate for every target) so
//! that a burst of load from elsewhere hurts all targets alike, and each
//! repeat takes the targets in a rotated order (with as many repeats as
//! targets, each is measured once in each place); a target is not driven
//! past the first rate it fails within a repeat.

mod load;
mod nginx;
mod procs;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use futures::future::join_all;
use http::HeaderValue;
use load::{Run, Target};
use procs::{Proxy, Usage};

const MASTER_KEY: &str = "sk-bench-master";
/// berth at its defaults, the one every other subject is compared with.
const BERTH: &str = "berth";
/// The berth with its response cache on; reported apart from the proxies
/// compared, as it answers without the upstream.
const CACHED: &str = "berth-cache";
/// The berth exporting its spans (`BENCH_TRACED_OTLP`).
const TRACED: &str = "berth-traced";
/// The berth started with `BENCH_VARIANT`'s settings.
const VARIANT: &str = "berth-variant";
/// nginx, the floor; reported apart too, as it is no LLM gateway.
const FLOOR: &str = "nginx";
/// Each measured run is preceded by this long at the same rate, unmeasured,
/// so that connection pools are filled for that rate.
const WARM: Duration = Duration::from_millis(500);

struct Settings {
    seconds: f64,
    repeats: usize,
    rates: Vec<u32>,
    peer: bool,
    /// nginx measured as the floor.
    floor: bool,
    /// The CPUs the proxies are pinned to (taskset's list), if any.
    proxy_cpus: Option<String>,
    /// The machine's CPUs, counted before any pinning.
    cpus: usize,
    /// Where `berth-traced` exports, and at which sample ratio.
    traced: Option<(String, f64)>,
    /// The berths compared (berth, `berth-traced`, `berth-variant`) driven
    /// at the same time (`BENCH_TOGETHER=1`).
    together: bool,
    /// The settings `berth-variant` is started with (`BENCH_VARIANT`), and
    /// its binary if not this build's (`BENCH_VARIANT_BIN`).
    variant: Option<(Vec<String>, Option<PathBuf>)>,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let parse = |name: &str, text: &str| -> Result<f64, String> {
            text.trim()
                .parse()
                .map_err(|e| format!("{name}={text}: {e}"))
        };
        Ok(Self {
            seconds: var("BENCH_SECONDS").map_or(Ok(3.0), |v| parse("BENCH_SECONDS", &v))?,
            repeats: var("BENCH_REPEATS").map_or(Ok(3.0), |v| parse("BENCH_REPEATS", &v))? as usize,
            rates: match var("BENCH_RATES") {
                Some(list) => list
                    .split(',')
                    .map(|r| parse("BENCH_RATES", r).map(|r| r as u32))
                    .collect::<Result<_, _>>()?,
                None => vec![25, 50, 100, 200, 500, 1000, 2000, 4000],
            },
            peer: var("BENCH_PEER").is_none_or(|v| v != "0"),
            floor: var("BENCH_FLOOR").is_none_or(|v| v != "0"),
            proxy_cpus: var("BENCH_PROXY_CPUS"),
            together: var("BENCH_TOGETHER").is_some_and(|v| v != "0"),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            traced: match var("BENCH_TRACED_OTLP") {
                Some(endpoint) => {
                    let ratio = var("BENCH_TRACED_RATIO")
                        .map_or(Ok(1.0), |v| parse("BENCH_TRACED_RATIO", &v))?;
                    Some((endpoint, ratio))
                }
                None => None,
            },
            variant: match (var("BENCH_VARIANT"), var("BENCH_VARIANT_BIN")) {
                (None, None) => None,
                (settings, bin) => Some((
                    settings
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(String::from)
                        .collect(),
                    bin.map(PathBuf::from),
                )),
            },
        })
    }
}

/// One thing the load generator calls: the upstream itself or a proxy.
struct Subject {
    name: &'static str,
    target: Target,
    proxy: Option<Proxy>,
    /// Runs by rate index, one per repeat that reached the rate.
    runs: Vec<Vec<Run>>,
    /// CPU time (ns) and answers over the measured runs it sustained, repeat
    /// by repeat.
    cpu_by_repeat: Vec<(u64, u64)>,
    idle: Usage,
    /// Highest RSS seen right after a run it sustained.
    loaded_rss_kb: u64,
}

impl Subject {
    /// CPU time per answer over the runs it sustained, in µs.
    fn cpu_per_request_us(&self) -> Option<f64> {
        let (ns, answered) = self
            .cpu_by_repeat
            .iter()
            .fold((0, 0), |(ns, answered), &(t, a)| (ns + t, answered + a));
        (answered > 0).then(|| ns as f64 / 1e3 / answered as f64)
    }

    /// Its CPU per request against `other`'s, repeat by repeat (in per
    /// cent, where both answered): measured within one repeat (about a
    /// minute), the two share whatever else loads the machine then, which
    /// figures over the whole run mix.
    fn cpu_ratios_to(&self, other: &Subject) -> Vec<f64> {
        self.cpu_by_repeat
            .iter()
            .zip(&other.cpu_by_repeat)
            .filter(|((_, ours), (_, theirs))| *ours > 0 && *theirs > 0)
            .map(|(&(ns, answered), &(other_ns, other_answered))| {
                let ours = ns as f64 / answered as f64;
                let theirs = other_ns as f64 / other_answered as f64;
                (ours / theirs - 1.0) * 100.0
            })
            .collect()
    }

    /// Keeps a measured run at `rate` (the `index`th) of `repeat`, with
    /// its CPU time and RSS when it was sustained, and prints it.
    fn record(&mut self, repeat: usize, index: usize, rate: u32, before: Option<Usage>, run: Run) {
        if let (Some(proxy), Some(before)) = (&self.proxy, before)
            && run.sustained()
        {
            let after = proxy.usage();
            let (ns, answered) = &mut self.cpu_by_repeat[repeat];
            *ns += after.cpu_ns_since(&before);
            *answered += run.answered() as u64;
            self.loaded_rss_kb = self.loaded_rss_kb.max(after.rss_kb);
        }
        eprintln!(
            "repeat {} {:>8} {rate:>5}/s: p50 {:>7} µs  p99 {:>7} µs  errors {}{}",
            repeat + 1,
            self.name,
            run.percentile_us(0.5).unwrap_or(0),
            run.percentile_us(0.99).unwrap_or(0),
            run.errors,
            match (&run.first_error, run.sustained()) {
                (Some(error), _) => format!(" (first: {})", truncate(error, 120)),
                (None, false) => format!(" (fell behind: {:.0}/s answered)", run.achieved()),
                (None, true) => String::new(),
            }
        );
        self.runs[index].push(run);
    }

    /// The highest rate up to which it sustained every rate, in most repeats.
    fn highest_sustained(&self, settings: &Settings) -> Option<u32> {
        (0..settings.rates.len())
            .take_while(|&i| sustains(&self.runs[i], settings.repeats))
            .last()
            .map(|i| settings.rates[i])
    }
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(bench()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("proxy_overhead: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn bench() -> Result<(), String> {
    let settings = Settings::from_env()?;
    let load_before = loadavg();
    let upstream = upstream::spawn();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = dir.path().join("litellm_config.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/fake-model\n      api_base: http://{upstream}/v1\n      api_key: sk-upstream\ngeneral_settings:\n  master_key: {MASTER_KEY}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let client = load::client();
    let body = bytes::Bytes::from_static(
        br#"{"model":"bench","messages":[{"role":"user","content":"Say hi"}],"max_tokens":16}"#,
    );
    let subject = |name, port: u16, proxy: Option<Proxy>| Subject {
        name,
        target: Target {
            uri: format!("http://127.0.0.1:{port}/v1/chat/completions")
                .parse()
                .expect("a valid URI"),
            authorization: proxy
                .is_some()
                .then(|| HeaderValue::from_static("Bearer sk-bench-master")),
            body: body.clone(),
        },
        proxy,
        runs: vec![Vec::new(); settings.rates.len()],
        cpu_by_repeat: vec![(0, 0); settings.repeats],
        idle: Usage::default(),
        loaded_rss_kb: 0,
    };

    let pinning = match &settings.proxy_cpus {
        Some(cpus) => Some(Pinning::apply(cpus)?),
        None => None,
    };
    let proxy_command = |program: &Path| match &pinning {
        Some(pinning) => pinning.command(program),
        None => Command::new(program),
    };
    let mut subjects = vec![subject("upstream", upstream.port(), None)];
    let berth_bin = Path::new(env!("CARGO_BIN_EXE_berth-llm-proxy"));
    let berth_command_of = |bin: &Path, port: u16, settings: &[&str]| {
        let mut berth = proxy_command(bin);
        berth
            .args(["--listen", "127.0.0.1:0", "--http-listen"])
            .arg(format!("127.0.0.1:{port}"));
        for setting in settings {
            berth.args(["--set", setting]);
        }
        berth
            .arg("--set")
            .arg(format!("proxy.litellm_config={}", config.display()));
        berth
    };
    let berth_command = |port: u16, settings: &[&str]| berth_command_of(berth_bin, port, settings);
    let port = free_port();
    let berth = berth_command(port, &[]);
    let proxy = Proxy::start(
        BERTH,
        berth,
        port,
        &dir.path().join("berth.log"),
        &client,
        Duration::from_secs(30),
    )
    .await?;
    subjects.push(subject(BERTH, port, Some(proxy)));
    if let Some((endpoint, ratio)) = &settings.traced {
        let port = free_port();
        let mut traced = berth_command(port, &[]);
        traced
            .env("BERTH_SERVER__OTLP_ENDPOINT", endpoint)
            .env("BERTH_SERVER__TRACE_SAMPLE_RATIO", ratio.to_string());
        let log = dir.path().join("berth-traced.log");
        let proxy =
            Proxy::start(TRACED, traced, port, &log, &client, Duration::from_secs(30)).await?;
        subjects.push(subject(TRACED, port, Some(proxy)));
    }
    if let Some((variant, bin)) = &settings.variant {
        let port = free_port();
        let variant_settings: Vec<&str> = variant.iter().map(String::as_str).collect();
        let bin = bin.as_deref().unwrap_or(berth_bin);
        let command = berth_command_of(bin, port, &variant_settings);
        let log = dir.path().join("berth-variant.log");
        let proxy = Proxy::start(
            VARIANT,
            command,
            port,
            &log,
            &client,
            Duration::from_secs(30),
        )
        .await?;
        subjects.push(subject(VARIANT, port, Some(proxy)));
    }
    let port = free_port();
    let cached = berth_command(port, &["proxy.cache=true"]);
    let log = dir.path().join("berth-cache.log");
    let proxy = Proxy::start(CACHED, cached, port, &log, &client, Duration::from_secs(30)).await?;
    subjects.push(subject(CACHED, port, Some(proxy)));
    if settings.floor {
        let port = free_port();
        let workers = pinning.as_ref().map_or(settings.cpus, |p| p.workers);
        let mut command = proxy_command(Path::new(nginx::NGINX));
        command.args(nginx::args(dir.path(), port, upstream, workers)?);
        let log = dir.path().join("nginx.log");
        let proxy = Proxy::start(FLOOR, command, port, &log, &client, Duration::from_secs(30))
            .await
            .map_err(|e| format!("{e}\n(set BENCH_FLOOR=0 to run without nginx)"))?;
        subjects.push(subject(FLOOR, port, Some(proxy)));
    }
    if settings.peer {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llm/litellm-proxy.sh");
        let port = free_port();
        let mut litellm = proxy_command(&script);
        litellm.arg(&config).arg(port.to_string());
        let log = dir.path().join("litellm.log");
        let proxy = Proxy::start("litellm", litellm, port, &log, &client, Duration::from_secs(120))
            .await
            .map_err(|e| {
                format!("{e}\n(set BENCH_PEER=0 to run without LiteLLM; scripts/llm/setup-peers.sh --litellm installs it)")
            })?;
        subjects.push(subject("litellm", port, Some(proxy)));
    }

    // The first requests through LiteLLM import half of its code; warm every
    // subject up before measuring anything, then take the idle RSS.
    for subject in &mut subjects {
        let warm = load::run(&client, &subject.target, 20, Duration::from_secs(3)).await;
        if warm.errors > 0 {
            return Err(format!(
                "{} fails at 20 requests/s: {}",
                subject.name,
                warm.first_error.unwrap_or_default()
            ));
        }
        if let Some(proxy) = &subject.proxy {
            subject.idle = proxy.usage();
        }
    }

    let measured = Duration::from_secs_f64(settings.seconds);
    for repeat in 0..settings.repeats {
        let mut failed = vec![false; subjects.len()];
        // Each repeat starts one subject further along: in a fixed order,
        // the same build measured third cost up to several points more CPU
        // per request than measured second (issue #20), which a comparison
        // of neighbours would take for their difference.
        let count = subjects.len();
        let order: Vec<usize> = (0..count).map(|i| (i + repeat) % count).collect();
        // With `BENCH_TOGETHER`, the berths compared are driven at once.
        let together: Vec<usize> = if settings.together {
            order
                .iter()
                .copied()
                .filter(|&i| [BERTH, TRACED, VARIANT].contains(&subjects[i].name))
                .collect()
        } else {
            Vec::new()
        };
        for (index, &rate) in settings.rates.iter().enumerate() {
            for &place in &order {
                // The berths driven together take their turn where the
                // first of them comes in this repeat's order.
                let group: Vec<usize> = if together.first() == Some(&place) {
                    let mut group: Vec<usize> = together
                        .iter()
                        .copied()
                        .filter(|&other| !failed[other])
                        .collect();
                    // Requests due in the same timer tick leave in the
                    // group's order, and the berth sent to first paid ~7 %
                    // more CPU per request than the one sent to last (issue
                    // #20): each run starts the round with another one.
                    let step = repeat * settings.rates.len() + index;
                    let len = group.len().max(1);
                    group.rotate_left(step % len);
                    group
                } else if together.contains(&place) || failed[place] {
                    continue;
                } else {
                    vec![place]
                };
                let targets: Vec<&Target> = group.iter().map(|&i| &subjects[i].target).collect();
                join_all(targets.iter().map(|t| load::run(&client, t, rate, WARM))).await;
                let before: Vec<Option<Usage>> = group
                    .iter()
                    .map(|&i| subjects[i].proxy.as_ref().map(Proxy::usage))
                    .collect();
                let runs = join_all(
                    targets
                        .iter()
                        .map(|t| load::run(&client, t, rate, measured)),
                )
                .await;
                for ((&place, before), run) in group.iter().zip(before).zip(runs) {
                    failed[place] = !run.sustained();
                    subjects[place].record(repeat, index, rate, before, run);
                }
            }
        }
    }

    // The generator's idle keep-alive connections are closed first: RSS at
    // the end is what the proxies keep once their clients are gone.
    drop(client);
    tokio::time::sleep(Duration::from_secs(1)).await;
    report(&settings, &subjects, load_before, loadavg());
    Ok(())
}

/// The proxies on some CPUs, this process (the generator and the fake
/// upstream) on the rest.
struct Pinning {
    proxy_cpus: String,
    workers: usize,
}

impl Pinning {
    /// Moves every thread of this process off `proxy_cpus` (a taskset list
    /// such as `1` or `2-3`).
    fn apply(proxy_cpus: &str) -> Result<Self, String> {
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        let given = cpu_list(proxy_cpus, all)?;
        let rest: Vec<String> = (0..all)
            .filter(|cpu| !given.contains(cpu))
            .map(|cpu| cpu.to_string())
            .collect();
        if rest.is_empty() {
            return Err(format!(
                "BENCH_PROXY_CPUS={proxy_cpus} leaves no CPU for the generator"
            ));
        }
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", &rest.join(",")])
            .arg(std::process::id().to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("taskset: {e}"))?;
        if !status.success() {
            return Err(format!("taskset of the bench process: {status}"));
        }
        eprintln!(
            "proxies on CPUs {proxy_cpus}, the generator and the upstream on {}",
            rest.join(",")
        );
        Ok(Self {
            proxy_cpus: proxy_cpus.to_string(),
            workers: given.len(),
        })
    }

    /// `program` started on the proxies' CPUs, a tokio worker per CPU.
    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("taskset");
        command
            .args(["-c", &self.proxy_cpus])
            .arg(program)
            .env("TOKIO_WORKER_THREADS", self.workers.to_string());
        command
    }
}

/// The CPUs of a taskset list (`1`, `0,2`, `2-3`), each below `all`.
fn cpu_list(list: &str, all: usize) -> Result<Vec<usize>, String> {
    let bad = || format!("BENCH_PROXY_CPUS={list}: a list of CPUs below {all}, e.g. 1 or 2-3");
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let first: usize = first.trim().parse().map_err(|_| bad())?;
        let last: usize = last.trim().parse().map_err(|_| bad())?;
        if first > last || last >= all {
            return Err(bad());
        }
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

/// Median of a repeat-wise figure, over the repeats that have it (of an
/// even count, the mean of the middle two: the upper one alone would make
/// every figure of two repeats the higher of the two).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    })
}

/// Latency added over the direct call, repeat by repeat, at quantile `q`.
fn added_us(direct: &[Run], proxy: &[Run], q: f64) -> Option<f64> {
    median(
        direct
            .iter()
            .zip(proxy)
            .filter(|(d, p)| d.sustained() && p.sustained())
            .filter_map(|(d, p)| Some(p.percentile_us(q)? as f64 - d.percentile_us(q)? as f64))
            .collect(),
    )
}

/// Sustained in most of the repeats.
fn sustains(runs: &[Run], repeats: usize) -> bool {
    runs.iter().filter(|r| r.sustained()).count() * 2 > repeats
}

fn report(settings: &Settings, subjects: &[Subject], load_before: String, load_after: String) {
    let direct = &subjects[0];
    let cached: Vec<&Subject> = subjects.iter().filter(|s| s.name == CACHED).collect();
    let floor = subjects.iter().find(|s| s.name == FLOOR);
    let proxies: Vec<&Subject> = subjects[1..]
        .iter()
        .filter(|s| s.name != CACHED && s.name != FLOOR)
        .collect();
    let proxies = &proxies[..];
    println!();
    println!(
        "proxy_overhead: {} × {} s per rate, medians over repeats; machine: {} ({} CPUs); load average before {load_before}, after {load_after}{}",
        settings.repeats,
        settings.seconds,
        cpu_model(),
        settings.cpus,
        settings
            .proxy_cpus
            .as_ref()
            .map_or(String::new(), |cpus| format!(
                "; proxies pinned to CPUs {cpus}, the generator and upstream to the others"
            )),
    );
    println!();
    print!("| rate/s | upstream p50 / p99 µs |");
    for proxy in proxies {
        print!(
            " {} p50 / p99 µs | {} added p50 / p99 µs |",
            proxy.name, proxy.name
        );
    }
    println!();
    println!("|---:|---:|{}", "---:|---:|".repeat(proxies.len()));
    for (index, rate) in settings.rates.iter().enumerate() {
        print!(
            "| {rate} | {} |",
            latency_cell(&direct.runs[index], settings.repeats)
        );
        for proxy in proxies {
            let runs = &proxy.runs[index];
            let added = |q| {
                added_us(&direct.runs[index], runs, q).map_or("—".into(), |v| format!("{v:.0}"))
            };
            print!(
                " {} | {} / {} |",
                latency_cell(runs, settings.repeats),
                added(0.5),
                added(0.99)
            );
        }
        println!();
    }
    println!();

    // Figures per proxy, then berth's, LiteLLM's and the ratio.
    let both = |index: usize| {
        proxies
            .iter()
            .all(|p| sustains(&p.runs[index], settings.repeats))
    };
    // Added latency at the lowest rate (the kindest to a slow proxy) and at
    // the highest rate every proxy sustains.
    let sustained: Vec<usize> = (0..settings.rates.len())
        .filter(|&i| both(i) && sustains(&direct.runs[i], settings.repeats))
        .collect();
    let mut references = vec![sustained.first(), sustained.last()];
    references.dedup();
    let mut rows: Vec<(String, Vec<Option<f64>>, bool)> = Vec::new();
    for &i in references.into_iter().flatten() {
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            rows.push((
                format!("added latency {label} at {}/s (µs)", settings.rates[i]),
                proxies
                    .iter()
                    .map(|p| added_us(&direct.runs[i], &p.runs[i], q))
                    .collect(),
                true,
            ));
        }
    }
    rows.push((
        "highest rate sustained without errors (/s)".into(),
        proxies
            .iter()
            .map(|p| p.highest_sustained(settings).map(f64::from))
            .collect(),
        false,
    ));
    rows.push((
        "CPU per request (µs)".into(),
        proxies.iter().map(|p| p.cpu_per_request_us()).collect(),
        true,
    ));
    let mb = |kb: u64| Some(kb as f64 / 1024.0);
    rows.push((
        "RSS after warm-up (MB)".into(),
        proxies.iter().map(|p| mb(p.idle.rss_kb)).collect(),
        true,
    ));
    rows.push((
        "RSS under load, highest after a sustained run (MB)".into(),
        proxies.iter().map(|p| mb(p.loaded_rss_kb)).collect(),
        true,
    ));
    rows.push((
        "peak RSS, overloaded runs included (MB)".into(),
        proxies
            .iter()
            .map(|p| p.proxy.as_ref().and_then(|x| mb(x.usage().peak_rss_kb)))
            .collect(),
        true,
    ));
    rows.push((
        "RSS at the end, clients gone (MB)".into(),
        proxies
            .iter()
            .map(|p| p.proxy.as_ref().and_then(|x| mb(x.usage().rss_kb)))
            .collect(),
        true,
    ));
    let top = settings.rates.len() - 1;
    for proxy in proxies
        .iter()
        .filter(|p| sustains(&p.runs[top], settings.repeats))
    {
        println!(
            "{} sustained the highest rate tried, {}/s: its limit is higher.",
            proxy.name, settings.rates[top]
        );
    }
    print!("| figure |");
    for proxy in proxies {
        print!(" {} |", proxy.name);
    }
    if proxies.len() == 2 {
        print!(" ratio |");
    }
    println!();
    println!(
        "|---|{}",
        "---:|".repeat(proxies.len() + usize::from(proxies.len() == 2))
    );
    for (label, values, lower_is_better) in rows {
        print!("| {label} |");
        for value in &values {
            print!(" {} |", value.map_or("—".into(), |v| format!("{v:.1}")));
        }
        // The ratio says how many times better berth is (added latency below
        // 1 µs is counted as 1 µs, so that noise cannot make it infinite).
        if let [Some(ours), Some(theirs)] = values[..] {
            let (ours, theirs) = (ours.max(1.0), theirs.max(1.0));
            let ratio = if lower_is_better {
                theirs / ours
            } else {
                ours / theirs
            };
            print!(" {ratio:.1}× |");
        } else if values.len() == 2 {
            print!(" — |");
        }
        println!();
    }
    if let Some(berth) = proxies.iter().find(|p| p.name == BERTH) {
        for proxy in proxies.iter().filter(|p| p.name != BERTH) {
            let ratios = proxy.cpu_ratios_to(berth);
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:+.1}")).collect();
            if let Some(median) = median(ratios) {
                println!(
                    "CPU per request of {} against berth, median of the repeats' ratios: {median:+.1} % (repeats: {} %)",
                    proxy.name,
                    each.join(", ")
                );
            }
        }
    }
    own_figures(settings, direct, proxies, &cached);
    if let (Some(floor), Some(berth)) = (floor, proxies.iter().find(|p| p.name == BERTH)) {
        floor_figures(settings, direct, floor, berth);
    }
}

/// nginx's added latency beside berth's, and what berth adds beyond it.
fn floor_figures(settings: &Settings, direct: &Subject, floor: &Subject, berth: &Subject) {
    let added = |subject: &Subject, index: usize, q: f64| {
        added_us(&direct.runs[index], &subject.runs[index], q)
    };
    let cell = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
    println!();
    println!(
        "| rate/s | nginx p50 / p99 µs | nginx added p50 / p99 µs | berth added p50 / p99 µs | berth beyond nginx p50 / p99 µs |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (index, rate) in settings.rates.iter().enumerate() {
        let beyond = |q| Some(added(berth, index, q)? - added(floor, index, q)?);
        println!(
            "| {rate} | {} | {} / {} | {} / {} | {} / {} |",
            latency_cell(&floor.runs[index], settings.repeats),
            cell(added(floor, index, 0.5)),
            cell(added(floor, index, 0.99)),
            cell(added(berth, index, 0.5)),
            cell(added(berth, index, 0.99)),
            cell(beyond(0.5)),
            cell(beyond(0.99)),
        );
    }
    let highest = |subject: &Subject| {
        subject
            .highest_sustained(settings)
            .map_or("—".into(), |rate| rate.to_string())
    };
    let cpu = |subject: &Subject| cell(subject.cpu_per_request_us());
    println!();
    println!("| figure | nginx | berth |");
    println!("|---|---:|---:|");
    println!(
        "| highest rate sustained without errors (/s) | {} | {} |",
        highest(floor),
        highest(berth)
    );
    println!("| CPU per request (µs) | {} | {} |", cpu(floor), cpu(berth));
}

/// berth's own time per request by its overhead header, and its cache-hit
/// latency (end to end, and by the header), beside the upstream's latency.
fn own_figures(settings: &Settings, direct: &Subject, proxies: &[&Subject], cached: &[&Subject]) {
    let (Some(berth), Some(cached)) = (proxies.iter().find(|p| p.name == BERTH), cached.first())
    else {
        return;
    };
    let header = |runs: &[Run]| {
        let p = |q| {
            median(
                runs.iter()
                    .filter_map(|r| r.overhead_percentile_us(q))
                    .map(|v| v as f64)
                    .collect(),
            )
        };
        match (p(0.5), p(0.99)) {
            (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
            _ => "—".into(),
        }
    };
    println!();
    println!(
        "| rate/s | upstream p50 / p99 µs | berth x-berth-overhead-us p50 / p99 | berth cache hit p50 / p99 µs | cache hit x-berth-overhead-us p50 / p99 |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for (index, rate) in settings.rates.iter().enumerate() {
        println!(
            "| {rate} | {} | {} | {} | {} |",
            latency_cell(&direct.runs[index], settings.repeats),
            header(&berth.runs[index]),
            latency_cell(&cached.runs[index], settings.repeats),
            header(&cached.runs[index]),
        );
    }
}

/// "p50 / p99" of the median repeat, with how many repeats were sustained.
fn latency_cell(runs: &[Run], repeats: usize) -> String {
    let p = |q| {
        median(
            runs.iter()
                .filter_map(|r| r.percentile_us(q))
                .map(|v| v as f64)
                .collect(),
        )
    };
    let sustained = runs.iter().filter(|r| r.sustained()).count();
    let mark = if sustained == repeats {
        String::new()
    } else {
        format!(" ({sustained}/{repeats} ok)")
    };
    match (p(0.5), p(0.99)) {
        (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}{mark}"),
        _ => format!("—{mark}"),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
