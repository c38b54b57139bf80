//! The netns backend: builds a stand's networks on this machine from network namespaces.
//!
//! Layout, for a stand built under prefix `P`:
//! - one namespace `P-<node>` per node, with `lo` up, one interface `eth<i>` per network the
//!   node joins (in the file's network order) with a MAC derived from its address (stable
//!   across rebuilds, so neighbours' ARP caches stay valid), its address, a default route via the gateway,
//!   IPv4 forwarding on for gateways only, and the node's generated nftables rules;
//! - one namespace `P--fabric` holding a bridge `br<k>` per network and the other end of each
//!   veth pair (`v<node>-<i>`), plus the host address of routed/nat networks on their bridge,
//!   so the fabric namespace plays the operator host. Nothing is created in the root
//!   namespace: veth pairs are created inside the fabric with their peer moved straight into
//!   the node's namespace;
//! - `/etc/netns/P-<node>/{hosts,hostname}`, which `ip netns exec` bind-mounts over `/etc`.
//!
//! Invariants: every step checks what exists and creates only what is missing (`ip ...
//! replace`, idempotent sysctls, nftables table replaced in one transaction), so `up` can be
//! repeated and resumes after a partial failure. Namespaces and `/etc/netns` directories are
//! recorded in the state file before they are created; `down` ends the processes left in them
//! (by PID, found with `ip netns pids`), then deletes them, and with them every veth and
//! bridge. The stand's processes ([`crate::lab`]) are stopped through their supervisors first.

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::firewall::node_firewall;
use crate::state::{Resource, StateError, StateFile};
use crate::topology::{Node, Role, Topology, mac_address};

/// How long `down` waits for processes to leave after SIGTERM, then after SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
const KILL_GRACE: Duration = Duration::from_secs(2);

/// Errors of the netns backend.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing or removing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// `exec` named a node the stand does not have.
    #[error("stand has no node `{0}`")]
    UnknownNode(String),
    /// The state lists a resource of another backend.
    #[error("state lists {0:?}, which the netns backend does not create")]
    Foreign(Resource),
    /// Processes in a namespace outlived SIGKILL.
    #[error("processes {pids:?} in namespace {namespace} survived SIGKILL")]
    Survivors {
        /// The namespace.
        namespace: String,
        /// Their PIDs.
        pids: Vec<i32>,
    },
}

/// Names of everything the backend creates for a stand under a prefix.
#[derive(Debug, Clone)]
pub struct Layout<'a> {
    topology: &'a Topology,
    prefix: &'a str,
}

impl<'a> Layout<'a> {
    /// The layout of `topology` under `prefix`.
    pub fn new(topology: &'a Topology, prefix: &'a str) -> Self {
        Self { topology, prefix }
    }

    /// The namespace holding the bridges (and the host addresses).
    pub fn fabric(&self) -> String {
        // Node names start with a letter, so `P--fabric` cannot be a node's namespace.
        format!("{}--fabric", self.prefix)
    }

