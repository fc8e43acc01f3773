//! The proxies under test, each its own process so that its memory and CPU
//! time can be read from /proc: berth's binary, and LiteLLM started by
//! `scripts/llm/litellm-proxy.sh`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::load::HttpClient;

pub struct Proxy {
    child: Child,
}

/// Memory and CPU time of a process and its descendants (LiteLLM may fork
/// workers; berth does not).
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
    /// Time on CPU of each thread, by thread id, in ns.
    threads: Vec<(u32, u64)>,
}

impl Usage {
    /// CPU time (ns) its threads took since `before`: to the nanosecond,
    /// where /proc/PID/stat gives clock ticks of 10 ms, a few per cent of
    /// a run of a few seconds. A thread that ended in between is not
    /// counted: berth's threads and nginx's workers live as long as they
    /// do; a proxy that ends threads while it serves (Python's thread pools
    /// may, in LiteLLM) reads low by what they took.
    pub fn cpu_ns_since(&self, before: &Usage) -> u64 {
        self.threads
            .iter()
            .map(|&(tid, ns)| {
                let earlier = before
                    .threads
                    .iter()
                    .find(|&&(other, _)| other == tid)
                    .map_or(0, |&(_, ns)| ns);
                ns.saturating_sub(earlier)
            })
            .sum()
    }
}

impl Proxy {
    /// Starts `command` with its output in `log` and waits until it answers
    /// `/health/liveliness` (a path both proxies serve).
    pub async fn start(
        name: &'static str,
        mut command: Command,
        port: u16,
        log: &Path,
        client: &HttpClient,
        patience: Duration,
    ) -> Result<Self, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        let mut proxy = Self { child };
        let started = Instant::now();
        let uri: http::Uri = format!("http://127.0.0.1:{port}/health/liveliness")
            .parse()
            .expect("a valid URI");
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!(
                    "{name} exited with {status} before it was ready; its log: {}",
                    log.display()
                ));
            }
            if let Ok(response) = client.get(uri.clone()).await
                && response.status().is_success()
            {
                eprintln!("{name} ready in {:.1} s", started.elapsed().as_secs_f64());
                return Ok(proxy);
            }
            if started.elapsed() > patience {
                return Err(format!(
                    "{name} not ready after {patience:?}; its log: {}",
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        let mut pending = vec![self.child.id()];
        while let Some(pid) = pending.pop() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            usage.rss_kb += status_kb(&status, "VmRSS:");
            usage.peak_rss_kb += status_kb(&status, "VmHWM:");
            usage.threads.extend(thread_cpu_ns(pid));
            pending.extend(children(pid));
        }
        usage
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Descendants first: LiteLLM's workers would outlive their parent.
        let mut pids = vec![self.child.id()];
        let mut i = 0;
        while i < pids.len() {
            let found = children(pids[i]);
            pids.extend(found);
            i += 1;
        }
        for pid in pids.iter().skip(1).rev() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kb(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Time on CPU of each thread of a process: the first field of
/// /proc/PID/task/TID/schedstat, in ns.
fn thread_cpu_ns(pid: u32) -> Vec<(u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            Some((tid, stat.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}
