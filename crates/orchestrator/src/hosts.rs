//! The host registry: agents by address, their connections, heartbeats and
//! what each offers. A host that does not answer is marked unreachable with
//! the reason; the registry keeps trying. A host that answers while one of
//! the runtimes it offers fails (the slurm runtime's slurmrestd down) stays
//! ready, its message saying it is degraded and why.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{Gpu, HostInfo, InfoRequest};
use berth_proto::common::v1::Runtime;
use berth_proto::orchestrator::v1::{Host, HostStatus};
use berth_server::CancellationToken;
use berth_server::client::AuthChannel;

use crate::error::OrchestratorError;
use crate::ssh_tunnel::{SshConfig, SshTarget, SshTunnel};
use crate::store::{HostRecord, Store};

pub type AgentClient = ContainerAgentClient<AuthChannel>;

#[derive(Clone)]
struct HostEntry {
    record: HostRecord,
    status: HostStatus,
    message: String,
    last_seen: Option<SystemTime>,
    info: Option<HostInfo>,
    client: Option<AgentClient>,
    /// For ssh:// hosts: the tunnel the client goes through.
    tunnel: Option<Arc<std::sync::Mutex<SshTunnel>>>,
}

impl HostEntry {
    fn new(record: HostRecord) -> Self {
        Self {
            record,
            status: HostStatus::Unknown,
            message: "not contacted yet".into(),
            last_seen: None,
            info: None,
            client: None,
            tunnel: None,
        }
    }

    /// The cached client, unless its SSH tunnel has died.
    fn live_client(&self) -> Option<AgentClient> {
        let tunnel_alive = self.tunnel.as_ref().is_none_or(|t| {
            t.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_alive()
        });
        self.client.clone().filter(|_| tunnel_alive)
    }
}

/// A host as placement sees it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub record: HostRecord,
    pub status: HostStatus,
    pub message: String,
    pub info: Option<HostInfo>,
}

pub struct HostRegistry {
    store: Arc<dyn Store>,
    hosts: RwLock<BTreeMap<String, HostEntry>>,
    connect_timeout: Duration,
    ssh: SshConfig,
    /// Held while connecting to a host, one lock per host name.
    connecting: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Every stored host, not yet contacted.
fn stored_hosts(store: &dyn Store) -> Result<BTreeMap<String, HostEntry>, OrchestratorError> {
    Ok(store
        .hosts()?
        .into_iter()
        .map(|record| (record.name.clone(), HostEntry::new(record)))
        .collect())
}

impl HostRegistry {
    pub fn load(
        store: Arc<dyn Store>,
        connect_timeout: Duration,
        ssh: SshConfig,
    ) -> Result<Self, OrchestratorError> {
        let hosts = stored_hosts(store.as_ref())?;
        Ok(Self {
            store,
            hosts: RwLock::new(hosts),
            connect_timeout,
            ssh,
            connecting: std::sync::Mutex::default(),
        })
    }