    /// The namespace of `node`.
    pub fn namespace(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// `/etc/netns/<namespace>` of `node`.
    pub fn etc_dir(&self, node: &str) -> PathBuf {
        Path::new("/etc/netns").join(self.namespace(node))
    }

    /// The bridge of the network at `network_index`, inside the fabric namespace.
    pub fn bridge(network_index: usize) -> String {
        format!("br{network_index}")
    }

    /// The interface name of a node's `i`-th attachment, inside its namespace.
    pub fn node_interface(i: usize) -> String {
        format!("eth{i}")
    }

    /// The fabric end of the veth of `node_index`'s `i`-th attachment.
    pub fn fabric_interface(node_index: usize, i: usize) -> String {
        format!("v{node_index}-{i}")
    }

    /// Human-readable list of what `up` creates, for `plan`.
    pub fn describe(&self) -> String {
        let t = self.topology;
        let mut out = format!("namespace {} (bridges)\n", self.fabric());
        for (k, net) in t.networks.iter().enumerate() {
            out.push_str(&format!(
                "  bridge {} for network {} ({})",
                Self::bridge(k),
                net.name,
                net.cidr
            ));
            if let Some(host) = net.host {
                out.push_str(&format!(", host address {host}"));
            }
            out.push('\n');
        }
        for (n, node) in t.nodes.iter().enumerate() {
            out.push_str(&format!(
                "namespace {} ({})\n",
                self.namespace(&node.name),
                node.role
            ));
            for (i, a) in t.attachments(node).enumerate() {
                out.push_str(&format!(
                    "  {} {}/{} on {} (veth peer {} on {})\n",
                    Self::node_interface(i),
                    a.address,
                    a.network.cidr.prefix(),
                    a.network.name,
                    Self::fabric_interface(n, i),
                    Self::bridge(a.network_index)
                ));
            }
            if let Some(gw) = t.default_gateway(node) {
                out.push_str(&format!("  default via {gw}\n"));
            }
            if node.role == Role::Gateway {
                out.push_str("  ip_forward=1\n");
            }
        }
        out
    }
}

/// Builds (or completes) the stand described by `topology` under the state's prefix.
pub fn up(topology: &Topology, state: &mut StateFile) -> Result<(), NetnsError> {
    let prefix = state.state().prefix.clone();
    let layout = Layout::new(topology, &prefix);
    let fabric = layout.fabric();
    ensure_namespace(state, &fabric)?;
    ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
    for (k, net) in topology.networks.iter().enumerate() {
        let bridge = Layout::bridge(k);
        if !link_exists(&fabric, &bridge)? {
            info!(namespace = %fabric, bridge = %bridge, network = %net.name, "creating bridge");
            ip(&["-n", &fabric, "link", "add", &bridge, "type", "bridge"])?;
        }
        ip(&["-n", &fabric, "link", "set", &bridge, "up"])?;
        if let Some(host) = net.host {
            let addr = format!("{host}/{}", net.cidr.prefix());
            ip(&["-n", &fabric, "addr", "replace", &addr, "dev", &bridge])?;
        }
    }
    let hosts = topology.hosts_file();
    for (n, node) in topology.nodes.iter().enumerate() {
        up_node(topology, &layout, state, n, node, &hosts)?;
    }
    info!(stand = %topology.name, prefix = %prefix, "netns stand is up");
    Ok(())
}

fn up_node(
    topology: &Topology,
    layout: &Layout<'_>,
    state: &mut StateFile,
    node_index: usize,
    node: &Node,
    hosts: &str,
) -> Result<(), NetnsError> {
    let ns = layout.namespace(&node.name);
    let fabric = layout.fabric();
    let etc = layout.etc_dir(&node.name);
    state.record(Resource::EtcNetns { path: etc.clone() })?;
    write_file(&etc.join("hosts"), hosts)?;
    write_file(&etc.join("hostname"), &format!("{}\n", node.name))?;
    ensure_namespace(state, &ns)?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    let forward = if node.role == Role::Gateway { "1" } else { "0" };
    run(in_namespace(
        &ns,
        "sysctl",
        ["-q", "-w", &format!("net.ipv4.ip_forward={forward}")],
    ))?;
    for (i, a) in topology.attachments(node).enumerate() {
        let inner = Layout::node_interface(i);
        let outer = Layout::fabric_interface(node_index, i);
        if !link_exists(&fabric, &outer)? {
            // An inner interface of that name without its fabric peer (made by hand) would
            // make the creation fail; a veth pair never loses one end alone.
            if link_exists(&ns, &inner)? {
                ip(&["-n", &ns, "link", "del", &inner])?;
            }
            info!(node = %node.name, interface = %inner, network = %a.network.name, "creating veth");
            ip(&[
                "-n",
                &fabric,
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "address",
                &mac_address(a.address),
                "netns",
                &ns,
            ])?;
        }
        ip(&[
            "-n",
            &fabric,
            "link",
            "set",
            &outer,
            "master",
            &Layout::bridge(a.network_index),
            "up",
        ])?;
        let addr = format!("{}/{}", a.address, a.network.cidr.prefix());
        ip(&["-n", &ns, "addr", "replace", &addr, "dev", &inner])?;
        ip(&["-n", &ns, "link", "set", &inner, "up"])?;
    }
    if let Some(gw) = topology.default_gateway(node) {
        ip(&[
            "-n",
            &ns,
            "route",
            "replace",
            "default",
            "via",
            &gw.to_string(),
        ])?;
    }
    let rules = node_firewall(topology, node).to_nft();
    let mut nft = in_namespace(&ns, "nft", ["-f", "-"]);
    run_with_stdin(&mut nft, &rules)?;
    info!(node = %node.name, namespace = %ns, role = %node.role, "node network ready");
    Ok(())
}

/// Stops the node supervisors ([`crate::lab`]), then removes everything the state lists,
/// newest first, generated files last (a process that outlived its supervisor may still use
/// them until its namespace is emptied), then the state file.
pub fn down(mut state: StateFile) -> Result<(), NetnsError> {
    crate::lab::stop_supervisors(&state.topology()?, state.dir());
    let mut created: Vec<Resource> = state.state().created.iter().rev().cloned().collect();
    created.sort_by_key(|r| matches!(r, Resource::Files { .. }));
    for resource in created {
        match &resource {
            Resource::Files { path } => match crate::state::remove_files(path) {
                Ok(true) => info!(path = %path.display(), "removed"),
                Ok(false) => {}
                Err(source) => {
                    return Err(NetnsError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            },
            Resource::Namespace { name } => {
                if namespace_exists(name) {
                    end_processes(name)?;
                    info!(namespace = %name, "deleting namespace");
                    ip(&["netns", "del", name])?;
                } else {
                    debug!(namespace = %name, "already gone");
                }
            }
            Resource::EtcNetns { path } => match fs::remove_dir_all(path) {
                Ok(()) => info!(path = %path.display(), "removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(NetnsError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            },
            other => return Err(NetnsError::Foreign(other.clone())),
        }
        state.forget(&resource)?;
    }
    state.remove()?;
    Ok(())
}

/// A node's namespace and whether it exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceStatus {
    /// The node.
    pub node: String,
    /// Its namespace.
    pub namespace: String,
    /// Whether the namespace exists.
    pub present: bool,
}

/// The namespace of every node of the stand.
pub fn status(topology: &Topology, prefix: &str) -> Vec<NamespaceStatus> {
    let layout = Layout::new(topology, prefix);
    topology
        .nodes
        .iter()
        .map(|n| {
            let namespace = layout.namespace(&n.name);
            NamespaceStatus {
                node: n.name.clone(),
                present: namespace_exists(&namespace),
                namespace,
            }
        })
        .collect()
}

/// A command that runs `argv` inside `node`'s namespace (with its hosts and hostname files, and
/// its host name: [`as_node`]).
pub fn exec_command<S: AsRef<OsStr>>(
    topology: &Topology,
    prefix: &str,
    node: &str,
    argv: &[S],
) -> Result<Command, NetnsError> {
    let node = topology
        .node(node)
        .ok_or_else(|| NetnsError::UnknownNode(node.to_owned()))?;
    let ns = Layout::new(topology, prefix).namespace(&node.name);
    let mut cmd = as_node(&ns, &node.name);
    cmd.args(argv);
    Ok(cmd)
}

/// `ip netns exec NS` with the node's own host name: a UTS namespace of its own whose
/// hostname is `node`, which the node's hosts file resolves to its service address. Without
/// it every process sees the machine's host name, which no hosts file of the stand knows, and
/// a program that resolves its own name (`erl_call` does) waits for DNS servers the namespace
/// cannot reach. The program is exec'd in place (`unshare` without `--fork`, then `sh -c
/// 'exec'`): the spawned child's PID is the program's. Append the program and its arguments.
pub fn as_node(namespace: &str, node: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", namespace, "unshare", "--uts", "--"])
        .args(["sh", "-c", "hostname \"$0\" && exec \"$@\"", node]);
    cmd
}

/// Whether the named namespace exists (`ip netns add` creates `/run/netns/<name>`).
pub fn namespace_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn ensure_namespace(state: &mut StateFile, name: &str) -> Result<(), NetnsError> {
    state.record(Resource::Namespace {
        name: name.to_owned(),
    })?;
    if !namespace_exists(name) {
        info!(namespace = %name, "creating namespace");
        ip(&["netns", "add", name])?;
    }
    Ok(())
}

/// The PIDs of processes whose network namespace is `name`.
fn namespace_pids(name: &str) -> Result<Vec<i32>, NetnsError> {
    let out = ip(&["netns", "pids", name])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Ends the processes inside a namespace the stand owns: SIGTERM, wait, SIGKILL, wait.
fn end_processes(name: &str) -> Result<(), NetnsError> {
    for (signal, grace) in [(Signal::SIGTERM, TERM_GRACE), (Signal::SIGKILL, KILL_GRACE)] {
        let pids = namespace_pids(name)?;
        if pids.is_empty() {
            return Ok(());
        }
        for &pid in &pids {
            warn!(namespace = %name, pid, signal = ?signal, "ending process left in namespace");
            // ESRCH only means it already exited.
            let _ = kill(Pid::from_raw(pid), signal);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if namespace_pids(name)?.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let pids = namespace_pids(name)?;
    if pids.is_empty() {
        Ok(())
    } else {
        Err(NetnsError::Survivors {
            namespace: name.to_owned(),
            pids,
        })
    }
}

fn link_exists(ns: &str, link: &str) -> Result<bool, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns, "link", "show", "dev", link]);
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        command: describe(&cmd),
        source,
    })?;
    Ok(out.status.success())
}

fn in_namespace<I, S>(ns: &str, program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]).args(args);
    cmd
}

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd)
}

