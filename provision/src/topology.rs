//! The topology file: networks, nodes and the port settings of a stand, parsed from TOML and
//! validated before anything is created.
//!
//! A [`Topology`] obtained from [`Topology::parse`] is valid: names are unique and usable as
//! namespace, libvirt and host names; networks do not overlap; every node address is a host
//! address of a network the file declares; exactly one network is the management network;
//! gateways join at least two service networks; every role has the distinct, non-zero ports it
//! needs. The backends and the firewall generator rely on these invariants.
//!
//! Format (every table is `deny_unknown_fields`; see `provision/README.md` and
//! `examples/xmpp-lab.toml`):
//!
//! ```toml
//! name = "xmpp-lab"          # stand name: namespace/libvirt prefix and state directory
//! domain = "domain.local"    # DNS domain written to the hosts files
//!
//! [ports]                    # optional, these are the defaults
//! monitor_api = 7400         # the monitor's one gRPC port: agents, operators, peers (Raft)
//! agent = 7410               # monitor -> agent
//! postgres = 5432
//! xmpp = [5222, 5223, 5269, 5443, 5280]
//! mqtt = 1883
//! epmd = 4369
//! erlang_dist = { first = 4200, last = 4210 }
//! management = [22]          # reachable from the management network on every node
//! proxy = 5000               # the gateway's HAProxy (netns): PostgreSQL to the primary
//!
//! [libvirt]                  # optional, these are the defaults
//! uri = "qemu:///system"
//! domain_type = "qemu"       # or "kvm"
//!
//! [[network]]
//! name = "management"
//! cidr = "192.168.121.0/24"
//! mode = "nat"               # isolated | routed | nat
//! host = "192.168.121.1"     # the host's address; required unless isolated
//! management = true          # exactly one network
//!
//! [[node]]
//! name = "e1server"
//! role = "ejabberd"          # monitor | postgres | ejabberd | gateway
//! cpus = 1
//! memory_mib = 1024
//! addresses = { management = "192.168.121.11", dmz = "192.168.1.2" }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::cidr::Ipv4Cidr;

/// Longest accepted node or network name: names end up in namespace names, libvirt names and
/// host names, and a short bound keeps derived names readable.
const MAX_NAME_LEN: usize = 32;

/// Why a topology file was refused. Every message names the offending item.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Not valid TOML or not the expected shape (unknown field, wrong type, bad CIDR).
    #[error("topology file: {0}")]
    Parse(#[from] toml::de::Error),
    /// A name is empty, too long or uses characters other than `a-z`, `0-9` and `-`.
    #[error(
        "{kind} name `{name}` is invalid: use 1 to {MAX_NAME_LEN} of a-z, 0-9 and '-', starting with a letter"
    )]
    InvalidName {
        /// `stand`, `network` or `node`.
        kind: &'static str,
        /// The name as written.
        name: String,
    },
    /// Two networks or two nodes share a name.
    #[error("duplicate {kind} name `{name}`")]
    DuplicateName {
        /// `network` or `node`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// Two networks share addresses.
    #[error("network `{a}` ({a_cidr}) overlaps network `{b}` ({b_cidr})")]
    OverlappingNetworks {
        /// First network.
        a: String,
        /// Its CIDR.
        a_cidr: Ipv4Cidr,
        /// Second network.
        b: String,
        /// Its CIDR.
        b_cidr: Ipv4Cidr,
    },
    /// A node has an address on a network the file does not declare.
    #[error("node `{node}` has an address on unknown network `{network}`")]
    UnknownNetwork {
        /// The node.
        node: String,
        /// The undeclared network.
        network: String,
    },
    /// A node address is not a usable host address of its network.
    #[error(
        "node `{node}`: address {address} is not a host address of network `{network}` ({cidr})"
    )]
    AddressOutsideNetwork {
        /// The node.
        node: String,
        /// The network.
        network: String,
        /// The address given.
        address: Ipv4Addr,
        /// The network's range.
        cidr: Ipv4Cidr,
    },
    /// Two holders (nodes or a network's host address) claim the same address.
    #[error("address {address} is used by both {a} and {b}")]
    DuplicateAddress {
        /// The address.
        address: Ipv4Addr,
        /// First holder.
        a: String,
        /// Second holder.
        b: String,
    },
    /// A node joins no network.
    #[error("node `{node}` has no address on any network")]
    NoAddress {
        /// The node.
        node: String,
    },
    /// A node has zero CPUs or zero memory.
    #[error("node `{node}`: {problem}")]
    Resources {
        /// The node.
        node: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A network's host address is missing, not allowed, or outside the network.
    #[error("network `{network}`: {problem}")]
    HostAddress {
        /// The network.
        network: String,
        /// What is wrong.
        problem: String,
    },
    /// Not exactly one management network.
    #[error("{0}")]
    ManagementNetwork(String),
    /// A well-formed file whose nodes cannot make a cluster (see [`Topology::check_cluster`]).
    #[error("not a cluster: {0}")]
    NotACluster(String),
    /// A gateway that joins fewer than two service (non-management) networks routes nothing.
    #[error("gateway `{node}` must join at least two service networks, it joins {count}")]
    GatewayNetworks {
        /// The gateway node.
        node: String,
        /// How many service networks it joins.
        count: usize,
    },
    /// A role lacks a port it needs, or two of its services share a port.
    #[error("role {role}: {problem}")]
    RolePorts {
        /// The role.
        role: Role,
        /// What is missing or conflicting.
        problem: String,
    },
}

