//! Defining a domain from a checked spec: its disks prepared, its XML
//! planned (the domain type chosen for the host), and libvirt's refusals
//! told apart from its failures.

use std::time::SystemTime;

use berth_proto::agent::v1::{EventKind, Workload};
use berth_proto::common::v1::WorkloadSpec;

use super::domain_xml::{BerthMetadata, DomainPlan, Nic, PciAddress};
use super::ffi::{Connection, VirError, code};
use super::view::view_of;
use super::{LibvirtRuntime, disks, exec, failed, vm_spec};
use crate::error::AgentError;

impl LibvirtRuntime {
    /// `<domain type=…>` for this connection.
    fn domain_type(&self, connection: &Connection) -> Result<String, AgentError> {
        if self.inner.domain_type != "auto" {
            return Ok(self.inner.domain_type.clone());
        }
        let driver = connection.driver().map_err(failed("connect"))?;
        // libvirt's test driver runs no hypervisor and knows only its own type.
        if driver.eq_ignore_ascii_case("test") {
            return Ok("test".to_string());
        }
        // KVM when the hypervisor can use it here (a /dev/kvm it may open),
        // else qemu's emulation (TCG): slower, but the VM runs.
        let no_kvm = match connection.domain_capabilities("kvm") {
            Ok(_) => kvm_that_boots_only_pvm_guests(&self.inner.uri),
            Err(why) => Some(why.message),
        };
        Ok(match no_kvm {
            None => "kvm".to_string(),
            Some(why) => {
                tracing::warn!(
                    uri = %self.inner.uri,
                    "no usable KVM on this libvirt host ({why}); VMs run under emulation \
                     (domain type qemu; libvirt.domain_type = \"kvm\" forces KVM)"
                );
                "qemu".to_string()
            }
        })
    }

    pub(super) async fn define(
        &self,
        name: &str,
        spec: WorkloadSpec,
    ) -> Result<Workload, AgentError> {
        let vm = vm_spec::validate(&spec)?.clone();
        let taken = {
            let name = name.to_string();
            self.with_connection(move |connection| {
                Ok(connection
                    .lookup_by_name(&name)
                    .map_err(failed("look up"))?
                    .is_some())
            })
            .await?
        };
        if taken {
            return Err(AgentError::NameTaken(name.to_string()));
        }
        let prepared = disks::prepare(name, &vm, &self.inner.disk_dir).await?;
        let uuid = uuid::Uuid::new_v4().to_string();
        let metadata = BerthMetadata {
            owner: self.inner.owner.clone(),
            created_at: Some(SystemTime::now()),
            labels: spec.labels.clone().into_iter().collect(),
            files_dir: prepared.files_dir.clone(),
            spec: Some(spec),
        };
        let mut plan = DomainPlan {
            name: name.to_string(),
            uuid: uuid.clone(),
            domain_type: String::new(),
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            disks: prepared.disks,
            nic: Nic::of(&vm),
            pci_devices: vm
                .pci_passthrough
                .iter()
                .filter_map(|text| PciAddress::parse(text))
                .collect(),
            console_log: prepared
                .files_dir
                .as_ref()
                .map(|dir| dir.join("console.log")),
            shim_socket: prepared.files_dir.as_deref().and_then(exec::socket_path),
            metadata,
        };
        let runtime = self.clone();
        let defined = self
            .with_connection(move |connection| {
                plan.domain_type = runtime.domain_type(connection)?;
                let domain = connection
                    .define(&plan.to_xml())
                    .map_err(|error| define_error(&plan.name, error))?;
                Ok((view_of(&domain, plan.metadata)?, plan.domain_type))
            })
            .await;
        match defined {
            Ok((view, domain_type)) => {
                self.inner.seen().note(&view.uuid, &view.name, false);
                self.publish(
                    &view,
                    EventKind::Created,
                    format!(
                        "libvirt domain (type {domain_type}) defined on {}",
                        self.inner.uri
                    ),
                );
                Ok(view.workload())
            }
            Err(error) => {
                // Nothing of a failed create stays: the domain was not
                // defined, so its files go.
                if let Some(dir) = &prepared.files_dir {
                    disks::remove_files_dir(dir, &self.inner.disk_dir);
                }
                Err(error)
            }
        }
    }
}

/// Why KVM on this host cannot boot an ordinary guest kernel, when the
/// daemon is local and its /dev/kvm comes from `kvm_pvm` (PVM, the
/// "process VM" flavour of KVM some sandboxes nest in): it runs only kernels
/// built as PVM guests, and a stock kernel hangs before its first message.
fn kvm_that_boots_only_pvm_guests(uri: &str) -> Option<String> {
    let local = uri.starts_with("qemu:///") || uri.starts_with("qemu+unix:///");
    (local && std::path::Path::new("/sys/module/kvm_pvm").exists())
        .then(|| "this host's /dev/kvm is kvm_pvm, which boots only PVM guest kernels".to_string())
}

fn define_error(name: &str, error: VirError) -> AgentError {
    match error.code {
        code::DOM_EXIST => AgentError::NameTaken(name.to_string()),
        code::OPERATION_FAILED if error.message.contains("already exists") => {
            AgentError::NameTaken(name.to_string())
        }
        code::XML_ERROR
        | code::XML_DETAIL
        | code::CONFIG_UNSUPPORTED
        | code::OPERATION_UNSUPPORTED
        | code::INVALID_ARG => AgentError::InvalidArgument {
            field: "spec.vm",
            reason: format!("libvirt refused the domain: {}", error.message),
        },
        _ => failed("define")(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_errors_name_the_cause() {
        let error = |code, message: &str| VirError {
            code,
            message: message.to_string(),
        };
        assert!(matches!(
            define_error(
                "a",
                error(
                    code::OPERATION_FAILED,
                    "domain 'a' already exists with uuid x"
                )
            ),
            AgentError::NameTaken(_)
        ));
        assert!(matches!(
            define_error("a", error(code::XML_ERROR, "bad")),
            AgentError::InvalidArgument {
                field: "spec.vm",
                ..
            }
        ));
    }
}
