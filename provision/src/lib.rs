//! `ha-provision`: builds the stand described by one topology file.
//!
//! A TOML topology ([`topology`]) is validated before anything is touched; the firewall of
//! every node is generated from its role ([`firewall`]); a backend builds it, either network
//! namespaces on this machine ([`netns`]) or libvirt networks and domains ([`libvirt`]); a
//! state file ([`state`]) lists every created resource so `down` removes exactly those.
//! Real libvirt guests boot from one shared base image ([`image`]) with a per-guest seed disk
//! and are reached over SSH with pinned host keys ([`ssh`], [`bootstrap`]).
//! [`lab`] then starts the stand's processes, the same sequence on both backends:
//! [`material`] writes the CA, certificates and daemon configs; on the netns backend one
//! [`supervise`] process per node runs and restarts the node's daemons inside its namespace,
//! on libvirt guests ([`guests`]) the Debian packages are installed, the files placed and the
//! packaged systemd units started over SSH.
//! [`cli`] is the command line; the binary only parses arguments and starts tracing.

pub mod bootstrap;
pub mod cidr;
pub mod cli;
pub mod daemons;
pub mod firewall;
pub mod guests;
pub mod image;
pub mod lab;
pub mod libvirt;
pub mod material;
pub mod netns;
pub mod ssh;
pub mod state;
pub mod supervise;
pub mod topology;

pub use cidr::Ipv4Cidr;
pub use state::{BackendKind, StateFile};
pub use topology::{Role, Topology, TopologyError};
