//! One replica on its host: which host takes it, the ports it gets, and
//! the agent calls that create, start, stop and remove its workload.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use berth_proto::agent::v1::{
    CreateWorkloadRequest, Gpu, ImportImageChunk, ImportImageMetadata, RemoveWorkloadRequest,
    StopWorkloadRequest, Workload, WorkloadRef, import_image_chunk,
};
use berth_proto::common::v1::{self as common, EnvVar, RestartPolicy, WorkloadSpec};
use berth_proto::orchestrator::v1::HostStatus;

use super::Deployments;
use super::recipe::{ImageImport, Recipe, Spread, Ulimit};
use crate::error::OrchestratorError;
use crate::gpu_leases;
use crate::hosts::{AgentClient, HostView, describe_status};
use crate::manifest::{RuntimeName, substitute};
use crate::placement;
use crate::store::deployments::ReplicaRecord;

/// Label of every replica's workload: its deployment.
pub const DEPLOYMENT_LABEL: &str = "berth.deployment";
/// Label of every replica's workload: its index.
pub const REPLICA_LABEL: &str = "berth.replica";

/// Why a replica could not be placed.
pub enum NotPlaced {
    /// No host fits or answers now: wait for one.
    Waiting(String),
    /// The agent refused to create or start it: counted against the restart cap.
    Refused(String),
}

/// The address replicas on a host are reached at, from its agent's address:
/// the host of a TCP or SSH agent, loopback for an agent on a unix socket.
pub fn endpoint_host(agent_address: &str) -> String {
    let rest = agent_address
        .split_once("://")
        .map_or(agent_address, |(_, rest)| rest);
    if agent_address.starts_with("unix:") {
        return "127.0.0.1".into();
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(bracketed) = host_port.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed).to_string();
    }
    host_port.split(':').next().unwrap_or(host_port).to_string()
}

/// Refuses a recipe no registered host can take, with each host's reason;
/// with no host ready the recipe is accepted and waits for one.
pub fn check_placeable(recipe: &Recipe, views: &[HostView]) -> Result<(), OrchestratorError> {
    if !views.iter().any(|h| h.status == HostStatus::Ready) {
        return Ok(());
    }
    let backend = recipe.backend();
    let mut reasons = Vec::new();
    for view in views {
        match misfit(recipe, &backend, view) {
            None => return Ok(()),
            Some(reason) => reasons.push(reason),
        }
    }
    Err(OrchestratorError::RecipeUnplaceable {
        deployment: recipe.name.clone(),
        reasons: reasons.join("; "),
    })
}

fn misfit(recipe: &Recipe, backend: &crate::manifest::Backend, view: &HostView) -> Option<String> {
    let name = &view.record.name;
    if !recipe.placement.hosts.is_empty() && !recipe.placement.hosts.contains(name) {
        return Some(format!("host `{name}` is not in placement.hosts"));
    }
    placement::misfit(backend, false, view)
}

/// Host ports a recipe fixes (a process's `port`, a container's
/// `host_port`): two replicas of it cannot share a host.
fn has_fixed_host_ports(recipe: &Recipe) -> bool {
    recipe.ports.iter().any(|p| match recipe.runtime {
        // A SLURM job's node is the cluster's choice: two replicas may land
        // on one, so a fixed port is a clash there too.
        runtime if runtime.binds_its_ports() => p.port != 0,
        // Each VM answers on an address of its own.
        RuntimeName::Libvirt => false,
        _ => p.host_port != 0,
    })
}

