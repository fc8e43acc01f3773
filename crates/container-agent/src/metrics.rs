//! The agent's domain metrics, beside the per-call gRPC metrics every
//! service has (berth_server::metrics): workloads, execs, restarts and
//! image imports. Names are constants here, the crate's one place for them.
//!
//! Labels take bounded values only: runtimes, states, reasons and outcomes
//! from the agent's own short lists, never a workload's name or image.
//!
//! What happens (an exec started, a restart, an import) is counted where it
//! happens, in process-wide families ([`metrics`]), so the service reaches
//! them without being handed them and several agents in one process (tests)
//! add into the same ones. What is a state (workloads by state, execs
//! running) is read at each scrape from every live agent's [`Census`], so
//! it cannot drift from what the agent holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use berth_proto::agent::v1::{EventKind, WorkloadEvent, WorkloadState};
use berth_proto::common::v1::Runtime;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, broadcast};

use crate::runtime::WorkloadRuntime;

/// Workloads the agent's runtimes hold, by runtime and state.
pub const WORKLOADS: &str = "berth_agent_workloads";
/// Execs running (keyed ones whose client went away included).
pub const EXECS_IN_FLIGHT: &str = "berth_agent_execs_in_flight";
/// From an Exec call's arrival to its command started and its output
/// stream open, by runtime.
pub const EXEC_START_SECONDS: &str = "berth_agent_exec_start_seconds";
/// Workload restarts (counter; `_total` in the exposition), by reason:
/// `exited` or `oom_killed` (started again after dying, as a restart
/// policy does), `requested` (restarted while running).
pub const RESTARTS: &str = "berth_agent_restarts";
/// Image imports (counter; `_total`), by runtime and outcome (`ok`,
/// `too_large`, `failed`).
pub const IMAGE_IMPORTS: &str = "berth_agent_image_imports";

/// How often the workload census is taken when no event prompts it.
const CENSUS_EVERY: Duration = Duration::from_secs(30);
/// Events within this much of each other prompt one census.
const CENSUS_SETTLE: Duration = Duration::from_secs(1);
/// Most workloads whose last death is remembered to name a restart's reason.
const MAX_DEATHS_KEPT: usize = 4096;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub runtime: &'static str,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportLabels {
    pub runtime: &'static str,
    pub outcome: &'static str,
}

/// The event-counted metrics, and the censuses of the live agents.
#[derive(Debug)]
pub struct Metrics {
    exec_start: Family<RuntimeLabels, Histogram>,
    restarts: Family<ReasonLabels, Counter>,
    image_imports: Family<ImportLabels, Counter>,
    censuses: Mutex<Vec<Weak<Census>>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    // 100 µs to about 6.5 s: a process starts in milliseconds, a container
    // exec or a VM's guest agent in tens to hundreds.
    exec_start: Family::new_with_constructor(|| {
        Histogram::new(exponential_buckets(0.0001, 2.0, 17))
    }),
    restarts: Family::default(),
    image_imports: Family::default(),
    censuses: Mutex::default(),
});

/// The process's event-counted metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// A runtime's label value: its proto name, lowercase without the prefix.
pub fn runtime_label(kind: Runtime) -> &'static str {
    match kind {
        Runtime::Unspecified => "unspecified",
        Runtime::Process => "process",
        Runtime::Docker => "docker",
        Runtime::Podman => "podman",
        Runtime::Libvirt => "libvirt",
        Runtime::Slurm => "slurm",
    }
}

impl Metrics {
    pub fn exec_started(&self, runtime: Runtime, took: Duration) {
        self.exec_start
            .get_or_create(&RuntimeLabels {
                runtime: runtime_label(runtime),
            })
            .observe(took.as_secs_f64());
    }

    /// An import ended: `Ok`, or refused for its size (`too_large`), or failed.
    pub fn image_imported(&self, runtime: Runtime, outcome: &'static str) {
        self.image_imports
            .get_or_create(&ImportLabels {
                runtime: runtime_label(runtime),
                outcome,
            })
            .inc();
    }