/// How a network reaches the world outside the stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No host address, no forwarding: only the nodes on it talk to each other.
    Isolated,
    /// The host has an address on it and routes it without NAT.
    Routed,
    /// The host has an address on it and masquerades it (libvirt's default network).
    Nat,
}

/// What a node runs; the firewall rules and routes are derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `ha-monitor` (Raft member).
    Monitor,
    /// PostgreSQL 15 with an `ha-agent`.
    Postgres,
    /// ejabberd frontend with an `ha-agent`.
    Ejabberd,
    /// Routes between the service networks.
    Gateway,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Monitor => "monitor",
            Role::Postgres => "postgres",
            Role::Ejabberd => "ejabberd",
            Role::Gateway => "gateway",
        })
    }
}

/// An inclusive TCP port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// A range holding one port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// The TCP ports of every service; the firewall is generated from these, never typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// The monitor's single gRPC port: agents, operators and the other monitors (Raft).
    pub monitor_api: u16,
    /// Agent gRPC (called by the monitors).
    pub agent: u16,
    /// PostgreSQL.
    pub postgres: u16,
    /// XMPP client, server-to-server and HTTP listeners of ejabberd.
    pub xmpp: Vec<u16>,
    /// ejabberd's MQTT listener.
    pub mqtt: u16,
    /// Erlang port mapper.
    pub epmd: u16,
    /// Erlang distribution, pinned so the firewall can name it.
    pub erlang_dist: PortRange,
    /// Management access (SSH) from the management network.
    pub management: Vec<u16>,
    /// The gateway's HAProxy: PostgreSQL sessions forwarded to the primary of the moment
    /// (checked through the agents' `/primary` endpoint), for applications on the service
    /// networks that cannot follow the primary themselves.
    pub proxy: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            monitor_api: 7400,
            agent: 7410,
            postgres: 5432,
            xmpp: vec![5222, 5223, 5269, 5443, 5280],
            mqtt: 1883,
            epmd: 4369,
            erlang_dist: PortRange {
                first: 4200,
                last: 4210,
            },
            management: vec![22],
            proxy: 5000,
        }
    }
}