impl Deployments {
    /// The ready host for the replica: it fits, is not in `avoid`, holds no
    /// replica of the deployment when the recipe fixes host ports, and has
    /// the fewest (spread) or most (pack) of the deployment's replicas
    /// (those of `placed`, but for the one of index `except`).
    pub(super) fn choose_host(
        &self,
        recipe: &Recipe,
        placed: &[ReplicaRecord],
        except: Option<u32>,
        avoid: &[String],
    ) -> Result<String, String> {
        let views = self.hosts.views();
        if views.is_empty() {
            return Err("no hosts are registered (RegisterHost)".into());
        }
        let backend = recipe.backend();
        let mut on_host: HashMap<&str, usize> = HashMap::new();
        for other in placed
            .iter()
            .filter(|o| !o.host.is_empty() && Some(o.index) != except)
        {
            *on_host.entry(other.host.as_str()).or_default() += 1;
        }
        let fixed_ports = has_fixed_host_ports(recipe);
        let mut reasons = Vec::new();
        let mut fitting = Vec::new();
        for view in &views {
            let name = view.record.name.as_str();
            let reason = if let Some(reason) = misfit(recipe, &backend, view) {
                Some(reason)
            } else if view.status != HostStatus::Ready {
                Some(format!("host `{name}` is unreachable ({})", view.message))
            } else if avoid.iter().any(|a| a == name) {
                Some(format!("host `{name}` lost this replica"))
            } else if fixed_ports && on_host.contains_key(name) {
                Some(format!(
                    "host `{name}` has a replica already and the recipe fixes its host ports"
                ))
            } else {
                None
            };
            match reason {
                Some(reason) => reasons.push(reason),
                None => fitting.push((on_host.get(name).copied().unwrap_or(0), name)),
            }
        }
        let chosen = match recipe.placement.strategy {
            Spread::Spread => fitting.iter().min_by_key(|(count, name)| (*count, *name)),
            Spread::Pack => fitting
                .iter()
                .max_by_key(|(count, name)| (*count, std::cmp::Reverse(*name))),
        };
        chosen
            .map(|(_, name)| name.to_string())
            .ok_or_else(|| reasons.join("; "))
    }

    /// A host port for `port` of a replica on `host`, from
    /// `deployments.port_range`, not handed to any other replica there.
    fn allocate_port(&self, host: &str, seed: u32) -> Result<u16, String> {
        let (start, end) = (self.config.port_range_start, self.config.port_range_end);
        let span = u32::from(end.saturating_sub(start)) + 1;
        let mut in_use = super::lock(&self.ports_in_use);
        let used = in_use.entry(host.to_string()).or_default();
        let offset = rand::random::<u32>() ^ seed;
        for step in 0..span {
            let port = start + ((offset.wrapping_add(step)) % span) as u16;
            if !used.contains(&port) {
                used.push(port);
                return Ok(port);
            }
        }
        Err(format!(
            "every port of deployments.port_range ({start}-{end}) on host `{host}` is taken"
        ))
    }

    /// The replica's ports on `host`: name → the port it answers on there.
    pub(super) fn ports_for(
        &self,
        recipe: &Recipe,
        host: &str,
        index: u32,
    ) -> Result<BTreeMap<String, u16>, String> {
        let mut ports = BTreeMap::new();
        for port in &recipe.ports {
            // A process or a job binds its node's port; a VM its own address's.
            let fixed =
                if recipe.runtime.binds_its_ports() || recipe.runtime == RuntimeName::Libvirt {
                    port.port
                } else {
                    port.host_port
                };
            let host_port = if fixed == 0 {
                self.allocate_port(host, index)?
            } else {
                fixed
            };
            ports.insert(port.name.clone(), host_port);
        }
        Ok(ports)
    }

    /// Creates (or finds, when an earlier try created it) and starts the
    /// replica's workload on `host`. A workload that does not start is
    /// removed, so that a refusal leaves nothing behind.
    pub(super) async fn create_replica(
        &self,
        recipe: &Recipe,
        client: &mut AgentClient,
        host: &str,
        replica: &ReplicaRecord,
    ) -> Result<Workload, NotPlaced> {
        let name = workload_name(&recipe.name, replica.index, replica.generation, host);
        let spec = replica_spec(recipe, replica, &self.hosts.gpus(host));
        let refused = |what: &str, status: &tonic::Status| {
            let reason = format!("host `{host}`: {what}: {}", describe_status(status));
            if crate::scheduler::agent_did_not_answer(status.code()) {
                NotPlaced::Waiting(reason)
            } else {
                NotPlaced::Refused(reason)
            }
        };
        let created = self
            .bounded(client.create_workload(CreateWorkloadRequest {
                name: name.clone(),
                spec: Some(spec),
            }))
            .await;
        let workload = match created {
            Ok(created) => created.into_inner(),
            Err(status) if status.code() == tonic::Code::AlreadyExists => self
                .bounded(client.inspect_workload(WorkloadRef { id: name.clone() }))
                .await
                .map_err(|s| refused("inspecting the existing workload", &s))?
                .into_inner(),
            Err(status) => return Err(refused("creating the replica", &status)),
        };
        if let Err(status) = self.bounded(start(client, &workload.id)).await {
            remove(client, &workload.id).await;
            return Err(refused("starting the replica", &status));
        }
        Ok(workload)
    }