    fn restarted(&self, reason: &'static str) {
        self.restarts.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// One agent's state as the scrape reads it: its exec slots, and its
/// workloads as last counted by its census task.
#[derive(Debug)]
pub struct Census {
    execs: Arc<Semaphore>,
    max_execs: usize,
    workloads: Mutex<BTreeMap<(&'static str, &'static str), i64>>,
}

impl Census {
    /// Counts an agent's workloads, and its restarts from its events, for
    /// as long as the returned census lives (the agent's service holds it).
    pub fn start(
        runtimes: &[Arc<dyn WorkloadRuntime>],
        events: broadcast::Receiver<WorkloadEvent>,
        execs: Arc<Semaphore>,
        max_execs: usize,
    ) -> Arc<Self> {
        let census = Arc::new(Self {
            execs,
            max_execs,
            workloads: Mutex::default(),
        });
        let mut censuses = METRICS.censuses.lock().unwrap_or_else(|e| e.into_inner());
        censuses.retain(|c| c.strong_count() > 0);
        censuses.push(Arc::downgrade(&census));
        // Weak: the task keeps neither the census nor the runtimes alive.
        let runtimes = runtimes.iter().map(Arc::downgrade).collect();
        tokio::spawn(count(Arc::downgrade(&census), runtimes, events));
        census
    }

    fn execs_in_flight(&self) -> i64 {
        let free = self.execs.available_permits().min(self.max_execs);
        (self.max_execs - free) as i64
    }
}

/// The census task: a count after each burst of events and every
/// [`CENSUS_EVERY`]; restarts read from the events. Ends with its census.
async fn count(
    census: Weak<Census>,
    runtimes: Vec<Weak<dyn WorkloadRuntime>>,
    mut events: broadcast::Receiver<WorkloadEvent>,
) {
    let mut deaths = Deaths::default();
    loop {
        let Some(census) = census.upgrade() else {
            return;
        };
        let mut counted = BTreeMap::new();
        for runtime in runtimes.iter().filter_map(Weak::upgrade) {
            // A runtime that cannot list now (its engine restarting) keeps
            // its last count rather than drop to zero.
            match runtime.list().await {
                Ok(workloads) => {
                    for workload in workloads {
                        *counted
                            .entry((runtime_label(runtime.kind()), state_label(workload.state())))
                            .or_insert(0) += 1;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, runtime = runtime_label(runtime.kind()), "workload census");
                    let last = census.workloads.lock().unwrap_or_else(|e| e.into_inner());
                    let kind = runtime_label(runtime.kind());
                    counted.extend(last.iter().filter(|((r, _), _)| *r == kind));
                }
            }
        }
        *census.workloads.lock().unwrap_or_else(|e| e.into_inner()) = counted;
        drop(census);
        // Wait for an event (or the period), then let a burst settle.
        let first = tokio::time::timeout(CENSUS_EVERY, events.recv()).await;
        let mut next = match first {
            Ok(Err(broadcast::error::RecvError::Closed)) => return,
            Ok(received) => Some(received),
            Err(_) => None,
        };
        let settle = tokio::time::sleep(CENSUS_SETTLE);
        tokio::pin!(settle);
        while let Some(received) = next.take() {
            if let Ok(event) = received {
                deaths.see(&event);
            }
            next = tokio::select! {
                received = events.recv() => Some(received),
                () = &mut settle => None,
            };
        }
    }
}

/// A state's label value: its proto name, lowercase without the prefix.
fn state_label(state: WorkloadState) -> &'static str {
    match state {
        WorkloadState::Unspecified => "unspecified",
        WorkloadState::Created => "created",
        WorkloadState::Running => "running",
        WorkloadState::Stopped => "stopped",
        WorkloadState::Exited => "exited",
        WorkloadState::Restarting => "restarting",
        WorkloadState::Removing => "removing",
    }
}

/// Each workload's last death not yet followed by a stop or a start, to
/// tell a restart (a start after a death) and its reason.
#[derive(Debug, Default)]
struct Deaths(HashMap<String, &'static str>);

impl Deaths {
    fn see(&mut self, event: &WorkloadEvent) {
        let id = &event.workload_id;
        match event.kind() {
            EventKind::Died => {
                // An OOM kill is published right after its death.
                self.remember(id, "exited");
            }
            EventKind::OomKilled => self.remember(id, "oom_killed"),
            EventKind::Started => {
                if let Some(reason) = self.0.remove(id) {
                    metrics().restarted(reason);
                }
            }
            EventKind::Restarted => {
                let reason = self.0.remove(id).unwrap_or("requested");
                metrics().restarted(reason);
            }
            EventKind::Stopped | EventKind::Removed => {
                self.0.remove(id);
            }
            EventKind::Unspecified | EventKind::Created | EventKind::HealthChanged => {}
        }
    }

    fn remember(&mut self, id: &str, reason: &'static str) {
        // Bounded: past the cap the oldest knowledge is dropped wholesale; at
        // worst a restart then goes uncounted.
        if self.0.len() >= MAX_DEATHS_KEPT && !self.0.contains_key(id) {
            self.0.clear();
        }
        self.0.insert(id.to_string(), reason);
    }
}

/// Adds the agent's metrics to `registry`.
pub fn register(registry: &mut Registry) {
    let metrics = metrics();
    registry.register(
        EXEC_START_SECONDS,
        "From an Exec call's arrival to its command started, by runtime",
        metrics.exec_start.clone(),
    );
    registry.register(
        RESTARTS,
        "Workload restarts by reason (exited, oom_killed, requested)",
        metrics.restarts.clone(),
    );
    registry.register(
        IMAGE_IMPORTS,
        "Image imports by runtime and outcome (ok, too_large, failed)",
        metrics.image_imports.clone(),
    );
    registry.register_collector(Box::new(StateCollector));
}

/// Reads the live agents' censuses at each scrape.
#[derive(Debug)]
struct StateCollector;

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let censuses: Vec<Arc<Census>> = METRICS
            .censuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let workloads = Family::<WorkloadLabels, Gauge>::default();
        let in_flight = Gauge::<i64>::default();
        for census in &censuses {
            in_flight.inc_by(census.execs_in_flight());
            let counted = census.workloads.lock().unwrap_or_else(|e| e.into_inner());
            for ((runtime, state), count) in counted.iter() {
                workloads
                    .get_or_create(&WorkloadLabels { runtime, state })
                    .inc_by(*count);
            }
        }
        let metric = encoder.encode_descriptor(
            WORKLOADS,
            "Workloads the agent's runtimes hold, by runtime and state",
            None,
            workloads.metric_type(),
        )?;
        workloads.encode(metric)?;
        let metric = encoder.encode_descriptor(
            EXECS_IN_FLIGHT,
            "Execs running, keyed ones whose client went away included",
            None,
            in_flight.metric_type(),
        )?;
        in_flight.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: EventKind) -> WorkloadEvent {
        WorkloadEvent {
            workload_id: id.into(),
            kind: kind as i32,
            ..Default::default()
        }
    }

    fn restarts(reason: &'static str) -> u64 {
        metrics()
            .restarts
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    /// A start after a death is a restart, named by the death; a start
    /// after a stop is none; a restart of a running workload is requested.
    #[test]
    fn restarts_are_named_by_the_death_before_them() {
        let before = [
            restarts("exited"),
            restarts("oom_killed"),
            restarts("requested"),
        ];
        let mut deaths = Deaths::default();
        for (id, kind) in [
            ("a", EventKind::Started),
            ("a", EventKind::Died),
            ("a", EventKind::Started),
            ("b", EventKind::Died),
            ("b", EventKind::OomKilled),
            ("b", EventKind::Started),
            ("c", EventKind::Died),
            ("c", EventKind::Stopped),
            ("c", EventKind::Started),
            ("d", EventKind::Restarted),
        ] {
            deaths.see(&event(id, kind));
        }
        // Other tests in this process count no restarts.
        assert_eq!(
            [
                restarts("exited"),
                restarts("oom_killed"),
                restarts("requested"),
            ],
            [before[0] + 1, before[1] + 1, before[2] + 1]
        );
        assert!(deaths.0.is_empty());
    }
}