fn run(mut cmd: Command) -> Result<String, NetnsError> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().map_err(|source| NetnsError::Spawn {
        command: describe(&cmd),
        source,
    })?;
    check(&cmd, out)
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<String, NetnsError> {
    let spawn_err = |cmd: &Command, source| NetnsError::Spawn {
        command: describe(cmd),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_err(cmd, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| spawn_err(cmd, e))?;
    }
    let out = child.wait_with_output().map_err(|e| spawn_err(cmd, e))?;
    check(cmd, out)
}

fn check(cmd: &Command, out: std::process::Output) -> Result<String, NetnsError> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Command {
            command: describe(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_file(path: &Path, content: &str) -> Result<(), NetnsError> {
    let io = |source| NetnsError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io)?;
    }
    fs::write(path, content).map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::tests::example;

    #[test]
    fn layout_names_fit_linux_limits() {
        let t = example();
        let layout = Layout::new(&t, "xmpp-lab");
        assert_eq!(layout.namespace("e1server"), "xmpp-lab-e1server");
        assert_eq!(layout.fabric(), "xmpp-lab--fabric");
        // Interface names must stay below IFNAMSIZ (16 with the NUL).
        assert!(Layout::fabric_interface(999, 99).len() < 16);
        let plan = layout.describe();
        assert!(plan.contains("eth1 192.168.1.2/29 on dmz"), "{plan}");
        assert!(plan.contains("default via 192.168.1.1"), "{plan}");
    }
}