    /// Stops the replica's workload within the recipe's grace period and
    /// removes it from its host.
    pub(super) async fn remove_replica(
        &self,
        recipe: &Recipe,
        replica: &ReplicaRecord,
    ) -> Result<(), String> {
        if replica.workload_id.is_empty() {
            return Ok(());
        }
        let mut client = self.hosts.client(&replica.host).await?;
        let stopped = client
            .stop_workload(StopWorkloadRequest {
                id: replica.workload_id.clone(),
                timeout: prost_types::Duration::try_from(recipe.stop_grace).ok(),
            })
            .await;
        match stopped {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
            Err(status) => {
                tracing::warn!(deployment = %recipe.name, replica = replica.index, status = %describe_status(&status), "stop failed; removing by force")
            }
        }
        match client
            .remove_workload(RemoveWorkloadRequest {
                id: replica.workload_id.clone(),
                force: true,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(format!(
                "host `{}`: removing `{}`: {}",
                replica.host,
                replica.workload_id,
                describe_status(&status)
            )),
        }
    }
}

pub(super) async fn start(client: &mut AgentClient, id: &str) -> Result<Workload, tonic::Status> {
    client
        .start_workload(WorkloadRef { id: id.to_string() })
        .await
        .map(tonic::Response::into_inner)
}

async fn remove(client: &mut AgentClient, id: &str) {
    let request = RemoveWorkloadRequest {
        id: id.to_string(),
        force: true,
    };
    if let Err(status) = client.remove_workload(request).await {
        tracing::warn!(workload = id, status = %describe_status(&status), "could not remove a replica that did not start");
    }
}

/// The replica's workload: the recipe's, with its ports, index and GPUs in
/// place of the placeholders and requests, `BERTH_*` variables, labels, and
/// no restart by the engine (the orchestrator restarts, and counts it). A
/// VM's is its `vm:` and labels only.
fn replica_spec(recipe: &Recipe, replica: &ReplicaRecord, host_gpus: &[Gpu]) -> WorkloadSpec {
    let mut values = BTreeMap::from([("replica".to_string(), replica.index.to_string())]);
    for port in &recipe.ports {
        // What the workload itself binds: the host port for a process or a
        // job, the container's own port for a container.
        let bound = if recipe.runtime.binds_its_ports() {
            replica.ports.get(&port.name).copied().unwrap_or(port.port)
        } else {
            port.port
        };
        values.insert(format!("port.{}", port.name), bound.to_string());
    }
    let fill =
        |template: &String| substitute(template, &values).unwrap_or_else(|_| template.clone());
    let mut backend = recipe.backend();
    backend.command = recipe.command.iter().map(fill).collect();
    backend.env = recipe
        .env
        .iter()
        .map(|(k, v)| (k.clone(), fill(v)))
        .collect();
    let labels = HashMap::from([
        (DEPLOYMENT_LABEL.to_string(), recipe.name.clone()),
        (REPLICA_LABEL.to_string(), replica.index.to_string()),
    ]);
    let mut spec = backend.workload_spec(labels);
    spec.restart_policy = RestartPolicy::No as i32;
    if recipe.runtime == RuntimeName::Libvirt {
        // The guest is configured by its cloud-init, not by a command, an
        // environment or published ports (refused by the agent).
        return spec;
    }
    spec.env.extend([
        env("BERTH_DEPLOYMENT", recipe.name.clone()),
        env("BERTH_REPLICA", replica.index.to_string()),
    ]);
    for (name, value) in values
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("port.")?, v)))
    {
        spec.env.push(env(
            &format!("BERTH_PORT_{}", name.to_uppercase()),
            value.clone(),
        ));
    }
    if !recipe.runtime.binds_its_ports() {
        spec.ports = recipe
            .ports
            .iter()
            .map(|port| common::PortMapping {
                container_port: u32::from(port.port),
                host_port: u32::from(replica.ports.get(&port.name).copied().unwrap_or(0)),
                protocol: "tcp".into(),
                host_ip: String::new(),
            })
            .collect();
    }
    spec.ulimits = recipe
        .ulimits
        .iter()
        .map(|(name, limit)| {
            let (soft, hard) = match *limit {
                Ulimit::Both(both) => (both, both),
                Ulimit::Pair { soft, hard } => (soft, hard),
            };
            common::Ulimit {
                name: name.clone(),
                soft,
                hard,
            }
        })
        .collect();
    if !replica.gpus.is_empty() {
        let devices = gpu_leases::device_ids(host_gpus, &replica.gpus);
        let indexes: Vec<String> = replica.gpus.iter().map(u32::to_string).collect();
        spec.env.push(env("BERTH_GPUS", indexes.join(",")));
        spec.gpus = if recipe.runtime == RuntimeName::Process {
            // A host process sees every GPU unless told which are its own.
            spec.env
                .push(env("CUDA_VISIBLE_DEVICES", devices.join(",")));
            None
        } else {
            Some(common::GpuRequest {
                device_ids: devices,
                ..Default::default()
            })
        };
    }
    spec
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value,
    }
}