impl Ports {
    /// Every port a node of `role` listens on, with the service's name, management included.
    pub fn listening(&self, role: Role) -> Vec<(&'static str, PortRange)> {
        let mut ports: Vec<(&'static str, PortRange)> = self
            .management
            .iter()
            .map(|&p| ("management", PortRange::single(p)))
            .collect();
        match role {
            Role::Monitor => {
                ports.push(("monitor_api", PortRange::single(self.monitor_api)));
            }
            Role::Postgres => {
                ports.push(("postgres", PortRange::single(self.postgres)));
                ports.push(("agent", PortRange::single(self.agent)));
            }
            Role::Ejabberd => {
                ports.extend(self.xmpp.iter().map(|&p| ("xmpp", PortRange::single(p))));
                ports.push(("mqtt", PortRange::single(self.mqtt)));
                ports.push(("epmd", PortRange::single(self.epmd)));
                ports.push(("erlang_dist", self.erlang_dist));
                ports.push(("agent", PortRange::single(self.agent)));
            }
            Role::Gateway => {
                ports.push(("proxy", PortRange::single(self.proxy)));
            }
        }
        ports
    }

    /// Checks that `role` has every port it needs and that none of its services collide.
    fn validate_role(&self, role: Role) -> Result<(), TopologyError> {
        let fail = |problem: String| Err(TopologyError::RolePorts { role, problem });
        if self.management.is_empty() {
            return fail("no management port (ports.management is empty)".into());
        }
        if role == Role::Ejabberd && self.xmpp.is_empty() {
            return fail("no XMPP port (ports.xmpp is empty)".into());
        }
        if self.erlang_dist.first > self.erlang_dist.last && role == Role::Ejabberd {
            return fail(format!(
                "Erlang distribution range {}-{} is empty",
                self.erlang_dist.first, self.erlang_dist.last
            ));
        }
        let ports = self.listening(role);
        for (i, (name, range)) in ports.iter().enumerate() {
            if range.first == 0 {
                return fail(format!("port {name} is 0"));
            }
            for (other, other_range) in &ports[i + 1..] {
                if range.first <= other_range.last && other_range.first <= range.last {
                    return fail(format!(
                        "port {name} ({range}) collides with port {other} ({other_range})"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Hypervisor settings for the libvirt backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtSettings {
    /// Connection URI (`qemu:///system`; tests use `test:///default`).
    pub uri: String,
    /// Domain type written into the domain XML.
    pub domain_type: DomainType,
}

impl Default for LibvirtSettings {
    fn default() -> Self {
        Self {
            uri: "qemu:///system".into(),
            domain_type: DomainType::Qemu,
        }
    }
}

/// libvirt domain type: `qemu` (emulation, works everywhere) or `kvm` (needs /dev/kvm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    /// Full emulation.
    Qemu,
    /// Hardware virtualisation.
    Kvm,
}

impl fmt::Display for DomainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainType::Qemu => "qemu",
            DomainType::Kvm => "kvm",
        })
    }
}

/// One network of the stand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Unique name.
    pub name: String,
    /// Address range.
    pub cidr: Ipv4Cidr,
    /// Reachability from the host.
    pub mode: NetworkMode,
    /// The host's address on the network (required for routed and nat, refused for isolated).
    #[serde(default)]
    pub host: Option<Ipv4Addr>,
    /// The operator network: management ports of every node are open from it, and nothing
    /// is routed through it.
    #[serde(default)]
    pub management: bool,
}

/// One node (namespace or guest) of the stand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique name, also its host name.
    pub name: String,
    /// What it runs.
    pub role: Role,
    /// Virtual CPUs (libvirt).
    pub cpus: u32,
    /// Memory in MiB (libvirt).
    pub memory_mib: u64,
    /// Its address on each network it joins, keyed by network name.
    pub addresses: BTreeMap<String, Ipv4Addr>,
}

/// A node's attachment to one network, in the order of the file's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment<'a> {
    /// Position of the network in the file (stable interface and bridge numbering).
    pub network_index: usize,
    /// The network.
    pub network: &'a Network,
    /// The node's address on it.
    pub address: Ipv4Addr,
}

/// A whole stand. See the module documentation for the format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Stand name.
    pub name: String,
    /// DNS domain of the hosts files.
    pub domain: String,
    /// Service ports.
    #[serde(default)]
    pub ports: Ports,
    /// libvirt backend settings.
    #[serde(default)]
    pub libvirt: LibvirtSettings,
    /// Networks, in file order.
    #[serde(rename = "network")]
    pub networks: Vec<Network>,
    /// Nodes, in file order.
    #[serde(rename = "node")]
    pub nodes: Vec<Node>,
}

