//! From a checked workload spec (`vm_spec.rs`) to libvirt domain XML, and
//! back from the berth metadata kept inside the domain: the XML the runtime
//! defines, and the `<metadata>` element that marks a domain as this agent's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use berth_proto::common::v1::{VmSpec, WorkloadSpec};

use crate::runtime::container::{decode_spec, encode_spec};

/// Namespace of the `<metadata>` element the agent writes into each domain
/// it defines: its owner, its spec, its labels, where its files are.
pub const WORKLOAD_NAMESPACE: &str = "https://berth.dev/xmlns/libvirt/workload/1";
/// Namespace of the element the agent adds to the live definition at start:
/// libvirt drops it when the domain stops, so it dates only the current run.
pub const RUN_NAMESPACE: &str = "https://berth.dev/xmlns/libvirt/run/1";
/// XML prefix of both namespaces.
pub const PREFIX: &str = "berth";

/// The NIC-less choice for `vm.network`.
pub const NO_NETWORK: &str = "none";
const DEFAULT_NETWORK: &str = "default";

/// A PCI function on the host, `DDDD:BB:SS.F`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    domain: u16,
    bus: u8,
    slot: u8,
    function: u8,
}

impl PciAddress {
    /// `0000:3b:00.0`, or `3b:00.0` in PCI domain 0.
    pub fn parse(text: &str) -> Option<Self> {
        let (head, function) = text.rsplit_once('.')?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, slot) = match parts.as_slice() {
            [domain, bus, slot] => (*domain, *bus, *slot),
            [bus, slot] => ("0", *bus, *slot),
            _ => return None,
        };
        let hex = |text: &str, digits: usize| {
            (!text.is_empty()
                && text.len() <= digits
                && text.chars().all(|c| c.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(text, 16).ok())
            .flatten()
        };
        let address = Self {
            domain: u16::try_from(hex(domain, 4)?).ok()?,
            bus: u8::try_from(hex(bus, 2)?).ok()?,
            slot: u8::try_from(hex(slot, 2)?).ok().filter(|s| *s <= 0x1f)?,
            function: u8::try_from(hex(function, 1)?).ok().filter(|f| *f <= 7)?,
        };
        Some(address)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// Where a disk's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    File { path: PathBuf, format: DiskFormat },
    Block { path: PathBuf },
    PoolVolume { pool: String, volume: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    pub source: DiskSource,
    pub read_only: bool,
}

/// The guest's network card, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    None,
    Network(String),
    Bridge(String),
}

impl Nic {
    pub fn of(vm: &VmSpec) -> Self {
        if !vm.bridge.is_empty() {
            Self::Bridge(vm.bridge.clone())
        } else if vm.network == NO_NETWORK {
            Self::None
        } else if vm.network.is_empty() {
            Self::Network(DEFAULT_NETWORK.to_string())
        } else {
            Self::Network(vm.network.clone())
        }
    }
}

/// Everything that goes into one domain's XML.
#[derive(Debug, Clone)]
pub struct DomainPlan {
    pub name: String,
    pub uuid: String,
    /// `<domain type=…>`: kvm, qemu, or test for libvirt's test driver.
    pub domain_type: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// In boot order; a cloud-init seed goes last.
    pub disks: Vec<DomainDisk>,
    pub nic: Nic,
    pub pci_devices: Vec<PciAddress>,
    /// Where libvirt (virtlogd) copies what the guest writes to its serial
    /// console; none when the VM has no files directory of its own.
    pub console_log: Option<PathBuf>,
    /// The host side (a unix socket qemu binds) of the virtio-serial port the
    /// guest's exec shim serves on; none without a files directory.
    pub shim_socket: Option<PathBuf>,
    pub metadata: BerthMetadata,
}

/// Text for XML content and attribute values. Tab and line breaks are
/// references, so that a parser normalising them (in attributes, and `\r`
/// everywhere) gives them back as they were.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\t' => escaped.push_str("&#9;"),
            '\n' => escaped.push_str("&#10;"),
            '\r' => escaped.push_str("&#13;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn path_text(path: &Path) -> String {
    escape(&path.to_string_lossy())
}

impl DomainPlan {
    pub fn to_xml(&self) -> String {
        let mut xml = format!(
            "<domain type='{}'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <metadata>\n    {}\n  </metadata>\n",
            escape(&self.domain_type),
            escape(&self.name),
            escape(&self.uuid),
            self.metadata.to_xml()
        );
        xml.push_str(&format!(
            "  <memory unit='KiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
            self.memory_bytes / 1024,
            self.vcpus
        ));
        // ACPI lets a graceful shutdown reach the guest.
        xml.push_str(
            "  <os>\n    <type>hvm</type>\n    <boot dev='hd'/>\n  </os>\n  <features>\n    <acpi/>\n    <apic/>\n  </features>\n",
        );
        xml.push_str(
            "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n",
        );
        for (index, disk) in self.disks.iter().enumerate() {
            xml.push_str(&disk_xml(disk, index));
        }
        match &self.nic {
            Nic::None => {}
            Nic::Network(network) => xml.push_str(&format!(
                "    <interface type='network'>\n      <source network='{}'/>\n      <model type='virtio'/>\n    </interface>\n",
                escape(network)
            )),
            Nic::Bridge(bridge) => xml.push_str(&format!(
                "    <interface type='bridge'>\n      <source bridge='{}'/>\n      <model type='virtio'/>\n    </interface>\n",
                escape(bridge)
            )),
        }
        for pci in &self.pci_devices {
            // managed: libvirt detaches the device from its host driver at
            // start and gives it back at stop.
            xml.push_str(&format!(
                "    <hostdev mode='subsystem' type='pci' managed='yes'>\n      <source>\n        <address domain='0x{:04x}' bus='0x{:02x}' slot='0x{:02x}' function='0x{:x}'/>\n      </source>\n    </hostdev>\n",
                pci.domain, pci.bus, pci.slot, pci.function
            ));
        }
        // A serial console: the only window into a guest without a network,
        // copied into the VM's files directory (what a boot printed, even
        // with nobody on the pty).
        // The shim's port, and the qemu guest agent's next to it (the
        // fallback for images without the shim), both in the files directory.
        if let Some(socket) = &self.shim_socket {
            let qga = socket.with_file_name(super::guest_agent::SOCKET);
            for (socket, port) in [
                (socket, super::exec::SHIM_PORT),
                (&qga, super::guest_agent::PORT),
            ] {
                xml.push_str(&format!(
                    "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      <target type='virtio' name='{}'/>\n    </channel>\n",
                    path_text(socket),
                    port
                ));
            }
        }
        match &self.console_log {
            Some(log) => xml.push_str(&format!(
                "    <serial type='pty'>\n      <log file='{}' append='off'/>\n    </serial>\n",
                path_text(log)
            )),
            None => xml.push_str("    <serial type='pty'/>\n"),
        }
        xml.push_str("    <console type='pty'/>\n  </devices>\n</domain>\n");
        xml
    }
}

/// Virtio disks `vda`, `vdb`, …: cloud-init finds its seed by filesystem
/// label on any of them, so the seed needs no CD-ROM controller.
fn disk_xml(disk: &DomainDisk, index: usize) -> String {
    let target = format!(
        "vd{}",
        char::from(b'a' + u8::try_from(index % 26).unwrap_or(0))
    );
    let read_only = if disk.read_only {
        "      <readonly/>\n"
    } else {
        ""
    };
    let (kind, driver, source) = match &disk.source {
        DiskSource::File { path, format } => (
            "file",
            format!("      <driver name='qemu' type='{}'/>\n", format.as_str()),
            format!("<source file='{}'/>", path_text(path)),
        ),
        DiskSource::Block { path } => (
            "block",
            "      <driver name='qemu' type='raw'/>\n".to_string(),
            format!("<source dev='{}'/>", path_text(path)),
        ),
        DiskSource::PoolVolume { pool, volume } => (
            "volume",
            String::new(),
            format!(
                "<source pool='{}' volume='{}'/>",
                escape(pool),
                escape(volume)
            ),
        ),
    };
    format!(
        "    <disk type='{kind}' device='disk'>\n{driver}      {source}\n      <target dev='{target}' bus='virtio'/>\n{read_only}    </disk>\n"
    )
}

/// What the agent keeps in a domain's `<metadata>`: it makes the domain
/// the agent's, and lets a restarted agent answer for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BerthMetadata {
    /// `engines.owner` of the agent that defined it.
    pub owner: String,
    pub created_at: Option<SystemTime>,
    pub labels: BTreeMap<String, String>,
    /// The directory of the overlays and seed the agent made for it, removed
    /// with the domain. Never holds a base image.
    pub files_dir: Option<PathBuf>,
    pub spec: Option<WorkloadSpec>,
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl BerthMetadata {
    pub fn to_xml(&self) -> String {
        let mut xml = format!(
            "<{PREFIX}:workload xmlns:{PREFIX}='{WORKLOAD_NAMESPACE}'><{PREFIX}:owner>{}</{PREFIX}:owner>",
            escape(&self.owner)
        );
        if let Some(created) = self.created_at {
            xml.push_str(&format!(
                "<{PREFIX}:created>{}</{PREFIX}:created>",
                unix_seconds(created)
            ));
        }
        if let Some(dir) = &self.files_dir {
            xml.push_str(&format!(
                "<{PREFIX}:files-dir>{}</{PREFIX}:files-dir>",
                path_text(dir)
            ));
        }
        for (key, value) in &self.labels {
            xml.push_str(&format!(
                "<{PREFIX}:label key='{}'>{}</{PREFIX}:label>",
                escape(key),
                escape(value)
            ));
        }
        if let Some(spec) = &self.spec {
            xml.push_str(&format!(
                "<{PREFIX}:spec>{}</{PREFIX}:spec>",
                encode_spec(spec)
            ));
        }
        xml.push_str(&format!("</{PREFIX}:workload>"));
        xml
    }

    /// The element as libvirt returns it for our namespace (without the
    /// namespace), or as written; `None` when it is not berth's element.
    pub fn parse(xml: &str) -> Option<Self> {
        let document = roxmltree::Document::parse(xml).ok()?;
        let root = document.root_element();
        if !is_ours(root, WORKLOAD_NAMESPACE, "workload") {
            return None;
        }
        let mut metadata = Self::default();
        for child in root.children().filter(|n| n.is_element()) {
            let raw = child.text().unwrap_or_default();
            let text = raw.trim();
            match child.tag_name().name() {
                "owner" => metadata.owner = text.to_string(),
                "created" => {
                    metadata.created_at = text
                        .parse()
                        .ok()
                        .map(|seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
                }
                "files-dir" if !text.is_empty() => metadata.files_dir = Some(PathBuf::from(text)),
                "label" => {
                    // A label's value is kept as it was, spaces included.
                    if let Some(key) = child.attribute("key") {
                        metadata.labels.insert(key.to_string(), raw.to_string());
                    }
                }
                "spec" => metadata.spec = decode_spec(text),
                _ => {}
            }
        }
        Some(metadata)
    }
}

/// `virDomainGetMetadata` returns the element of the namespace asked for
/// with the namespace stripped; the full domain XML keeps it.
fn is_ours(element: roxmltree::Node<'_, '_>, namespace: &str, name: &str) -> bool {
    let tag = element.tag_name();
    tag.name() == name && tag.namespace().is_none_or(|ns| ns == namespace)
}

/// The element added to the live definition at start, as
/// `virDomainSetMetadata` wants it: without a namespace, which libvirt adds.
pub fn run_xml(started_at: SystemTime) -> String {
    format!("<run started='{}'/>", unix_seconds(started_at))
}

/// When the current run started, from [`run_xml`]'s element.
pub fn parse_run(xml: &str) -> Option<SystemTime> {
    let document = roxmltree::Document::parse(xml).ok()?;
    let root = document.root_element();
    if !is_ours(root, RUN_NAMESPACE, "run") {
        return None;
    }
    let seconds: u64 = root.attribute("started")?.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::libvirt::vm_spec::tests::vm_spec;

    #[test]
    fn pci_addresses_parse_with_or_without_domain() {
        let full = PciAddress::parse("0000:3b:00.1").unwrap();
        assert_eq!(PciAddress::parse("3b:00.1"), Some(full));
        for bad in [
            "3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "x:00.0",
            "00000:3b:00.0",
        ] {
            assert_eq!(PciAddress::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn domain_xml_has_the_spec_and_parses() {
        let plan = DomainPlan {
            name: "vm1".into(),
            uuid: "0b0f2a64-6b4e-4f8b-9a39-2f4b1c0d9e11".into(),
            domain_type: "kvm".into(),
            vcpus: 2,
            memory_bytes: 512 << 20,
            disks: vec![
                DomainDisk {
                    source: DiskSource::File {
                        path: "/var/lib/berth/vm1/disk0.qcow2".into(),
                        format: DiskFormat::Qcow2,
                    },
                    read_only: false,
                },
                DomainDisk {
                    source: DiskSource::PoolVolume {
                        pool: "default".into(),
                        volume: "data".into(),
                    },
                    read_only: false,
                },
                DomainDisk {
                    source: DiskSource::File {
                        path: "/var/lib/berth/vm1/seed.iso".into(),
                        format: DiskFormat::Raw,
                    },
                    read_only: true,
                },
            ],
            nic: Nic::Bridge("br0".into()),
            pci_devices: vec![PciAddress::parse("0000:3b:00.0").unwrap()],
            console_log: Some("/var/lib/berth/vm1/console.log".into()),
            shim_socket: Some("/var/lib/berth/vm1/shim.sock".into()),
            metadata: BerthMetadata {
                owner: "agent <1> & 'co'".into(),
                ..Default::default()
            },
        };
        let xml = plan.to_xml();
        let document = roxmltree::Document::parse(&xml).expect("well-formed XML");
        let root = document.root_element();
        assert_eq!(root.attribute("type"), Some("kvm"));
        let text_of = |tag: &str| {
            root.descendants()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .map(str::to_string)
        };
        assert_eq!(text_of("memory").as_deref(), Some("524288"));
        assert_eq!(text_of("vcpu").as_deref(), Some("2"));
        let targets: Vec<_> = root
            .descendants()
            .filter(|n| n.has_tag_name("target"))
            .filter_map(|n| n.attribute("dev"))
            .collect();
        assert_eq!(targets, ["vda", "vdb", "vdc"]);
        assert!(xml.contains("<source pool='default' volume='data'/>"));
        assert!(xml.contains("<source bridge='br0'/>"));
        assert!(xml.contains("<log file='/var/lib/berth/vm1/console.log' append='off'/>"));
        assert!(xml.contains("<source mode='bind' path='/var/lib/berth/vm1/shim.sock'/>"));
        assert!(xml.contains("<target type='virtio' name='dev.berth.shim'/>"));
        assert!(xml.contains("<address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/>"));
        assert_eq!(
            root.descendants()
                .filter(|n| n.has_tag_name("readonly"))
                .count(),
            1
        );
        assert!(root.descendants().any(|n| n.has_tag_name("acpi")));
        let owner = root
            .descendants()
            .find(|n| {
                n.tag_name().namespace() == Some(WORKLOAD_NAMESPACE)
                    && n.has_tag_name((WORKLOAD_NAMESPACE, "owner"))
            })
            .and_then(|n| n.text());
        assert_eq!(owner, Some("agent <1> & 'co'"));
    }

    #[test]
    fn networks_default_to_libvirts_nat_or_none() {
        let mut vm = VmSpec::default();
        assert_eq!(Nic::of(&vm), Nic::Network("default".into()));
        vm.network = "none".into();
        assert_eq!(Nic::of(&vm), Nic::None);
        vm.bridge = "br0".into();
        assert_eq!(Nic::of(&vm), Nic::Bridge("br0".into()));
    }

    #[test]
    fn metadata_round_trips_even_with_another_prefix() {
        let metadata = BerthMetadata {
            owner: "o1".into(),
            created_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            labels: BTreeMap::from([("team".to_string(), "a&b".to_string())]),
            files_dir: Some("/var/lib/berth/libvirt/vm1.x".into()),
            spec: Some(vm_spec()),
        };
        assert_eq!(
            BerthMetadata::parse(&metadata.to_xml()),
            Some(metadata.clone())
        );
        // libvirt writes the element back under the prefix it chooses.
        let renamed = metadata
            .to_xml()
            .replace("berth:", "b:")
            .replace("xmlns:berth", "xmlns:b");
        assert_eq!(BerthMetadata::parse(&renamed), Some(metadata));
        // As virDomainGetMetadata returns it: without the namespace.
        let stripped = BerthMetadata::parse("<workload>\n  <owner>o1</owner>\n</workload>");
        assert_eq!(stripped.map(|m| m.owner), Some("o1".to_string()));
        let other = "<workload xmlns='https://example.com/other'><owner>o1</owner></workload>";
        assert_eq!(BerthMetadata::parse(other), None);
        assert_eq!(BerthMetadata::parse("not xml"), None);
    }

    #[test]
    fn run_element_dates_the_start() {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_123);
        assert_eq!(parse_run(&run_xml(started)), Some(started));
        assert_eq!(parse_run("<run started='x'/>"), None);
        assert_eq!(parse_run("<workload started='1'/>"), None);
    }
}
