//! A domain as the runtime sees it: its berth metadata, libvirt's state of
//! it, and the workload it answers with.

use std::time::SystemTime;

use berth_proto::agent::v1::{Health, Workload, WorkloadState};

use super::domain_xml::{self, BerthMetadata};
use super::failed;
use super::ffi::{self, Domain, DomainInfo, DomainState};
use crate::error::AgentError;

/// What the runtime reads about one of its domains.
#[derive(Debug, Clone)]
pub(super) struct DomainView {
    pub(super) uuid: String,
    pub(super) name: String,
    pub(super) metadata: BerthMetadata,
    pub(super) info: DomainInfo,
    pub(super) started_at: Option<SystemTime>,
}

/// The berth metadata of `domain`; `None` when it has none.
pub(super) fn metadata_of(domain: &Domain<'_>) -> Result<Option<BerthMetadata>, AgentError> {
    Ok(domain
        .metadata(domain_xml::WORKLOAD_NAMESPACE)
        .map_err(failed("read metadata"))?
        .as_deref()
        .and_then(BerthMetadata::parse))
}

pub(super) fn view_of(
    domain: &Domain<'_>,
    metadata: BerthMetadata,
) -> Result<DomainView, AgentError> {
    let info = domain.info().map_err(failed("inspect"))?;
    let started_at = if info.state.is_active() {
        domain
            .metadata(domain_xml::RUN_NAMESPACE)
            .ok()
            .flatten()
            .as_deref()
            .and_then(domain_xml::parse_run)
    } else {
        None
    };
    Ok(DomainView {
        uuid: domain.uuid().map_err(failed("inspect"))?,
        name: domain.name().map_err(failed("inspect"))?,
        metadata,
        info,
        started_at,
    })
}

/// A workload's state from libvirt's state and its reason.
fn workload_state(state: DomainState, reason: i32) -> WorkloadState {
    match state {
        state if state.is_active() => WorkloadState::Running,
        DomainState::Crashed => WorkloadState::Exited,
        DomainState::Shutoff => match reason {
            ffi::shutoff_reason::UNKNOWN => WorkloadState::Created,
            ffi::shutoff_reason::CRASHED | ffi::shutoff_reason::FAILED => WorkloadState::Exited,
            _ => WorkloadState::Stopped,
        },
        _ => WorkloadState::Unspecified,
    }
}

/// Why a domain that is not running is down, as its state and reason say:
/// what an exec into it (or one it cut short) reports.
pub(super) fn down_cause(state: DomainState, reason: i32) -> &'static str {
    use ffi::shutoff_reason as why;
    match (state, reason) {
        (DomainState::Crashed, _) | (DomainState::Shutoff, why::CRASHED) => {
            "shut off (the guest crashed)"
        }
        (DomainState::Shutoff, why::DESTROYED) => {
            "shut off (destroyed: `virsh destroy`, or a stop that powered it off)"
        }
        (DomainState::Shutoff, why::SHUTDOWN) => "shut off (the guest shut down)",
        (DomainState::Shutoff, why::FAILED) => "shut off (its qemu process failed)",
        (DomainState::Shutoff, why::DAEMON) => "shut off (by libvirtd)",
        (DomainState::Shutoff, why::MIGRATED) => "shut off (migrated to another host)",
        (DomainState::Shutoff, why::SAVED) => "shut off (saved to a file)",
        (DomainState::Shutoff, why::FROM_SNAPSHOT) => "shut off (a snapshot was restored)",
        _ => "not running",
    }
}

impl DomainView {
    pub(super) fn active(&self) -> bool {
        self.info.state.is_active()
    }

    /// Why this domain is down ([`down_cause`]).
    pub(super) fn down_cause(&self) -> &'static str {
        down_cause(self.info.state, self.info.reason)
    }

    /// Why `rpc` cannot reach into this VM: it has no files directory, where
    /// the agent puts the exec shim's socket and the console log.
    pub(super) fn no_files_dir(&self, rpc: &str) -> AgentError {
        AgentError::Unimplemented(format!(
            "{rpc}: VM `{}` has no exec shim port or console log: only VMs with a files directory \
             (a base_image disk or a cloud-init seed) whose path fits a unix socket get them",
            self.name
        ))
    }

    /// The workload: its spec with libvirt's current vCPUs and memory.
    pub(super) fn workload(&self) -> Workload {
        let mut spec = self.metadata.spec.clone().unwrap_or_default();
        let vm = spec.vm.get_or_insert_with(Default::default);
        vm.vcpus = self.info.vcpus;
        vm.memory_bytes = self.info.max_memory_kib * 1024;
        spec.labels.extend(
            self.metadata
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        Workload {
            id: self.uuid.clone(),
            name: self.name.clone(),
            spec: Some(spec),
            state: workload_state(self.info.state, self.info.reason) as i32,
            health: Health::None as i32,
            created_at: self.metadata.created_at.map(Into::into),
            started_at: self.started_at.map(Into::into),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_workload_states() {
        use ffi::shutoff_reason::{CRASHED, UNKNOWN};
        let cases = [
            (DomainState::Running, 1, WorkloadState::Running),
            (DomainState::Paused, 1, WorkloadState::Running),
            (DomainState::Shutoff, UNKNOWN, WorkloadState::Created),
            (DomainState::Shutoff, 1, WorkloadState::Stopped),
            (DomainState::Shutoff, CRASHED, WorkloadState::Exited),
            (DomainState::Crashed, 0, WorkloadState::Exited),
        ];
        for (domain, reason, expected) in cases {
            assert_eq!(
                workload_state(domain, reason),
                expected,
                "{domain:?} ({reason})"
            );
        }
    }
}
