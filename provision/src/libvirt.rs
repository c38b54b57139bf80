//! The libvirt backend: network and domain XML generated from the topology, defined and
//! started through the `virt` crate against a connection URI.
//!
//! Names: network `P-<network>` on bridge `hp<hash>n<k>` (a short hash of the prefix keeps the
//! bridge name under the 15-character Linux limit and distinct between stands), domain
//! `P-<node>`. Node addresses are static (no DHCP on the stand's networks), so the domain
//! carries them in an `ha-provision` metadata element for the guest bootstrap; interface MACs
//! are derived from those addresses ([`mac_address`]) so they are stable across `up` runs.
//!
//! Invariants: as in the netns backend, each object is recorded in the state file before it
//! is defined, `up` defines only what is missing and starts only what is inactive, and `down`
//! destroys and undefines exactly the recorded objects, domains before the networks they use.
//! The XML is built from validated names and typed addresses; file paths, the only free-form
//! input, are escaped.
//! The calls are blocking FFI: async callers must wrap them in `spawn_blocking`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use tracing::{debug, info};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::network::Network;

use crate::state::{Resource, StateError, StateFile};
use crate::topology::{NetworkMode, Node, Topology, mac_address};

/// XML namespace of the domain metadata element.
pub const METADATA_NS: &str = "https://xmpp-ha.invalid/ha-provision/1";

/// Errors of the libvirt backend.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// A libvirt call failed.
    #[error("libvirt: {action}: {source}")]
    Virt {
        /// What was being done.
        action: String,
        /// libvirt's error.
        source: virt::error::Error,
    },
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The guests' disks and keys could not be removed.
    #[error("removing guest files {path}: {source}")]
    GuestFiles {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state lists a resource of another backend.
    #[error("state lists {0:?}, which the libvirt backend does not create")]
    Foreign(Resource),
}

fn virt_err(action: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let action = action.into();
    move |source| LibvirtError::Virt { action, source }
}

/// The libvirt network name of `network`.
pub fn network_name(prefix: &str, network: &str) -> String {
    format!("{prefix}-{network}")
}

/// The libvirt domain name of `node`.
pub fn domain_name(prefix: &str, node: &str) -> String {
    format!("{prefix}-{node}")
}

/// The bridge of the network at `network_index`.
pub fn bridge_name(prefix: &str, network_index: usize) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = prefix.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("hp{:06x}n{network_index}", hash & 0x00ff_ffff)
}

/// The network XML of the network at `network_index`.
pub fn network_xml(topology: &Topology, prefix: &str, network_index: usize) -> Option<String> {
    let net = topology.networks.get(network_index)?;
    let mut xml = String::from("<network>\n");
    let _ = writeln!(xml, "  <name>{}</name>", network_name(prefix, &net.name));
    let _ = writeln!(
        xml,
        "  <bridge name='{}' stp='on' delay='0'/>",
        bridge_name(prefix, network_index)
    );
    match net.mode {
        NetworkMode::Isolated => {}
        NetworkMode::Routed => xml.push_str("  <forward mode='route'/>\n"),
        NetworkMode::Nat => xml.push_str("  <forward mode='nat'/>\n"),
    }
    if let Some(host) = net.host {
        // Addresses are static and hosts files are written into each guest: no DHCP, and no
        // DNS either, so libvirt starts no dnsmasq on the stand's networks.
        xml.push_str("  <dns enable='no'/>\n");
        let _ = writeln!(
            xml,
            "  <ip address='{host}' prefix='{}'/>",
            net.cidr.prefix()
        );
    }
    xml.push_str("</network>\n");
    Some(xml)
}

/// The disks and boot files of one guest (see [`crate::bootstrap`]). A domain defined without
/// them is an empty shell: enough for the network layout and the test driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMedia {
    /// Kernel for direct boot (from the base image).
    pub kernel: PathBuf,
    /// Its initrd.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// The guest's qcow2 overlay on the base image (`vda`, the root filesystem).
    pub disk: PathBuf,
    /// The seed disk (`vdb`, raw ext4, read-only).
    pub seed: PathBuf,
    /// File receiving the serial console.
    pub console_log: PathBuf,
}