/// The replica's workload name on a host: unique per deployment, index,
/// generation and host, so that a retried create finds what an earlier try
/// made, a replica's update runs beside it, and a replica moved elsewhere
/// never meets its earlier self on an engine two hosts' agents share.
fn workload_name(deployment: &str, index: u32, generation: u32, host: &str) -> String {
    crate::manifest::workload_name(&format!(
        "berth-d-{deployment}-{index}-g{generation}-{host}"
    ))
}

/// The recipe's image archive as the agent's ImportImage stream: the
/// metadata, then the file in chunks as it is read (never whole in memory).
pub(super) async fn archive_chunks(
    recipe: &Recipe,
    import: &ImageImport,
) -> Result<impl futures::Stream<Item = ImportImageChunk> + Send + 'static, String> {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;
    const CHUNK_BYTES: usize = 256 * 1024;
    let file = tokio::fs::File::open(&import.archive)
        .await
        .map_err(|e| format!("import.archive {}: {e}", import.archive))?;
    let metadata = ImportImageChunk {
        chunk: Some(import_image_chunk::Chunk::Metadata(ImportImageMetadata {
            reference: recipe.image.clone(),
            runtime: recipe.runtime.proto() as i32,
            saved_archive: !import.rootfs,
            command: import.command.clone(),
        })),
    };
    let archive = import.archive.clone();
    let data = futures::stream::unfold(Some(file), move |file| {
        let archive = archive.clone();
        async move {
            let mut file = file?;
            let mut buffer = vec![0u8; CHUNK_BYTES];
            match file.read(&mut buffer).await {
                Ok(0) => None,
                Ok(read) => {
                    buffer.truncate(read);
                    let chunk = ImportImageChunk {
                        chunk: Some(import_image_chunk::Chunk::Data(buffer)),
                    };
                    Some((chunk, Some(file)))
                }
                Err(error) => {
                    // The agent refuses the tar cut short; this says why.
                    tracing::warn!(archive, %error, "reading the image archive failed");
                    None
                }
            }
        }
    });
    Ok(futures::stream::once(async move { metadata }).chain(data))
}

/// How long ago `since_ms` was.
pub(super) fn elapsed_since(since_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(super::now_ms().saturating_sub(since_ms)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::recipe::{RecipeLimits, parse};
    use crate::manifest::ManifestLimits;

    #[test]
    fn endpoints_are_on_the_agents_host() {
        assert_eq!(endpoint_host("unix:///run/berth/agent.sock"), "127.0.0.1");
        assert_eq!(endpoint_host("http://10.0.0.2:7701"), "10.0.0.2");
        assert_eq!(
            endpoint_host("ssh://berth@gpu-01:2222/run/agent.sock"),
            "gpu-01"
        );
        assert_eq!(endpoint_host("http://[fd00::2]:7701"), "fd00::2");
    }

    #[test]
    fn a_replica_spec_has_its_ports_index_and_no_engine_restart() {
        let recipe = parse(
            "r.yaml",
            "name: web\nruntime: docker\nimage: busybox\ncommand: [httpd, -p, '{{port.http}}']\nenv: {ID: 'r{{replica}}'}\nports:\n  - name: http\n    port: 8080\nulimits: {nofile: 4096}\n",
            &ManifestLimits::default(),
            RecipeLimits { max_replicas: 10 },
        )
        .unwrap();
        let mut replica = ReplicaRecord::pending("web", 2, "");
        replica.ports = BTreeMap::from([("http".to_string(), 20_123)]);
        let spec = replica_spec(&recipe, &replica, &[]);
        assert_eq!(spec.command, ["httpd", "-p", "8080"]);
        assert_eq!(spec.ports[0].container_port, 8080);
        assert_eq!(spec.ports[0].host_port, 20_123);
        assert_eq!(spec.restart_policy, RestartPolicy::No as i32);
        assert_eq!(spec.ulimits[0].soft, 4096);
        let env: HashMap<&str, &str> = spec
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env["ID"], "r2");
        assert_eq!(env["BERTH_PORT_HTTP"], "8080");
        assert_eq!(env["BERTH_REPLICA"], "2");
        assert_eq!(spec.labels[DEPLOYMENT_LABEL], "web");
    }
}