    /// The hosts as stored now, in place of those loaded before: a follower
    /// taking the lease over knows the hosts the old leader registered.
    pub fn reload(&self) -> Result<(), OrchestratorError> {
        let hosts = stored_hosts(self.store.as_ref())?;
        *self.write() = hosts;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, HostEntry>> {
        self.hosts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, HostEntry>> {
        self.hosts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a host, then contacts it once; an unreachable host is still
    /// registered, with its status saying why.
    pub async fn register(&self, record: HostRecord) -> Result<Host, OrchestratorError> {
        validate_host(&record)?;
        self.store.upsert_host(&record)?;
        self.write()
            .insert(record.name.clone(), HostEntry::new(record.clone()));
        let _ = self.probe(&record.name).await;
        self.host(&record.name)
            .ok_or(OrchestratorError::HostNotFound(record.name))
    }

    pub fn deregister(&self, name: &str) -> Result<(), OrchestratorError> {
        if !self.store.delete_host(name)? {
            return Err(OrchestratorError::HostNotFound(name.to_string()));
        }
        self.write().remove(name);
        Ok(())
    }

    /// The host's power sampler address; empty when it has none.
    pub fn power_sampler(&self, name: &str) -> String {
        self.read()
            .get(name)
            .map(|e| e.record.power_sampler.clone())
            .unwrap_or_default()
    }

    /// The GPUs the host's agent last reported; none before it answered.
    pub fn gpus(&self, name: &str) -> Vec<Gpu> {
        self.read()
            .get(name)
            .and_then(|e| e.info.as_ref())
            .map(|info| info.gpus.clone())
            .unwrap_or_default()
    }

    pub fn host(&self, name: &str) -> Option<Host> {
        self.read().get(name).map(to_proto)
    }

    pub fn list(&self) -> Vec<Host> {
        self.read().values().map(to_proto).collect()
    }

    pub fn views(&self) -> Vec<HostView> {
        self.read()
            .values()
            .map(|e| HostView {
                record: e.record.clone(),
                status: e.status,
                message: e.message.clone(),
                info: e.info.clone(),
            })
            .collect()
    }

    /// Why `runtime` fails on `host` now, when its agent lists it as
    /// unavailable (the slurm runtime while slurmrestd is down): the
    /// agent answers, so runs of that runtime wait rather than be refused.
    pub fn runtime_failing(&self, host: &str, runtime: Runtime) -> Option<String> {
        let hosts = self.read();
        let info = hosts.get(host)?.info.as_ref()?;
        let why = info.unavailable_runtimes.get(runtime.as_str_name())?;
        Some(format!("host `{host}`: {}: {why}", runtime.as_str_name()))
    }

    /// The cached client of a host, if it has a live one, and its record.
    fn cached(&self, name: &str) -> Result<(HostRecord, Option<AgentClient>), String> {
        let hosts = self.read();
        let entry = hosts
            .get(name)
            .ok_or_else(|| format!("host `{name}` is not registered"))?;
        Ok((entry.record.clone(), entry.live_client()))
    }

    /// A client for the host's agent, connecting if there is none. One
    /// connection attempt per host at a time: the heartbeat and the
    /// scheduler asking at once must not open two tunnels (the second
    /// would end the first as stale).
    pub async fn client(&self, name: &str) -> Result<AgentClient, String> {
        if let (_, Some(client)) = self.cached(name)? {
            return Ok(client);
        }
        let lock = Arc::clone(
            self.connecting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(name.to_string())
                .or_default(),
        );
        let _connecting = lock.lock().await;
        let (record, client) = self.cached(name)?;
        if let Some(client) = client {
            return Ok(client);
        }
        let (address, tunnel) = match SshTarget::parse(&record.address) {
            Ok(target) => match SshTunnel::open(name, &target, &self.ssh).await {
                Ok(tunnel) => (
                    format!("unix://{}", tunnel.local_socket().display()),
                    Some(tunnel),
                ),
                Err(reason) => {
                    self.mark_unreachable(name, &reason);
                    return Err(reason);
                }
            },
            Err(_) => (record.address.clone(), None),
        };
        let channel = berth_server::client::connect(&address, &record.token, self.connect_timeout)
            .await
            .map_err(|e| e.to_string());
        let channel = match channel {
            Ok(channel) => channel,
            Err(reason) => {
                self.mark_unreachable(name, &reason);
                return Err(reason);
            }
        };
        let client = ContainerAgentClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
        if let Some(entry) = self.write().get_mut(name) {
            entry.client = Some(client.clone());
            entry.tunnel = tunnel.map(|t| Arc::new(std::sync::Mutex::new(t)));
        }
        Ok(client)
    }

    /// Asks the host's agent what it offers; updates its status either way.
    pub async fn probe(&self, name: &str) -> Result<HostInfo, String> {
        let mut client = self.client(name).await?;
        let mut request = tonic::Request::new(InfoRequest {});
        request.set_timeout(self.connect_timeout);
        let sent = Instant::now();
        match client.info(request).await {
            Ok(response) => {
                crate::metrics::metrics().heartbeat(sent.elapsed());
                let info = response.into_inner();
                if let Some(entry) = self.write().get_mut(name) {
                    let degraded = degraded_message(&info);
                    if !degraded.is_empty() && degraded != entry.message {
                        tracing::warn!(host = name, reason = degraded, "host degraded");
                    }
                    entry.status = HostStatus::Ready;
                    entry.message = degraded;
                    entry.last_seen = Some(SystemTime::now());
                    entry.info = Some(info.clone());
                }
                Ok(info)
            }
            Err(status) => {
                let reason = if status.code() == tonic::Code::Unauthenticated {
                    format!(
                        "the agent of host `{name}` refused the token ({}): register the host \
                         again with the agent's token",
                        describe_status(&status)
                    )
                } else {
                    describe_status(&status)
                };
                self.mark_unreachable(name, &reason);
                Err(reason)
            }
        }
    }

    /// Records that the host did not answer; the next use reconnects.
    pub fn mark_unreachable(&self, name: &str, reason: &str) {
        if let Some(entry) = self.write().get_mut(name) {
            if entry.status != HostStatus::Unreachable {
                tracing::warn!(host = name, address = %entry.record.address, reason, "host unreachable");
            }
            entry.status = HostStatus::Unreachable;
            entry.message = format!("{}: {reason}", entry.record.address);
            entry.client = None;
            entry.tunnel = None;
        }
    }

    /// Probes every host until `shutdown`: a host that answers again after
    /// `interval`; one that does not after a delay that doubles from
    /// `interval` up to [`MAX_RECONNECT_BACKOFF`] (see [`ReconnectBackoff`]).
    /// Each probe runs on its own, so a host that hangs (a link down, an ssh
    /// waiting for its connect timeout) does not hold up the others.
    pub fn spawn_heartbeats(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        self.spawn_heartbeats_with(interval, MAX_RECONNECT_BACKOFF, shutdown);
    }

    /// [`Self::spawn_heartbeats`] with the cap of the reconnect backoff.
    pub fn spawn_heartbeats_with(
        self: &Arc<Self>,
        interval: Duration,
        max_backoff: Duration,
        shutdown: CancellationToken,
    ) {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            let mut schedule: BTreeMap<String, (ReconnectBackoff, Instant)> = BTreeMap::new();
            let mut probes: tokio::task::JoinSet<(String, bool)> = tokio::task::JoinSet::new();
            let mut in_flight = std::collections::BTreeSet::new();
            loop {
                let now = Instant::now();
                let names: Vec<String> = registry.read().keys().cloned().collect();
                schedule.retain(|name, _| names.contains(name));
                for name in names {
                    let (_, due) = schedule
                        .entry(name.clone())
                        .or_insert_with(|| (ReconnectBackoff::new(interval, max_backoff), now));
                    if *due <= now && in_flight.insert(name.clone()) {
                        let registry = Arc::clone(&registry);
                        probes.spawn(async move {
                            let answered = registry.probe(&name).await.is_ok();
                            (name, answered)
                        });
                    }
                }
                // Wake for the next host due, at the latest after `interval`
                // (hosts registered meanwhile), or when a probe ends.
                let wake = schedule
                    .iter()
                    .filter(|(name, _)| !in_flight.contains(*name))
                    .map(|(_, (_, due))| *due)
                    .min()
                    .unwrap_or(now + interval)
                    .min(now + interval);
                tokio::select! {
                    () = shutdown.cancelled() => {
                        probes.abort_all();
                        return;
                    }
                    () = tokio::time::sleep_until(wake.into()) => {}
                    Some(ended) = probes.join_next(), if !probes.is_empty() => {
                        if let Ok((name, answered)) = ended {
                            in_flight.remove(&name);
                            if let Some((backoff, due)) = schedule.get_mut(&name) {
                                if answered {
                                    backoff.succeeded();
                                } else {
                                    backoff.failed();
                                }
                                *due = Instant::now() + backoff.delay();
                            }
                        } else {
                            // A probe that panicked: forget its host's
                            // schedule so that it is probed afresh.
                            in_flight.clear();
                            probes.abort_all();
                            schedule.clear();
                        }
                    }
                }
            }
        });
    }
}

/// Longest wait between two tries to reach a host that does not answer.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// When to probe a host next: every `interval` while it answers; after
/// `n` failures in a row, `interval * 2^(n-1)`, capped at `max` (and never
/// under `interval`). A success starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectBackoff {
    interval: Duration,
    max: Duration,
    failures: u32,
}

impl ReconnectBackoff {
    pub fn new(interval: Duration, max: Duration) -> Self {
        Self {
            interval,
            max: max.max(interval),
            failures: 0,
        }
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait before the next probe.
    pub fn delay(&self) -> Duration {
        let Some(doublings) = self.failures.checked_sub(1) else {
            return self.interval;
        };
        let factor = 1u32.checked_shl(doublings).unwrap_or(u32::MAX);
        self.interval.saturating_mul(factor).min(self.max)
    }
}

/// "degraded: RUNTIME_X: why; …" for the runtimes the agent offers yet lists
/// as unavailable too: it answers, but they fail now (the slurm runtime
/// while slurmrestd is down); empty when none does. The host stays ready:
/// its other runtimes, and what already runs, go on.
fn degraded_message(info: &HostInfo) -> String {
    let failing: Vec<String> = info
        .runtimes
        .iter()
        .filter_map(|kind| Runtime::try_from(*kind).ok())
        .filter_map(|runtime| {
            let name = runtime.as_str_name();
            let why = info.unavailable_runtimes.get(name)?;
            Some(format!("{name}: {why}"))
        })
        .collect();
    if failing.is_empty() {
        String::new()
    } else {
        format!("degraded: {}", failing.join("; "))
    }
}

pub fn describe_status(status: &tonic::Status) -> String {
    let message = status.message();
    let code = format!("{:?}", status.code());
    if message.is_empty() {
        code
    } else {
        format!("{code}: {message}")
    }
}

fn validate_host(record: &HostRecord) -> Result<(), OrchestratorError> {
    let valid_name = !record.name.is_empty()
        && record.name.len() <= 64
        && record
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name {
        return Err(OrchestratorError::InvalidArgument {
            field: "name",
            reason: format!(
                "`{}` is not a valid host name (1-64 of letters, digits, '-', '_', '.')",
                record.name
            ),
        });
    }
    let address = record.address.as_str();
    if address.starts_with("ssh://") {
        return SshTarget::parse(address).map(|_| ()).map_err(|reason| {
            OrchestratorError::InvalidArgument {
                field: "address",
                reason: format!("`{address}`: {reason}"),
            }
        });
    }
    let valid = address
        .strip_prefix("unix://")
        .is_some_and(|p| p.starts_with('/'))
        || address
            .strip_prefix("http://")
            .or_else(|| address.strip_prefix("https://"))
            .is_some_and(|rest| rest.contains(':'));
    if !valid {
        return Err(OrchestratorError::InvalidArgument {
            field: "address",
            reason: format!(
                "`{address}` is not an agent address (unix:///path/agent.sock, http://host:port \
                 or ssh://user@host[:port]/path/agent.sock)"
            ),
        });
    }
    let sampler = record.power_sampler.as_str();
    if !(sampler.is_empty() || sampler.starts_with("http://") || sampler.starts_with("unix:///")) {
        return Err(OrchestratorError::InvalidArgument {
            field: "power_sampler",
            reason: format!(
                "`{sampler}` is not a power sampler address (http://host:port or unix:///path)"
            ),
        });
    }
    if address.starts_with("http") && record.token.is_empty() {
        return Err(OrchestratorError::InvalidArgument {
            field: "token",
            reason: format!("agent `{address}` is reached over TCP and needs its token"),
        });
    }
    Ok(())
}

fn to_proto(entry: &HostEntry) -> Host {
    let info = entry.info.clone().unwrap_or_default();
    Host {
        name: entry.record.name.clone(),
        address: entry.record.address.clone(),
        labels: entry
            .record
            .labels
            .clone()
            .into_iter()
            .chain(info.labels)
            .collect(),
        status: entry.status as i32,
        status_message: entry.message.clone(),
        last_seen: entry.last_seen.map(Into::into),
        runtimes: info.runtimes,
        cpus: info.cpus,
        memory_bytes: info.memory_bytes,
        gpu_count: info.gpus.len() as u32,
        gpus: info.gpus,
        power_sampler: entry.record.power_sampler.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_degraded_by_an_offered_runtime_that_fails_not_by_one_it_lacks() {
        let mut info = HostInfo {
            runtimes: vec![Runtime::Process as i32, Runtime::Slurm as i32],
            unavailable_runtimes: [(
                "RUNTIME_DOCKER".to_string(),
                "engines.docker is \"off\"".to_string(),
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(degraded_message(&info), "", "docker is not offered at all");
        info.unavailable_runtimes.insert(
            "RUNTIME_SLURM".into(),
            "slurmrestd at http://login1:6820 is unavailable: connecting: refused".into(),
        );
        assert_eq!(
            degraded_message(&info),
            "degraded: RUNTIME_SLURM: slurmrestd at http://login1:6820 is unavailable: connecting: refused"
        );
    }

    #[test]
    fn reconnect_backoff_doubles_up_to_its_cap_and_resets_on_success() {
        let interval = Duration::from_millis(200);
        let mut backoff = ReconnectBackoff::new(interval, Duration::from_secs(3));
        assert_eq!(
            backoff.delay(),
            interval,
            "a host that answers: every interval"
        );
        let mut delays = Vec::new();
        for _ in 0..8 {
            backoff.failed();
            delays.push(backoff.delay().as_millis());
        }
        assert_eq!(delays, [200, 400, 800, 1600, 3000, 3000, 3000, 3000]);
        assert_eq!(backoff.failures(), 8);
        backoff.succeeded();
        assert_eq!(backoff.delay(), interval);
        // Many failures neither overflow nor pass the cap.
        for _ in 0..100 {
            backoff.failed();
        }
        assert_eq!(backoff.delay(), Duration::from_secs(3));
        // A cap under the interval is the interval.
        let mut tight = ReconnectBackoff::new(Duration::from_secs(5), Duration::from_secs(1));
        tight.failed();
        tight.failed();
        assert_eq!(tight.delay(), Duration::from_secs(5));
    }

    /// An "agent" that accepts connections and closes them at once: every
    /// probe fails, and each try shows as one accepted connection.
    #[tokio::test]
    async fn an_unreachable_host_is_probed_with_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("s.db")).unwrap());
        let registry = Arc::new(
            HostRegistry::load(store, Duration::from_millis(200), SshConfig::default()).unwrap(),
        );
        let socket = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let tries = Arc::new(std::sync::Mutex::new(Vec::new()));
        let counted = Arc::clone(&tries);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.lock().unwrap().push(Instant::now());
                drop(stream);
            }
        });
        let host = registry
            .register(HostRecord {
                name: "flaky".into(),
                address: format!("unix://{}", socket.display()),
                token: String::new(),
                labels: BTreeMap::new(),
                power_sampler: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(host.status, HostStatus::Unreachable as i32, "{host:?}");
        assert!(host.status_message.contains("agent.sock"), "{host:?}");
        let shutdown = CancellationToken::new();
        registry.spawn_heartbeats_with(
            Duration::from_millis(50),
            Duration::from_millis(400),
            shutdown.clone(),
        );
        tokio::time::sleep(Duration::from_millis(2000)).await;
        shutdown.cancel();
        accept.abort();
        let tries = tries.lock().unwrap().clone();
        // A fixed 50 ms beat would have tried ~40 times; doubling up to
        // 400 ms tries ~8 times (50, 100, 200, 400, 400, …).
        assert!(
            (4..=14).contains(&tries.len()),
            "{} tries in 2 s",
            tries.len()
        );
        let gaps: Vec<Duration> = tries.windows(2).map(|w| w[1] - w[0]).collect();
        let last = *gaps.last().unwrap();
        assert!(
            last >= Duration::from_millis(300),
            "the gap grew to the cap: {gaps:?}"
        );
        assert!(
            gaps.iter().all(|g| *g <= Duration::from_millis(900)),
            "capped: {gaps:?}"
        );
    }
}