/// The domain XML of `node`, with its disks and direct kernel boot when `media` is given.
pub fn domain_xml(
    topology: &Topology,
    prefix: &str,
    node: &Node,
    media: Option<&GuestMedia>,
) -> String {
    let mut xml = format!("<domain type='{}'>\n", topology.libvirt.domain_type);
    let _ = writeln!(xml, "  <name>{}</name>", domain_name(prefix, &node.name));
    xml.push_str("  <metadata>\n");
    let _ = writeln!(
        xml,
        "    <hp:node xmlns:hp='{METADATA_NS}' name='{}' role='{}'>",
        node.name, node.role
    );
    for a in topology.attachments(node) {
        let _ = writeln!(
            xml,
            "      <hp:address network='{}' ip='{}' prefix='{}'/>",
            a.network.name,
            a.address,
            a.network.cidr.prefix()
        );
    }
    if let Some(gw) = topology.default_gateway(node) {
        let _ = writeln!(xml, "      <hp:route default-via='{gw}'/>");
    }
    xml.push_str("    </hp:node>\n  </metadata>\n");
    let _ = writeln!(xml, "  <memory unit='MiB'>{}</memory>", node.memory_mib);
    let _ = writeln!(xml, "  <vcpu>{}</vcpu>", node.cpus);
    let _ = writeln!(
        xml,
        "  <os>\n    <type arch='{}'>hvm</type>",
        std::env::consts::ARCH
    );
    if let Some(m) = media {
        let _ = writeln!(
            xml,
            "    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>",
            xml_text(&m.kernel.display().to_string()),
            xml_text(&m.initrd.display().to_string()),
            xml_text(&m.cmdline)
        );
    }
    xml.push_str("  </os>\n");
    // ACPI lets `virsh shutdown` reach the guest; `destroy` works without it.
    xml.push_str("  <features>\n    <acpi/>\n  </features>\n");
    xml.push_str("  <devices>\n");
    if let Some(m) = media {
        let _ = writeln!(
            xml,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>",
            xml_text(&m.disk.display().to_string())
        );
        let _ = writeln!(
            xml,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>\n    </disk>",
            xml_text(&m.seed.display().to_string())
        );
        let _ = writeln!(
            xml,
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    </serial>",
            xml_text(&m.console_log.display().to_string())
        );
    }
    for a in topology.attachments(node) {
        let _ = writeln!(
            xml,
            "    <interface type='network'>\n      <source network='{}'/>\n      <mac address='{}'/>\n      <model type='virtio'/>\n    </interface>",
            network_name(prefix, &a.network.name),
            mac_address(a.address),
        );
    }
    xml.push_str("  </devices>\n</domain>\n");
    xml
}

/// Escapes text for an XML attribute or element: paths are the only free-form input.
fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A domain's observed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    /// The node.
    pub node: String,
    /// The libvirt domain name.
    pub domain: String,
    /// Whether the domain is defined.
    pub defined: bool,
    /// Whether it runs.
    pub active: bool,
}

/// An open libvirt connection.
#[derive(Debug)]
pub struct LibvirtBackend {
    conn: Connect,
}

/// `Ok(None)` for libvirt's "no such object" error, the error otherwise.
fn absent_as_none<T>(
    result: Result<T, virt::error::Error>,
    absent: ErrorNumber,
    action: String,
) -> Result<Option<T>, LibvirtError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == virt::enumutil::Enum::Known(absent) => Ok(None),
        Err(source) => Err(LibvirtError::Virt { action, source }),
    }
}

impl LibvirtBackend {
    /// Opens a connection to `uri` (`qemu:///system`, `test:///default`, ...).
    pub fn open(uri: &str) -> Result<Self, LibvirtError> {
        // Errors are returned to the caller; libvirt's default handler would also print
        // expected ones (a lookup of a not yet defined object) on stderr.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(virt_err(format!("connect to {uri}")))?;
        Ok(Self { conn })
    }

    fn network(&self, name: &str) -> Result<Option<Network>, LibvirtError> {
        absent_as_none(
            self.conn.lookup_network_by_name(name),
            ErrorNumber::NoNetwork,
            format!("look up network {name}"),
        )
    }

    fn domain(&self, name: &str) -> Result<Option<Domain>, LibvirtError> {
        absent_as_none(
            self.conn.lookup_domain_by_name(name),
            ErrorNumber::NoDomain,
            format!("look up domain {name}"),
        )
    }

