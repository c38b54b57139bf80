//! Per-node firewall rules generated from the topology's roles and ports, and their nftables
//! form.
//!
//! Invariants: input and forward are default drop, output is open; loopback, established and
//! related traffic and ICMP echo are accepted; every other accepted packet matches one
//! [`Rule`], whose sources are either whole networks (management access, XMPP clients from the
//! frontends' networks), the service addresses of named peer nodes, or this machine's address
//! on a service network (the operator host of a libvirt lab, where `haclt drill` writes to
//! PostgreSQL from), never a management address, so nothing but the management ports is reachable from the management network
//! except the monitor API for operators. The generated script replaces the whole table in one
//! `nft -f` transaction, so loading it twice gives the same ruleset.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::cidr::Ipv4Cidr;
use crate::topology::{Node, PortRange, Role, Topology};

/// The nftables table (family `inet`) that holds every rule ha-provision loads.
pub const TABLE: &str = "ha_provision";

/// One accepted TCP flow: from any of `sources` to any of `ports` on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allowed source networks or hosts (`/32`).
    pub sources: Vec<Ipv4Cidr>,
    /// Allowed destination ports.
    pub ports: Vec<PortRange>,
    /// Why the flow is allowed; becomes the nftables comment.
    pub reason: String,
}

/// The generated firewall of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFirewall {
    /// The node.
    pub node: String,
    /// Accepted inbound TCP flows (everything else inbound is dropped).
    pub input: Vec<Rule>,
    /// Networks a gateway forwards between (any source to any destination among them);
    /// empty for every other role, whose forward chain drops everything.
    pub forward_between: Vec<Ipv4Cidr>,
}

impl NodeFirewall {
    /// Whether a new TCP connection from `source` to `port` on this node is accepted.
    pub fn allows_tcp(&self, source: Ipv4Addr, port: u16) -> bool {
        self.input.iter().any(|rule| {
            rule.sources.iter().any(|s| s.contains(source))
                && rule.ports.iter().any(|p| p.contains(port))
        })
    }

    /// Whether this node forwards a new flow from `source` to `destination`.
    pub fn forwards(&self, source: Ipv4Addr, destination: Ipv4Addr) -> bool {
        self.forward_between.iter().any(|n| n.contains(source))
            && self.forward_between.iter().any(|n| n.contains(destination))
    }

    /// The nftables script: creates (or atomically replaces) table `inet ha_provision`.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        // `add` then `delete` makes the delete valid whether or not the table exists; the
        // whole file is one transaction, so there is no window without rules.
        let _ = writeln!(out, "add table inet {TABLE}");
        let _ = writeln!(out, "delete table inet {TABLE}");
        let _ = writeln!(out, "table inet {TABLE} {{");
        let _ = writeln!(out, "\tchain input {{");
        let _ = writeln!(
            out,
            "\t\ttype filter hook input priority filter; policy drop;"
        );
        let _ = writeln!(out, "\t\tiif \"lo\" accept");
        let _ = writeln!(out, "\t\tct state established,related accept");
        let _ = writeln!(out, "\t\tct state invalid drop");
        let _ = writeln!(out, "\t\ticmp type echo-request accept");
        for rule in &self.input {
            let _ = writeln!(
                out,
                "\t\tip saddr {{ {} }} tcp dport {{ {} }} accept comment \"{}\"",
                join(&rule.sources),
                join(&rule.ports),
                rule.reason
            );
        }
        let _ = writeln!(out, "\t}}");
        let _ = writeln!(out, "\tchain forward {{");
        let _ = writeln!(
            out,
            "\t\ttype filter hook forward priority filter; policy drop;"
        );
        if !self.forward_between.is_empty() {
            let nets = join(&self.forward_between);
            let _ = writeln!(out, "\t\tct state established,related accept");
            let _ = writeln!(
                out,
                "\t\tip saddr {{ {nets} }} ip daddr {{ {nets} }} accept comment \"route between service networks\""
            );
        }
        let _ = writeln!(out, "\t}}");
        let _ = writeln!(out, "\tchain output {{");
        let _ = writeln!(
            out,
            "\t\ttype filter hook output priority filter; policy accept;"
        );
        let _ = writeln!(out, "\t}}");
        let _ = writeln!(out, "}}");
        out
    }
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The service addresses of every node with one of `roles`, except `except`, as `/32`s.
fn peers(topology: &Topology, roles: &[Role], except: &Node) -> Vec<Ipv4Cidr> {
    topology
        .nodes
        .iter()
        .filter(|n| roles.contains(&n.role) && n.name != except.name)
        .flat_map(|n| topology.service_addresses(n))
        .map(Ipv4Cidr::host)
        .collect()
}

