//! Which hosts can take a backend: its placement constraints (host name,
//! labels, GPU count, memory), its runtime and power measurement, held
//! against what each host reports. Used both to reject at submit a backend
//! no host can take and to choose a host when the backend starts.

use std::collections::HashMap;

use berth_proto::orchestrator::v1::HostStatus;

use crate::error::OrchestratorError;
use crate::hosts::HostView;
use crate::manifest::{Backend, Plan};

/// The hosts a backend may go to at all: the one its placement names, or every host.
pub fn candidates<'a>(backend: &Backend, hosts: &'a [HostView]) -> Vec<&'a HostView> {
    hosts
        .iter()
        .filter(|h| backend.placement.host.is_empty() || backend.placement.host == h.record.name)
        .collect()
}

/// Why `host` cannot take `backend`, or `None` if it can as far as is known:
/// a host that has not reported what it offers is given the benefit of the doubt.
pub fn misfit(backend: &Backend, needs_power: bool, host: &HostView) -> Option<String> {
    let name = &host.record.name;
    let info = host.info.as_ref();
    let labels: HashMap<&String, &String> = host
        .record
        .labels
        .iter()
        .chain(info.into_iter().flat_map(|i| i.labels.iter()))
        .collect();
    if let Some((k, v)) = backend
        .placement
        .labels
        .iter()
        .find(|(k, v)| labels.get(k) != Some(v))
    {
        return Some(format!("host `{name}` lacks label {k}={v}"));
    }
    if needs_power && host.record.power_sampler.is_empty() {
        return Some(format!(
            "host `{name}` has no power sampler and the campaign measures power"
        ));
    }
    let info = info?;
    let runtime = backend.runtime.proto();
    if !info.runtimes.contains(&(runtime as i32)) {
        let why = info
            .unavailable_runtimes
            .get(runtime.as_str_name())
            .map_or("not offered", String::as_str);
        return Some(format!(
            "host `{name}` cannot run {}: {why}",
            runtime.as_str_name()
        ));
    }
    let gpus = backend.gpus_needed();
    if info.gpus.len() < gpus as usize {
        return Some(format!(
            "host `{name}` has {} GPUs; backend `{}` needs {gpus}",
            info.gpus.len(),
            backend.name
        ));
    }
    let memory = backend.memory_needed();
    if info.memory_bytes < memory {
        return Some(format!(
            "host `{name}` has {} of memory; backend `{}` needs {}",
            human_bytes(info.memory_bytes),
            backend.name,
            human_bytes(memory)
        ));
    }
    None
}

/// At submit: every backend must have a registered host that could take it.
/// Judged only while some host is reachable, so that a fleet that is down
/// (or not registered yet) leaves the campaign waiting instead. A missing
/// power sampler is not held against a host here: registering the host again
/// with its sampler is the fix, and the campaign waits for it.
pub fn check_placeable(plan: &Plan, hosts: &[HostView]) -> Result<(), OrchestratorError> {
    if !hosts.iter().any(|h| h.status == HostStatus::Ready) {
        return Ok(());
    }
    for backend in &plan.manifest.backends {
        let candidates = candidates(backend, hosts);
        if candidates.is_empty() {
            return Err(OrchestratorError::Unplaceable {
                backend: backend.name.clone(),
                reasons: format!("no registered host is named `{}`", backend.placement.host),
            });
        }
        let reasons: Option<Vec<String>> = candidates
            .iter()
            .map(|host| misfit(backend, false, host))
            .collect();
        if let Some(reasons) = reasons {
            return Err(OrchestratorError::Unplaceable {
                backend: backend.name.clone(),
                reasons: reasons.join("; "),
            });
        }
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::agent::v1::{Gpu, HostInfo};
    use berth_proto::common::v1::Runtime;

    use super::*;
    use crate::store::HostRecord;

    fn host(name: &str, status: HostStatus, gpus: usize, memory_gib: u64) -> HostView {
        HostView {
            record: HostRecord {
                name: name.into(),
                address: "unix:///a.sock".into(),
                token: String::new(),
                labels: [("zone".to_string(), "lab".to_string())].into(),
                power_sampler: String::new(),
            },
            status,
            message: String::new(),
            info: Some(HostInfo {
                runtimes: vec![Runtime::Process as i32, Runtime::Docker as i32],
                gpus: vec![Gpu::default(); gpus],
                memory_bytes: memory_gib << 30,
                ..Default::default()
            }),
        }
    }

    fn plan(placement: &str) -> Plan {
        crate::manifest::plan(
            "t",
            &format!(
                "name: t\nbackends:\n  - name: llm\n    runtime: docker\n    image: x\n    placement: {placement}\nconfigs: [{{name: a}}]\nrun: {{command: [true]}}\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn a_backend_no_host_fits_is_named_with_every_reason() {
        let hosts = [
            host("small", HostStatus::Ready, 1, 8),
            host("big", HostStatus::Ready, 4, 8),
        ];
        let error = check_placeable(&plan("{gpus: 2, memory: 16GiB}"), &hosts).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("backend `llm`"), "{text}");
        assert!(text.contains("host `small` has 1 GPUs"), "{text}");
        assert!(text.contains("host `big` has 8.0 GiB of memory"), "{text}");
        check_placeable(&plan("{gpus: 4, memory: 8GiB}"), &hosts).expect("`big` fits");
        let error = check_placeable(&plan("{host: gpu-09}"), &hosts).unwrap_err();
        assert!(error.to_string().contains("`gpu-09`"), "{error}");
        let error = check_placeable(&plan("{labels: {zone: cloud}}"), &hosts).unwrap_err();
        assert!(
            error.to_string().contains("lacks label zone=cloud"),
            "{error}"
        );
    }

    #[test]
    fn nothing_is_judged_while_no_host_is_reachable_or_known() {
        let down = [host("big", HostStatus::Unreachable, 0, 1)];
        check_placeable(&plan("{gpus: 8}"), &down).expect("waits instead");
        // A host never reached may still fit.
        let mut unknown = host("new", HostStatus::Unknown, 0, 0);
        unknown.info = None;
        let hosts = [host("small", HostStatus::Ready, 0, 1), unknown];
        check_placeable(&plan("{gpus: 8}"), &hosts).expect("`new` might fit");
    }
}