    /// The connection, for callers that inspect what was built.
    pub fn connection(&self) -> &Connect {
        &self.conn
    }

    /// Defines and starts every missing or inactive network and domain of `topology`; the
    /// domains of nodes in `media` get their disks and direct kernel boot.
    pub fn up(
        &self,
        topology: &Topology,
        state: &mut StateFile,
        media: &BTreeMap<String, GuestMedia>,
    ) -> Result<(), LibvirtError> {
        let prefix = state.state().prefix.clone();
        for (k, net) in topology.networks.iter().enumerate() {
            let name = network_name(&prefix, &net.name);
            state.record(Resource::LibvirtNetwork { name: name.clone() })?;
            let network = match self.network(&name)? {
                Some(n) => n,
                None => {
                    let xml =
                        network_xml(topology, &prefix, k).expect("k enumerates topology.networks");
                    info!(network = %name, "defining libvirt network");
                    self.conn
                        .define_network_xml(&xml)
                        .map_err(virt_err(format!("define network {name}")))?
                }
            };
            if !network
                .is_active()
                .map_err(virt_err(format!("query network {name}")))?
            {
                info!(network = %name, "starting libvirt network");
                network
                    .create()
                    .map_err(virt_err(format!("start network {name}")))?;
            }
        }
        for node in &topology.nodes {
            let name = domain_name(&prefix, &node.name);
            state.record(Resource::LibvirtDomain { name: name.clone() })?;
            let domain = match self.domain(&name)? {
                Some(d) => d,
                None => {
                    info!(domain = %name, role = %node.role, "defining libvirt domain");
                    self.conn
                        .define_domain_xml(&domain_xml(
                            topology,
                            &prefix,
                            node,
                            media.get(&node.name),
                        ))
                        .map_err(virt_err(format!("define domain {name}")))?
                }
            };
            if !domain
                .is_active()
                .map_err(virt_err(format!("query domain {name}")))?
            {
                info!(domain = %name, "starting libvirt domain");
                domain
                    .create()
                    .map_err(virt_err(format!("start domain {name}")))?;
            }
        }
        info!(stand = %topology.name, prefix = %prefix, "libvirt stand is up");
        Ok(())
    }

    /// Stops and undefines every recorded domain, then every recorded network, then removes
    /// the guests' files and keys and the state file.
    pub fn down(&self, mut state: StateFile) -> Result<(), LibvirtError> {
        let created: Vec<Resource> = state.state().created.iter().rev().cloned().collect();
        // Domains first: a network cannot be destroyed while guests use it. The generated
        // material (crate::material) last.
        let (files, created): (Vec<Resource>, Vec<Resource>) = created
            .into_iter()
            .partition(|r| matches!(r, Resource::Files { .. }));
        let (domains, networks): (Vec<Resource>, Vec<Resource>) = created
            .into_iter()
            .partition(|r| matches!(r, Resource::LibvirtDomain { .. }));
        for resource in domains.iter().chain(&networks).chain(&files) {
            match resource {
                Resource::LibvirtDomain { name } => match self.domain(name)? {
                    Some(d) => {
                        if d.is_active()
                            .map_err(virt_err(format!("query domain {name}")))?
                        {
                            d.destroy()
                                .map_err(virt_err(format!("stop domain {name}")))?;
                        }
                        d.undefine()
                            .map_err(virt_err(format!("undefine domain {name}")))?;
                        info!(domain = %name, "undefined libvirt domain");
                    }
                    None => debug!(domain = %name, "already gone"),
                },
                Resource::LibvirtNetwork { name } => match self.network(name)? {
                    Some(n) => {
                        if n.is_active()
                            .map_err(virt_err(format!("query network {name}")))?
                        {
                            n.destroy()
                                .map_err(virt_err(format!("stop network {name}")))?;
                        }
                        n.undefine()
                            .map_err(virt_err(format!("undefine network {name}")))?;
                        info!(network = %name, "undefined libvirt network");
                    }
                    None => debug!(network = %name, "already gone"),
                },
                Resource::Files { path } => match crate::state::remove_files(path) {
                    Ok(true) => info!(path = %path.display(), "removed"),
                    Ok(false) => {}
                    Err(source) => {
                        return Err(LibvirtError::GuestFiles {
                            path: path.clone(),
                            source,
                        });
                    }
                },
                other => return Err(LibvirtError::Foreign(other.clone())),
            }
            state.forget(resource)?;
        }
        // The guests' overlays, seeds, consoles and keys (crate::bootstrap) go with them.
        for path in [
            crate::bootstrap::guests_root(state.dir()),
            crate::bootstrap::ssh_dir(state.dir()),
        ] {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => info!(path = %path.display(), "removed guest files"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(LibvirtError::GuestFiles { path, source }),
            }
        }
        state.remove()?;
        Ok(())
    }