/// The MAC address of the interface holding `address`: the QEMU/KVM prefix `52:54:00` and
/// the address's last three octets. Stable, so a node rebuilt by `up` keeps its MAC and its
/// neighbours' ARP caches stay valid. Two addresses on one network differ in their last three
/// octets for any prefix of /8 or longer, so MACs never collide on a bridge.
pub fn mac_address(address: Ipv4Addr) -> String {
    let o = address.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// Whether `name` is usable in namespace, libvirt, interface-free host names.
pub fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl Topology {
    /// Parses and validates a topology file.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let topology: Topology = toml::from_str(text)?;
        topology.validate()?;
        Ok(topology)
    }

    /// Checks every invariant listed in the module documentation.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if !valid_name(&self.name) {
            return Err(TopologyError::InvalidName {
                kind: "stand",
                name: self.name.clone(),
            });
        }
        self.validate_networks()?;
        self.validate_nodes()?;
        let mut roles: Vec<Role> = self.nodes.iter().map(|n| n.role).collect();
        roles.sort();
        roles.dedup();
        for role in roles {
            self.ports.validate_role(role)?;
        }
        Ok(())
    }

    fn validate_networks(&self) -> Result<(), TopologyError> {
        for (i, net) in self.networks.iter().enumerate() {
            if !valid_name(&net.name) {
                return Err(TopologyError::InvalidName {
                    kind: "network",
                    name: net.name.clone(),
                });
            }
            for other in &self.networks[..i] {
                if other.name == net.name {
                    return Err(TopologyError::DuplicateName {
                        kind: "network",
                        name: net.name.clone(),
                    });
                }
                if other.cidr.overlaps(&net.cidr) {
                    return Err(TopologyError::OverlappingNetworks {
                        a: other.name.clone(),
                        a_cidr: other.cidr,
                        b: net.name.clone(),
                        b_cidr: net.cidr,
                    });
                }
            }
            let host_problem = match (net.mode, net.host) {
                (NetworkMode::Isolated, Some(_)) => {
                    Some("an isolated network has no host address".to_owned())
                }
                (NetworkMode::Routed | NetworkMode::Nat, None) => {
                    Some("a routed or nat network needs a host address".to_owned())
                }
                (_, Some(host)) if !net.cidr.is_host_address(host) => Some(format!(
                    "host address {host} is not a host address of {}",
                    net.cidr
                )),
                _ => None,
            };
            if let Some(problem) = host_problem {
                return Err(TopologyError::HostAddress {
                    network: net.name.clone(),
                    problem,
                });
            }
        }
        match self.networks.iter().filter(|n| n.management).count() {
            1 => Ok(()),
            0 => Err(TopologyError::ManagementNetwork(
                "no management network: mark exactly one network `management = true`".into(),
            )),
            n => Err(TopologyError::ManagementNetwork(format!(
                "{n} management networks: mark exactly one network `management = true`"
            ))),
        }
    }

    fn validate_nodes(&self) -> Result<(), TopologyError> {
        let mut holders: HashMap<Ipv4Addr, String> = self
            .networks
            .iter()
            .filter_map(|n| {
                n.host
                    .map(|h| (h, format!("the host on network `{}`", n.name)))
            })
            .collect();
        for (i, node) in self.nodes.iter().enumerate() {
            if !valid_name(&node.name) {
                return Err(TopologyError::InvalidName {
                    kind: "node",
                    name: node.name.clone(),
                });
            }
            if self.nodes[..i].iter().any(|o| o.name == node.name) {
                return Err(TopologyError::DuplicateName {
                    kind: "node",
                    name: node.name.clone(),
                });
            }
            if node.cpus == 0 {
                return Err(TopologyError::Resources {
                    node: node.name.clone(),
                    problem: "cpus must be at least 1",
                });
            }
            if node.memory_mib == 0 {
                return Err(TopologyError::Resources {
                    node: node.name.clone(),
                    problem: "memory_mib must be at least 1",
                });
            }
            if node.addresses.is_empty() {
                return Err(TopologyError::NoAddress {
                    node: node.name.clone(),
                });
            }
            for (net_name, &address) in &node.addresses {
                let net = self
                    .network(net_name)
                    .ok_or_else(|| TopologyError::UnknownNetwork {
                        node: node.name.clone(),
                        network: net_name.clone(),
                    })?;
                if !net.cidr.is_host_address(address) {
                    return Err(TopologyError::AddressOutsideNetwork {
                        node: node.name.clone(),
                        network: net_name.clone(),
                        address,
                        cidr: net.cidr,
                    });
                }
                let holder = format!("node `{}`", node.name);
                if let Some(previous) = holders.insert(address, holder.clone()) {
                    return Err(TopologyError::DuplicateAddress {
                        address,
                        a: previous,
                        b: holder,
                    });
                }
            }
            if node.role == Role::Gateway {
                let count = self.service_attachments(node).count();
                if count < 2 {
                    return Err(TopologyError::GatewayNetworks {
                        node: node.name.clone(),
                        count,
                    });
                }
            }
        }
        Ok(())
    }

    /// The network called `name`.
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The management network (exactly one in a validated topology).
    pub fn management_network(&self) -> Option<&Network> {
        self.networks.iter().find(|n| n.management)
    }

    /// Nodes with `role`, in file order.
    /// Whether the nodes can make a highly available cluster, which `plan` and `up` require: an
    /// odd number of monitors (Raft needs a majority; an even count tolerates no more
    /// failures than one fewer and can split evenly) and at least one PostgreSQL node. The
    /// parser accepts other shapes, so a file can describe a partial stand for other uses.
    pub fn check_cluster(&self) -> Result<(), TopologyError> {
        let monitors = self.nodes_with_role(Role::Monitor).count();
        if monitors == 0 {
            return Err(TopologyError::NotACluster(
                "no monitor node: add 3 or 5 nodes with role = \"monitor\"".into(),
            ));
        }
        if monitors == 1 {
            return Err(TopologyError::NotACluster(
                "1 monitor node: use 3 or 5; one monitor is a single point of failure, and \
                 ha-monitor refuses to run alone outside development mode"
                    .into(),
            ));
        }
        if monitors.is_multiple_of(2) {
            return Err(TopologyError::NotACluster(format!(
                "{monitors} monitor nodes: use an odd number (3 or 5); {monitors} survive no \
                 more monitor failures than {} and can split into two halves with no majority",
                monitors - 1
            )));
        }
        if self.nodes_with_role(Role::Postgres).next().is_none() {
            return Err(TopologyError::NotACluster(
                "no PostgreSQL node: add at least one node with role = \"postgres\" (two for \
                 failover)"
                    .into(),
            ));
        }
        Ok(())
    }

    pub fn nodes_with_role(&self, role: Role) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(move |n| n.role == role)
    }

    /// The node's attachments in the order of the file's networks, so interface numbering
    /// does not depend on the order of the `addresses` table.
    pub fn attachments<'a>(&'a self, node: &'a Node) -> impl Iterator<Item = Attachment<'a>> {
        self.networks
            .iter()
            .enumerate()
            .filter_map(move |(network_index, network)| {
                node.addresses
                    .get(&network.name)
                    .map(|&address| Attachment {
                        network_index,
                        network,
                        address,
                    })
            })
    }

    /// The node's attachments to service (non-management) networks.
    pub fn service_attachments<'a>(
        &'a self,
        node: &'a Node,
    ) -> impl Iterator<Item = Attachment<'a>> {
        self.attachments(node).filter(|a| !a.network.management)
    }

    /// This machine's addresses on `node`'s service networks (a routed or NAT network with
    /// `host`): where the operator of a libvirt lab runs `haclt drill`, whose writer logs in
    /// to PostgreSQL from there. Never a management address.
    pub fn operator_hosts<'a>(&'a self, node: &'a Node) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.service_attachments(node)
            .filter_map(|a| a.network.host)
    }

    /// The gateways' addresses on `node`'s service networks: where a gateway's HAProxy
    /// connects to `node` from.
    pub fn gateway_neighbours<'a>(&'a self, node: &'a Node) -> impl Iterator<Item = Ipv4Addr> + 'a {
        self.service_attachments(node).flat_map(move |a| {
            self.nodes_with_role(Role::Gateway)
                .filter_map(move |gw| gw.addresses.get(&a.network.name).copied())
        })
    }

    /// The addresses by which other nodes' services reach `node`: its service-network
    /// addresses. Its management address is deliberately excluded so that a service port
    /// opened to a peer is not also opened to the management network.
    pub fn service_addresses(&self, node: &Node) -> Vec<Ipv4Addr> {
        self.service_attachments(node).map(|a| a.address).collect()
    }

    /// The next hop of `node`'s default route: the address of a gateway on the first service
    /// network the node shares with one. Gateways themselves, and nodes on no gateway's
    /// network, have none.
    pub fn default_gateway(&self, node: &Node) -> Option<Ipv4Addr> {
        if node.role == Role::Gateway {
            return None;
        }
        self.service_attachments(node).find_map(|a| {
            self.nodes_with_role(Role::Gateway)
                .find_map(|gw| gw.addresses.get(&a.network.name).copied())
        })
    }

    /// `/etc/hosts` for every node: `localhost`, then each node's first service address as
    /// `name.domain name` and its management address as `name-mgmt.domain name-mgmt`.
    pub fn hosts_file(&self) -> String {
        let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost\n");
        for node in &self.nodes {
            if let Some(first) = self.service_attachments(node).next() {
                out.push_str(&format!(
                    "{}\t{}.{} {}\n",
                    first.address, node.name, self.domain, node.name
                ));
            }
            if let Some(mgmt) = self.attachments(node).find(|a| a.network.management) {
                out.push_str(&format!(
                    "{}\t{}-mgmt.{} {}-mgmt\n",
                    mgmt.address, node.name, self.domain, node.name
                ));
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The reference stand shipped in `examples/`.
    pub(crate) fn example() -> Topology {
        let text = include_str!("../../examples/xmpp-lab.toml");
        Topology::parse(text).unwrap()
    }

    /// A small valid topology the validation tests break one item at a time.
    const SMALL: &str = r#"
        name = "t"
        domain = "d.local"
        [[network]]
        name = "mgmt"
        cidr = "10.0.0.0/24"
        mode = "nat"
        host = "10.0.0.1"
        management = true
        [[network]]
        name = "dmz"
        cidr = "10.1.0.0/29"
        mode = "isolated"
        [[network]]
        name = "back"
        cidr = "10.1.0.8/29"
        mode = "isolated"
        [[node]]
        name = "gw"
        role = "gateway"
        cpus = 1
        memory_mib = 512
        addresses = { mgmt = "10.0.0.2", dmz = "10.1.0.1", back = "10.1.0.9" }
        [[node]]
        name = "e1"
        role = "ejabberd"
        cpus = 1
        memory_mib = 1024
        addresses = { mgmt = "10.0.0.3", dmz = "10.1.0.2" }
    "#;

    fn error_of(text: &str) -> String {
        Topology::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn example_parses_with_expected_shape() {
        let t = example();
        assert_eq!(t.name, "xmpp-lab");
        assert_eq!(t.nodes_with_role(Role::Monitor).count(), 3);
        assert_eq!(t.nodes_with_role(Role::Ejabberd).count(), 2);
        assert_eq!(t.nodes_with_role(Role::Postgres).count(), 2);
        let e1 = t.node("e1server").unwrap();
        assert_eq!(
            t.default_gateway(e1),
            Some(Ipv4Addr::new(192, 168, 1, 1)),
            "frontends route via the gateway's DMZ address"
        );
        let psql1 = t.node("psql1server").unwrap();
        assert_eq!(
            t.default_gateway(psql1),
            Some(Ipv4Addr::new(192, 168, 1, 9))
        );
        assert_eq!(t.default_gateway(t.node("gw1server").unwrap()), None);
        assert_eq!(t.ports, Ports::default());
        let hosts = t.hosts_file();
        assert!(hosts.contains("192.168.1.2\te1server.domain.local e1server\n"));
        assert!(hosts.contains("192.168.1.10\tpsql1server.domain.local psql1server\n"));
    }

    #[test]
    fn small_is_valid() {
        Topology::parse(SMALL).unwrap();
    }

    #[test]
    fn a_cluster_needs_an_odd_number_of_monitors_and_a_postgres_node() {
        let mut t = example();
        t.check_cluster().unwrap();
        let e = Topology::parse(SMALL).unwrap().check_cluster().unwrap_err();
        assert!(e.to_string().contains("no monitor node"), "{e}");
        let first_monitor = t
            .nodes
            .iter()
            .position(|n| n.role == Role::Monitor)
            .unwrap();
        t.nodes.remove(first_monitor);
        let e = t.check_cluster().unwrap_err().to_string();
        assert!(e.contains("2 monitor nodes: use an odd number"), "{e}");
        t.nodes.remove(
            t.nodes
                .iter()
                .position(|n| n.role == Role::Monitor)
                .unwrap(),
        );
        let e = t.check_cluster().unwrap_err().to_string();
        assert!(e.contains("1 monitor node: use 3 or 5"), "{e}");
        let mut t = example();
        t.nodes.retain(|n| n.role != Role::Postgres);
        let e = t.check_cluster().unwrap_err().to_string();
        assert!(e.contains("no PostgreSQL node"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = error_of(&SMALL.replace("cpus = 1\n        memory_mib = 1024", "cpu = 1"));
        assert!(e.contains("cpu"), "{e}");
    }

    #[test]
    fn overlapping_networks_are_named() {
        let e = error_of(&SMALL.replace("10.1.0.8/29", "10.1.0.0/28"));
        assert!(e.contains("`dmz`") && e.contains("`back`"), "{e}");
    }

    #[test]
    fn address_outside_network_is_named() {
        let e = error_of(&SMALL.replace("dmz = \"10.1.0.2\"", "dmz = \"10.1.0.10\""));
        assert!(
            e.contains("`e1`") && e.contains("10.1.0.10") && e.contains("`dmz`"),
            "{e}"
        );
    }

    #[test]
    fn broadcast_address_is_refused() {
        let e = error_of(&SMALL.replace("dmz = \"10.1.0.2\"", "dmz = \"10.1.0.7\""));
        assert!(e.contains("`e1`") && e.contains("10.1.0.7"), "{e}");
    }

    #[test]
    fn duplicate_node_name_is_named() {
        let e = error_of(&SMALL.replace("name = \"e1\"", "name = \"gw\""));
        assert!(e.contains("duplicate node name `gw`"), "{e}");
    }

    #[test]
    fn duplicate_network_name_is_named() {
        let e = error_of(&SMALL.replace("name = \"back\"", "name = \"dmz\""));
        assert!(e.contains("duplicate network name `dmz`"), "{e}");
    }

    #[test]
    fn unknown_network_is_named() {
        let e = error_of(&SMALL.replace("dmz = \"10.1.0.2\"", "dmx = \"10.1.0.2\""));
        assert!(e.contains("`e1`") && e.contains("`dmx`"), "{e}");
    }

    #[test]
    fn duplicate_address_is_named() {
        let e = error_of(&SMALL.replace("dmz = \"10.1.0.2\"", "dmz = \"10.1.0.1\""));
        assert!(
            e.contains("10.1.0.1") && e.contains("`gw`") && e.contains("`e1`"),
            "{e}"
        );
    }

    #[test]
    fn role_without_ports_is_named() {
        let text = SMALL.replace(
            "domain = \"d.local\"",
            "domain = \"d.local\"\n[ports]\nxmpp = []",
        );
        let e = error_of(&text);
        assert!(e.contains("role ejabberd") && e.contains("XMPP"), "{e}");
    }

    #[test]
    fn role_with_colliding_ports_is_named() {
        let text = SMALL.replace(
            "domain = \"d.local\"",
            "domain = \"d.local\"\n[ports]\nagent = 4205",
        );
        let e = error_of(&text);
        assert!(
            e.contains("role ejabberd") && e.contains("erlang_dist") && e.contains("agent"),
            "{e}"
        );
    }

    #[test]
    fn empty_erlang_range_is_named() {
        let text = SMALL.replace(
            "domain = \"d.local\"",
            "domain = \"d.local\"\n[ports]\nerlang_dist = { first = 4210, last = 4200 }",
        );
        let e = error_of(&text);
        assert!(
            e.contains("role ejabberd") && e.contains("4210-4200"),
            "{e}"
        );
    }

    #[test]
    fn gateway_on_one_network_is_named() {
        let e = error_of(&SMALL.replace(", back = \"10.1.0.9\"", ""));
        assert!(e.contains("gateway `gw`"), "{e}");
    }

    #[test]
    fn missing_management_network_is_reported() {
        let e = error_of(&SMALL.replace("management = true", ""));
        assert!(e.contains("no management network"), "{e}");
    }

    #[test]
    fn isolated_network_with_host_is_named() {
        let e = error_of(&SMALL.replace(
            "cidr = \"10.1.0.0/29\"\n        mode = \"isolated\"",
            "cidr = \"10.1.0.0/29\"\n        mode = \"isolated\"\n        host = \"10.1.0.6\"",
        ));
        assert!(e.contains("network `dmz`"), "{e}");
    }

    #[test]
    fn invalid_node_name_is_named() {
        let e = error_of(&SMALL.replace("name = \"e1\"", "name = \"E_1\""));
        assert!(e.contains("node name `E_1`"), "{e}");
    }

    #[test]
    fn zero_memory_is_named() {
        let e = error_of(&SMALL.replace("memory_mib = 1024", "memory_mib = 0"));
        assert!(e.contains("node `e1`") && e.contains("memory"), "{e}");
    }

    #[test]
    fn attachments_follow_network_order() {
        let t = Topology::parse(SMALL).unwrap();
        let gw = t.node("gw").unwrap();
        let names: Vec<&str> = t.attachments(gw).map(|a| a.network.name.as_str()).collect();
        assert_eq!(names, ["mgmt", "dmz", "back"]);
        assert_eq!(
            t.service_addresses(gw),
            [Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 9)]
        );
    }
}
