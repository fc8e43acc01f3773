//! Looking at a started replica: its workload, its health check, and what
//! follows when it went down or its host went silent.

use std::ops::ControlFlow;

use super::*;

impl Deployments {
    /// Looks at a started replica: its workload, then its health check.
    pub(super) async fn look_at(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
    ) -> ReplicaRecord {
        let mut client = match self.hosts.client(&replica.host).await {
            Ok(client) => client,
            Err(reason) => return self.host_silent(recipe, replica, state, &reason),
        };
        let inspected = self
            .bounded(client.inspect_workload(WorkloadRef {
                id: replica.workload_id.clone(),
            }))
            .await;
        let workload = match inspected {
            Ok(workload) => workload.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                return self
                    .went_down(
                        recipe,
                        replica,
                        state,
                        &mut client,
                        "its workload is gone".into(),
                        None,
                        false,
                    )
                    .await;
            }
            Err(status) if agent_did_not_answer(status.code()) => {
                return self.host_silent(recipe, replica, state, &describe_status(&status));
            }
            Err(status) => {
                tracing::warn!(deployment = %recipe.name, replica = replica.index, status = %describe_status(&status), "inspect refused");
                return replica;
            }
        };
        state.host_silent_since = None;
        // A SLURM job the cluster has not started yet (PENDING): the
        // replica waits, in SLURM's words, without counting a restart.
        if recipe.runtime == RuntimeName::Slurm && workload.state == WorkloadState::Created as i32 {
            let why = format!("waits to run: {}", workload.state_reason);
            return with_reason(replica, &why);
        }
        if workload.state != WorkloadState::Running as i32 {
            let last_words = self.last_lines(&mut client, &replica.workload_id).await;
            let why = match workload.exit_code {
                Some(code) if workload.oom_killed => format!("was OOM-killed (exit code {code})"),
                Some(code) => format!("exited with code {code}"),
                None => format!(
                    "is {}",
                    WorkloadState::try_from(workload.state)
                        .map_or("in an unknown state", |s| s.as_str_name())
                ),
            };
            let why = if last_words.is_empty() {
                why
            } else {
                format!("{why} (its last words: {last_words})")
            };
            return self
                .went_down(
                    recipe,
                    replica,
                    state,
                    &mut client,
                    why,
                    workload.exit_code,
                    false,
                )
                .await;
        }
        let replica = match own_address(recipe, replica, &workload) {
            ControlFlow::Continue(replica) => replica,
            ControlFlow::Break(waiting) => return waiting,
        };
        let Some(check) = &recipe.health else {
            return self.healthy(recipe, replica, "running (the recipe has no health check)");
        };
        let address = endpoint_address(self, &replica, check.port.as_str());
        let target = Target {
            address: address.as_ref().map(|(host, port)| (host.as_str(), *port)),
            client: &mut client,
            workload_id: &replica.workload_id,
        };
        match health::check(check, target).await {
            Ok(()) => {
                state.failed_checks = 0;
                self.healthy(recipe, replica, "running and healthy")
            }
            Err(why) => {
                let starting = replica.state == ReplicaState::Starting
                    && elapsed_since(replica.since_ms) < check.start_period;
                if starting {
                    return replica;
                }
                state.failed_checks += 1;
                if state.failed_checks < check.retries {
                    return replica;
                }
                let why = format!(
                    "unhealthy: {} failed checks in a row, the last: {why}",
                    state.failed_checks
                );
                self.went_down(recipe, replica, state, &mut client, why, None, true)
                    .await
            }
        }
    }

    /// The last lines a workload printed, joined and cut short, to say why
    /// it exited; empty when its agent has none to give.
    pub(super) async fn last_lines(&self, client: &mut AgentClient, workload_id: &str) -> String {
        const LINES: u32 = 3;
        const MOST_CHARS: usize = 400;
        let request = LogsRequest {
            workload_id: workload_id.to_string(),
            follow: false,
            tail: LINES,
            since: None,
        };
        let read = async {
            let mut stream = client.logs(request).await?.into_inner();
            let mut lines = Vec::new();
            while let Some(line) = stream.message().await? {
                lines.push(line.line);
            }
            Ok(lines)
        };
        let lines = self.bounded(read).await.unwrap_or_default();
        let joined = lines.join(" | ");
        match joined.char_indices().nth(MOST_CHARS) {
            Some((cut, _)) => format!("{}…", &joined[..cut]),
            None => joined,
        }
    }

    /// A replica that runs and passes its check: Running, and its restarts
    /// in a row forgotten once it has run `restart.reset_after`.
    pub(super) fn healthy(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        reason: &str,
    ) -> ReplicaRecord {
        let mut next = replica;
        if next.state != ReplicaState::Running {
            next.state = ReplicaState::Running;
            next.since_ms = now_ms();
            next.reason = reason.to_string();
        } else if next.in_a_row > 0 && elapsed_since(next.since_ms) >= recipe.restart.reset_after {
            next.in_a_row = 0;
        }
        next
    }

    /// A replica whose workload exited, is gone or is unhealthy: completed,
    /// failed or restarted after its backoff, as its restart policy says.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn went_down(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        client: &mut AgentClient,
        why: String,
        exit_code: Option<i32>,
        still_running: bool,
    ) -> ReplicaRecord {
        let policy = recipe.restart.policy;
        let mut next = replica;
        next.since_ms = now_ms();
        if exit_code == Some(0) && policy != RestartPolicy::Always {
            next.state = ReplicaState::Completed;
            next.reason = format!("{why}: done (restart policy {policy:?})");
            return next;
        }
        if policy == RestartPolicy::Never {
            next.state = ReplicaState::Failed;
            next.reason = format!("{why} (restart policy never)");
            return next;
        }
        if still_running {
            let stop = berth_proto::agent::v1::StopWorkloadRequest {
                id: next.workload_id.clone(),
                timeout: prost_types::Duration::try_from(recipe.stop_grace).ok(),
            };
            if let Err(status) = client.stop_workload(stop).await {
                tracing::warn!(deployment = %recipe.name, replica = next.index, status = %describe_status(&status), "could not stop an unhealthy replica");
            }
        }
        state.failed_checks = 0;
        self.count_failure(recipe, next, state, &why)
    }

    /// One more restart in a row: Restarting after the backoff, or Failed
    /// past `restart.max_restarts`.
    pub(super) fn count_failure(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        why: &str,
    ) -> ReplicaRecord {
        let restart = &recipe.restart;
        let mut next = replica;
        next.in_a_row += 1;
        next.since_ms = now_ms();
        if next.in_a_row > restart.max_restarts {
            next.state = ReplicaState::Failed;
            next.reason = format!(
                "{why}; gave up after {} restarts in a row (restart.max_restarts)",
                restart.max_restarts
            );
            return next;
        }
        let backoff = restart.backoff_before(next.in_a_row);
        state.not_before = Some(Instant::now() + backoff);
        if !next.workload_id.is_empty() {
            next.restarts += 1;
            next.state = ReplicaState::Restarting;
        }
        next.reason = format!(
            "{why}; try {} of {} in {}",
            next.in_a_row,
            restart.max_restarts,
            humantime::format_duration(backoff)
        );
        next
    }

    /// The replica's host does not answer: after `host_lost_grace` (or at
    /// once when the host was deregistered) the replica is Lost and placed
    /// elsewhere; one that owns GPUs waits for the host to be deregistered,
    /// since its first copy may still hold them.
    pub(super) fn host_silent(
        &self,
        recipe: &Recipe,
        replica: ReplicaRecord,
        state: &mut Followed,
        reason: &str,
    ) -> ReplicaRecord {
        let host = replica.host.clone();
        let silent_for = state
            .host_silent_since
            .get_or_insert_with(Instant::now)
            .elapsed();
        let registered = self.hosts.views().iter().any(|v| v.record.name == host);
        if registered && silent_for < self.config.host_lost_grace {
            return replica;
        }
        if registered && recipe.owns_gpus() {
            return with_reason(
                replica,
                &format!(
                    "host `{host}` does not answer; a replica that owns GPUs moves only once its host is deregistered"
                ),
            );
        }
        self.release_held(&replica);
        state.host_silent_since = None;
        state.avoid.push(host.clone());
        let mut next = replica;
        next.state = ReplicaState::Lost;
        next.restarts += 1;
        next.since_ms = now_ms();
        next.reason = if registered {
            format!(
                "host `{host}` has not answered for {} ({reason}); placing the replica elsewhere",
                humantime::format_duration(self.config.host_lost_grace)
            )
        } else {
            format!("host `{host}` was deregistered; placing the replica elsewhere")
        };
        next
    }
}