    /// The state of each node's domain.
    pub fn status(
        &self,
        topology: &Topology,
        prefix: &str,
    ) -> Result<Vec<DomainStatus>, LibvirtError> {
        topology
            .nodes
            .iter()
            .map(|node| {
                let domain = domain_name(prefix, &node.name);
                let (defined, active) = match self.domain(&domain)? {
                    Some(d) => (
                        true,
                        d.is_active()
                            .map_err(virt_err(format!("query domain {domain}")))?,
                    ),
                    None => (false, false),
                };
                Ok(DomainStatus {
                    node: node.name.clone(),
                    domain,
                    defined,
                    active,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BackendKind;
    use crate::topology::tests::example;

    fn network_names(conn: &Connect) -> Vec<String> {
        let mut names = conn.list_networks().expect("list active networks");
        names.extend(
            conn.list_defined_networks()
                .expect("list inactive networks"),
        );
        names.sort();
        names
    }

    fn domain_names(conn: &Connect) -> Vec<String> {
        let mut names: Vec<String> = conn
            .list_all_domains(0)
            .expect("list domains")
            .iter()
            .map(|d| d.name().expect("domain name"))
            .collect();
        names.sort();
        names
    }

    /// Against libvirt's built-in test driver: `up` defines and starts exactly the stand's
    /// networks and domains with the topology's bridges, addresses, memory and vCPUs, a second
    /// `up` changes nothing, and `down` removes exactly those, leaving the driver's own
    /// `default` network and `test` domain.
    #[test]
    fn up_and_down_against_the_test_driver() {
        let t = example();
        let backend = LibvirtBackend::open("test:///default").expect("test driver");
        let conn = backend.connection();
        let networks_before = network_names(conn);
        let domains_before = domain_names(conn);
        assert!(
            !domains_before.is_empty(),
            "the test driver ships a domain of its own"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let text = toml::to_string(&t).expect("serialize topology");
        let mut state = StateFile::open_for_up(
            dir.path(),
            &text,
            &t,
            BackendKind::Libvirt,
            "lvt",
            Some("test:///default".into()),
        )
        .expect("state");
        let no_media = BTreeMap::new();
        backend.up(&t, &mut state, &no_media).expect("first up");
        backend
            .up(&t, &mut state, &no_media)
            .expect("second up is idempotent");

        let mut expected_networks = networks_before.clone();
        expected_networks.extend(t.networks.iter().map(|n| network_name("lvt", &n.name)));
        expected_networks.sort();
        assert_eq!(network_names(conn), expected_networks);
        let mut expected_domains = domains_before.clone();
        expected_domains.extend(t.nodes.iter().map(|n| domain_name("lvt", &n.name)));
        expected_domains.sort();
        assert_eq!(domain_names(conn), expected_domains);
        assert_eq!(
            state.state().created.len(),
            t.networks.len() + t.nodes.len(),
            "each object recorded once"
        );

        for (k, net) in t.networks.iter().enumerate() {
            let n = conn
                .lookup_network_by_name(&network_name("lvt", &net.name))
                .expect("network defined");
            assert!(n.is_active().expect("is_active"), "{} started", net.name);
            assert_eq!(n.bridge_name().expect("bridge"), bridge_name("lvt", k));
            let xml = n.xml_desc(0).expect("network xml");
            match net.host {
                Some(host) => assert!(xml.contains(&format!("address='{host}'")), "{xml}"),
                None => assert!(!xml.contains("<ip"), "{xml}"),
            }
        }
        for node in &t.nodes {
            let d = conn
                .lookup_domain_by_name(&domain_name("lvt", &node.name))
                .expect("domain defined");
            assert!(d.is_active().expect("is_active"), "{} started", node.name);
            let info = d.info().expect("domain info");
            assert_eq!(
                info.max_mem,
                node.memory_mib * 1024,
                "{} memory in KiB",
                node.name
            );
            assert_eq!(info.nr_virt_cpu, node.cpus, "{} vcpus", node.name);
            let xml = d.xml_desc(0).expect("domain xml");
            for (net, addr) in &node.addresses {
                assert!(
                    // libvirt re-serialises metadata with double quotes.
                    xml.contains(&format!("network=\"{net}\" ip=\"{addr}\"")),
                    "{} address on {net}: {xml}",
                    node.name
                );
                assert!(xml.contains(&network_name("lvt", net)), "{xml}");
            }
        }

        let status = backend.status(&t, "lvt").expect("status");
        assert!(status.iter().all(|s| s.defined && s.active), "{status:?}");

        backend.down(state).expect("down");
        assert_eq!(network_names(conn), networks_before);
        assert_eq!(domain_names(conn), domains_before);
        assert!(
            StateFile::load(dir.path()).expect("load").is_none(),
            "state removed"
        );
    }

    #[test]
    fn xml_carries_names_addresses_and_resources() {
        let t = example();
        let dmz = t
            .networks
            .iter()
            .position(|n| n.name == "dmz")
            .expect("dmz");
        let xml = network_xml(&t, "lab", dmz).expect("index is valid");
        assert!(xml.contains("<name>lab-dmz</name>"), "{xml}");
        assert!(
            !xml.contains("<ip") && !xml.contains("<forward"),
            "isolated: {xml}"
        );
        let mgmt = network_xml(&t, "lab", 0).expect("index is valid");
        assert!(mgmt.contains("<forward mode='nat'/>"), "{mgmt}");
        assert!(
            mgmt.contains("<ip address='192.168.121.1' prefix='24'/>"),
            "{mgmt}"
        );
        assert!(mgmt.contains("<dns enable='no'/>"), "{mgmt}");
        let e1 = t.node("e1server").expect("e1server");
        let xml = domain_xml(&t, "lab", e1, None);
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(!xml.contains("<disk"), "no media, no disk: {xml}");
        assert!(xml.contains("<memory unit='MiB'>1024</memory>"), "{xml}");
        assert!(xml.contains("<vcpu>1</vcpu>"), "{xml}");
        assert!(
            xml.contains("<hp:address network='dmz' ip='192.168.1.2' prefix='29'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<hp:route default-via='192.168.1.1'/>"),
            "{xml}"
        );
        assert!(xml.contains("<source network='lab-dmz'/>"), "{xml}");
        assert!(xml.contains("<mac address='52:54:00:a8:01:02'/>"), "{xml}");
        assert!(bridge_name("a-rather-long-prefix", 12).len() <= 15);
    }

    #[test]
    fn domain_with_media_boots_its_kernel_from_its_disks() {
        let mut t = example();
        t.libvirt.domain_type = crate::topology::DomainType::Kvm;
        let e1 = t.node("e1server").expect("e1server");
        let media = GuestMedia {
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd.img".into(),
            cmdline: "root=/dev/vda console=ttyS0".into(),
            disk: "/s/guests/e1server/disk.qcow2".into(),
            seed: "/s/guests/e1server/seed.img".into(),
            console_log: "/s/it's/console.log".into(),
        };
        let xml = domain_xml(&t, "lab", e1, Some(&media));
        assert!(xml.starts_with("<domain type='kvm'>"), "{xml}");
        assert!(
            xml.contains("<kernel>/img/vmlinuz</kernel>\n    <initrd>/img/initrd.img</initrd>\n    <cmdline>root=/dev/vda console=ttyS0</cmdline>\n  </os>"),
            "{xml}"
        );
        assert!(
            xml.contains("<driver name='qemu' type='qcow2'/>\n      <source file='/s/guests/e1server/disk.qcow2'/>\n      <target dev='vda' bus='virtio'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<source file='/s/guests/e1server/seed.img'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<serial type='file'>\n      <source path='/s/it&apos;s/console.log'/>"),
            "{xml}"
        );
        assert_ne!(bridge_name("lab1", 0), bridge_name("lab2", 0));
    }
}