/// Generates the firewall of `node` from its role and the topology's ports.
pub fn node_firewall(topology: &Topology, node: &Node) -> NodeFirewall {
    let ports = &topology.ports;
    let single = |p: u16| vec![PortRange::single(p)];
    let mut input = Vec::new();
    let mut push = |sources: Vec<Ipv4Cidr>, ports: Vec<PortRange>, reason: &str| {
        // A rule with no source (a lone frontend has no ejabberd peer) accepts nothing, and
        // nftables refuses an empty anonymous set.
        if !sources.is_empty() && !ports.is_empty() {
            input.push(Rule {
                sources,
                ports,
                reason: reason.to_owned(),
            });
        }
    };
    let management: Vec<Ipv4Cidr> = topology
        .management_network()
        .map(|n| n.cidr)
        .into_iter()
        .collect();
    push(
        management.clone(),
        ports
            .management
            .iter()
            .map(|&p| PortRange::single(p))
            .collect(),
        "management access from the management network",
    );
    let monitors = peers(topology, &[Role::Monitor], node);
    match node.role {
        Role::Monitor => {
            // One gRPC port serves agents, operators and the other monitors (Raft).
            let mut api_sources = peers(
                topology,
                &[Role::Ejabberd, Role::Postgres, Role::Monitor],
                node,
            );
            api_sources.extend(management.iter().copied());
            push(
                api_sources,
                single(ports.monitor_api),
                "monitor API for agents, operators and monitor peers",
            );
        }
        Role::Postgres => {
            push(
                peers(topology, &[Role::Ejabberd], node),
                single(ports.postgres),
                "PostgreSQL for the ejabberd frontends",
            );
            push(
                peers(topology, &[Role::Postgres], node),
                single(ports.postgres),
                "PostgreSQL replication between peers",
            );
            // The monitor leader probes every PostgreSQL node itself.
            push(
                monitors.clone(),
                single(ports.postgres),
                "PostgreSQL health probe from the monitors",
            );
            push(monitors, single(ports.agent), "agent API for the monitors");
            push(
                peers(topology, &[Role::Postgres], node),
                single(ports.agent),
                "agent port for the PostgreSQL peers (failsafe vouches)",
            );
            push(
                topology.operator_hosts(node).map(Ipv4Cidr::host).collect(),
                single(ports.postgres),
                "PostgreSQL for the operator host's drill writer",
            );
            push(
                topology
                    .gateway_neighbours(node)
                    .map(Ipv4Cidr::host)
                    .collect(),
                vec![
                    PortRange::single(ports.postgres),
                    PortRange::single(ports.agent),
                ],
                "PostgreSQL and its /primary check for the gateway's HAProxy",
            );
        }
        Role::Ejabberd => {
            let client_networks: Vec<Ipv4Cidr> = topology
                .service_attachments(node)
                .map(|a| a.network.cidr)
                .collect();
            let mut client_ports: Vec<PortRange> =
                ports.xmpp.iter().map(|&p| PortRange::single(p)).collect();
            client_ports.push(PortRange::single(ports.mqtt));
            push(
                client_networks,
                client_ports,
                "XMPP and MQTT from the frontend networks",
            );
            push(
                peers(topology, &[Role::Ejabberd], node),
                vec![PortRange::single(ports.epmd), ports.erlang_dist],
                "epmd and Erlang distribution between ejabberd peers",
            );
            push(monitors, single(ports.agent), "agent API for the monitors");
        }
        Role::Gateway => {
            let mut clients: Vec<Ipv4Cidr> = topology
                .service_attachments(node)
                .map(|a| a.network.cidr)
                .collect();
            clients.extend(topology.operator_hosts(node).map(Ipv4Cidr::host));
            push(
                clients,
                single(ports.proxy),
                "HAProxy (PostgreSQL to the primary) for the service networks",
            );
        }
    }
    let forward_between = if node.role == Role::Gateway {
        topology
            .service_attachments(node)
            .map(|a| a.network.cidr)
            .collect()
    } else {
        Vec::new()
    };
    NodeFirewall {
        node: node.name.clone(),
        input,
        forward_between,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::tests::example;

    fn fw(name: &str) -> (Topology, NodeFirewall) {
        let t = example();
        let f = node_firewall(&t, t.node(name).unwrap());
        (t, f)
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ejabberd_allows_xmpp_from_the_dmz_only() {
        let (_, f) = fw("e1server");
        for port in [5222, 5223, 5269, 5443, 5280, 1883] {
            assert!(
                f.allows_tcp(ip("192.168.1.3"), port),
                "port {port} from the DMZ"
            );
            assert!(
                f.allows_tcp(ip("192.168.1.5"), port),
                "any DMZ host, port {port}"
            );
            assert!(
                !f.allows_tcp(ip("192.168.1.10"), port),
                "not from the backend"
            );
            assert!(
                !f.allows_tcp(ip("192.168.121.1"), port),
                "not from management"
            );
        }
    }

    #[test]
    fn erlang_ports_only_between_ejabberd_peers() {
        let (_, f) = fw("e1server");
        for port in [4369, 4200, 4205, 4210] {
            assert!(
                f.allows_tcp(ip("192.168.1.3"), port),
                "e2server, port {port}"
            );
            assert!(
                !f.allows_tcp(ip("192.168.1.5"), port),
                "other DMZ host, port {port}"
            );
            assert!(
                !f.allows_tcp(ip("192.168.1.1"), port),
                "gateway, port {port}"
            );
        }
        assert!(!f.allows_tcp(ip("192.168.1.3"), 4211));
    }

    #[test]
    fn postgres_only_from_frontends_peers_and_monitor_probes() {
        let (t, f) = fw("psql1server");
        // The frontends, the peer, and the gateway's HAProxy on the backend network.
        let allowed: Vec<Ipv4Addr> = ["192.168.1.2", "192.168.1.3", "192.168.1.11", "192.168.1.9"]
            .iter()
            .map(|s| ip(s))
            .chain(
                t.nodes_with_role(Role::Monitor)
                    .flat_map(|m| t.service_addresses(m)),
            )
            .collect();
        for a in &allowed {
            assert!(f.allows_tcp(*a, 5432), "{a} must reach 5432");
        }
        // Everything else is refused: every other address of the stand, including each
        // allowed node's management address, the gateway and the host.
        let mut others: Vec<Ipv4Addr> = t
            .nodes
            .iter()
            .flat_map(|n| n.addresses.values().copied())
            .filter(|a| !allowed.contains(a))
            .collect();
        others.push(ip("192.168.121.1"));
        assert!(others.len() > 10);
        for a in others {
            assert!(!f.allows_tcp(a, 5432), "{a} must not reach 5432");
        }
    }

    #[test]
    fn monitor_ports() {
        let (_, f) = fw("mon1server");
        // API: agents (frontends, databases) and operators on the management network.
        for a in [
            "192.168.1.2",
            "192.168.1.10",
            "192.168.121.1",
            "192.168.121.200",
        ] {
            assert!(f.allows_tcp(ip(a), 7400), "{a} -> 7400");
        }
        assert!(
            !f.allows_tcp(ip("192.168.1.1"), 7400),
            "the gateway runs no agent"
        );
        // Raft: the other monitors only.
        assert!(f.allows_tcp(ip("192.168.1.19"), 7400), "monitor peer");
        assert!(f.allows_tcp(ip("192.168.1.20"), 7400), "monitor peer");
        assert!(!f.allows_tcp(ip("192.168.1.18"), 7400), "not itself");
        assert!(!f.allows_tcp(ip("192.168.1.19"), 7401), "no second port");
        // Agents accept the monitors only.
        let (_, e1) = fw("e1server");
        assert!(e1.allows_tcp(ip("192.168.1.18"), 7410));
        assert!(!e1.allows_tcp(ip("192.168.1.3"), 7410));
    }

    #[test]
    fn default_drop_and_management_access() {
        for name in ["gw1server", "e1server", "psql1server", "mon1server"] {
            let (_, f) = fw(name);
            let nft = f.to_nft();
            assert!(
                nft.contains("hook input priority filter; policy drop;"),
                "{name}"
            );
            assert!(
                nft.contains("hook forward priority filter; policy drop;"),
                "{name}"
            );
            assert!(
                f.allows_tcp(ip("192.168.121.1"), 22),
                "{name}: ssh from management"
            );
            assert!(
                !f.allows_tcp(ip("192.168.1.2"), 22),
                "{name}: no ssh from the DMZ"
            );
            assert!(
                !f.allows_tcp(ip("192.168.121.1"), 9999),
                "{name}: unknown port"
            );
        }
    }

    #[test]
    fn only_the_gateway_forwards_and_never_for_management() {
        let (_, gw) = fw("gw1server");
        assert!(gw.forwards(ip("192.168.1.2"), ip("192.168.1.10")));
        assert!(gw.forwards(ip("192.168.1.10"), ip("192.168.1.18")));
        assert!(!gw.forwards(ip("192.168.121.1"), ip("192.168.1.10")));
        assert!(gw.to_nft().contains("route between service networks"));
        let (_, e1) = fw("e1server");
        assert!(!e1.forwards(ip("192.168.1.2"), ip("192.168.1.10")));
    }

    #[test]
    fn the_gateways_haproxy_reaches_postgres_and_serves_the_service_networks() {
        let (_, gw) = fw("gw1server");
        assert!(gw.allows_tcp(ip("192.168.1.2"), 5000), "a frontend");
        assert!(gw.allows_tcp(ip("192.168.1.5"), 5000), "any DMZ host");
        assert!(
            !gw.allows_tcp(ip("192.168.121.1"), 5000),
            "not from management"
        );
        assert!(!gw.allows_tcp(ip("192.168.1.2"), 5432), "no other port");
        let (_, pg) = fw("psql1server");
        for port in [5432, 7410] {
            assert!(
                pg.allows_tcp(ip("192.168.1.9"), port),
                "gateway, port {port}"
            );
        }
        assert!(!pg.allows_tcp(ip("192.168.1.9"), 7400));
    }

    #[test]
    fn nft_script_names_the_rules() {
        let (_, f) = fw("psql1server");
        let nft = f.to_nft();
        assert!(nft.starts_with("add table inet ha_provision\ndelete table inet ha_provision\n"));
        assert!(nft.contains(
            "ip saddr { 192.168.1.2/32, 192.168.1.3/32 } tcp dport { 5432 } accept comment \"PostgreSQL for the ejabberd frontends\""
        ), "{nft}");
    }
}