/// A VM replica's endpoints are on the guest's own address, known once the
/// guest has one (DHCP), a SLURM replica's on the address of the node its
/// job runs on: it is recorded as it is learnt (and again should a restart
/// change it), and the replica is not Running before it: `Break` is the
/// replica left Starting with why. Other replicas are on their host's
/// address.
fn own_address(
    recipe: &Recipe,
    replica: ReplicaRecord,
    workload: &Workload,
) -> ControlFlow<ReplicaRecord, ReplicaRecord> {
    if !recipe.runtime.answers_on_its_own_address() {
        return ControlFlow::Continue(replica);
    }
    // Addresses come as `192.168.122.2/24`: the prefix length is not part of
    // where the replica answers.
    let addresses = || {
        workload
            .ip_addresses
            .iter()
            .map(|a| a.split('/').next().unwrap_or(a))
    };
    let address = addresses()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .or_else(|| addresses().next());
    match address {
        Some(address) => {
            let mut next = replica;
            next.address = address.to_string();
            ControlFlow::Continue(next)
        }
        None if replica.address.is_empty() => {
            let what = if recipe.runtime == RuntimeName::Slurm {
                "the job's node has no known address yet"
            } else {
                "the guest has no address yet"
            };
            let why = if workload.ip_addresses_note.is_empty() {
                what.to_string()
            } else {
                format!("{what}: {}", workload.ip_addresses_note)
            };
            ControlFlow::Break(with_reason(replica, &why))
        }
        // The address learnt before stays while the runtime cannot tell.
        None => ControlFlow::Continue(replica),
    }
}
