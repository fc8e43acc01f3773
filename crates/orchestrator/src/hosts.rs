//! The host registry: agents by address, their connections, heartbeats and
//! what each offers. A host that does not answer is marked unreachable with
//! the reason; the registry keeps trying.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use berth_proto::agent::v1::container_agent_client::ContainerAgentClient;
use berth_proto::agent::v1::{HostInfo, InfoRequest};
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
}

impl HostRegistry {
    pub fn load(
        store: Arc<dyn Store>,
        connect_timeout: Duration,
        ssh: SshConfig,
    ) -> Result<Self, OrchestratorError> {
        let hosts = store
            .hosts()?
            .into_iter()
            .map(|record| (record.name.clone(), HostEntry::new(record)))
            .collect();
        Ok(Self {
            store,
            hosts: RwLock::new(hosts),
            connect_timeout,
            ssh,
        })
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

    /// A client for the host's agent, connecting if there is none.
    pub async fn client(&self, name: &str) -> Result<AgentClient, String> {
        let (record, client) = {
            let hosts = self.read();
            let entry = hosts
                .get(name)
                .ok_or_else(|| format!("host `{name}` is not registered"))?;
            (entry.record.clone(), entry.live_client())
        };
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
        match client.info(request).await {
            Ok(response) => {
                let info = response.into_inner();
                if let Some(entry) = self.write().get_mut(name) {
                    entry.status = HostStatus::Ready;
                    entry.message.clear();
                    entry.last_seen = Some(SystemTime::now());
                    entry.info = Some(info.clone());
                }
                Ok(info)
            }
            Err(status) => {
                let reason = describe_status(&status);
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

    /// Probes every host at `interval` until `shutdown`.
    pub fn spawn_heartbeats(self: &Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let registry = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let names: Vec<String> = registry.read().keys().cloned().collect();
                let probes = names.iter().map(|name| registry.probe(name));
                futures::future::join_all(probes).await;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
            }
        });
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
        power_sampler: entry.record.power_sampler.clone(),
    }
}
