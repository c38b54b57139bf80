//! Command line of `ha-provision`: `plan`, `up`, `down`, `status`, `exec`, `supervise` and
//! `image build`.
//!
//! Invariants: the topology file is parsed and validated before anything is created; `up`
//! records the file's text in the state directory, so `down`, `status` and `exec` work from
//! the state alone and always act on what was actually built, with the backend that built it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tracing::info;

use crate::bootstrap::{self, Guests};
use crate::daemons::{self, DaemonState};
use crate::firewall::node_firewall;
use crate::guests::{self, GuestFleet};
use crate::image::{BaseImage, ImageRecipe};
use crate::lab;
use crate::libvirt::{self, LibvirtBackend};
use crate::material::{Material, Placement};
use crate::netns::{self, Layout};
use crate::ssh::shell_quote;
use crate::state::{BackendKind, StateFile};
use crate::supervise;
use crate::topology::{Topology, valid_name};

/// Root of the default state directories (`/run/ha-provision/<stand>`).
const STATE_ROOT: &str = "/run/ha-provision";

/// Exit status for an invalid topology file (EX_DATAERR-style "bad input" of sysexits).
pub const EXIT_INVALID_TOPOLOGY: u8 = 64;
/// Exit status of `status` when a node or one of its daemons does not run (as `systemctl
/// is-active` does for a unit that is not active).
pub const EXIT_NOT_RUNNING: u8 = 3;

/// Builds the stand described by a topology file.
#[derive(Debug, Parser)]
#[command(name = "ha-provision", version, about)]
pub struct Cli {
    /// State directory (default: /run/ha-provision/<stand>).
    #[arg(long, global = true, env = "HA_PROVISION_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Backend: `up` and `plan` use it (default netns); other commands use the backend
    /// recorded in the state and refuse a different one.
    #[arg(long, global = true, value_enum)]
    pub backend: Option<BackendKind>,
    #[command(flatten)]
    pub log: ha_log::LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what `up` would create: namespaces or libvirt XML, routes and firewall rules.
    Plan {
        /// Topology file.
        file: PathBuf,
        /// Prefix of every created name (default: the stand name).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Build the stand, or complete a partly built one.
    Up {
        /// Topology file.
        file: PathBuf,
        /// Prefix of every created name (default: the stand name).
        #[arg(long)]
        prefix: Option<String>,
        /// libvirt connection URI (overrides the file's `libvirt.uri`).
        #[arg(long)]
        libvirt_uri: Option<String>,
        /// libvirt: boot real guests from this base image directory (`image build --out`),
        /// wait for their SSH with the pinned host keys, install the packages (`--packages`)
        /// and bring the whole stand up under systemd, as the netns backend does under its
        /// supervisors. Without it, only networks and empty domains are defined.
        #[arg(long)]
        image: Option<PathBuf>,
        /// libvirt: directory of the `.deb` files to install (`scripts/build-debs.sh`;
        /// default: `debian/` beside the bin dir, i.e. `target/debian`).
        #[arg(long, requires = "image")]
        packages: Option<PathBuf>,
        /// libvirt: files to push over SSH, `roles/<role>/` and `nodes/<node>/` trees
        /// mirrored onto each guest's `/`; pushed `etc/systemd/system/*.service` units are
        /// enabled and started. Needs `--image`.
        #[arg(long, requires = "image")]
        files: Option<PathBuf>,
        /// libvirt: how long to wait for every guest's SSH, in seconds.
        #[arg(long, default_value_t = 600)]
        ssh_timeout: u64,
        /// Directory of `ha-monitor`, `ha-agent` and `haclt` (default: the directory of this
        /// `ha-provision`). netns: the daemons run from it; libvirt: `haclt` runs from it on
        /// this machine, as the operator.
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Remove everything `up` created.
    Down {
        /// Stand name, to find its default state directory.
        #[arg(long)]
        stand: Option<String>,
    },
    /// Show what exists and what runs: every node, and every daemon as `/proc` shows it now
    /// (netns) or as systemd on the guest reports its unit (libvirt, over SSH). Exits 3 when
    /// a node or one of its daemons does not run.
    Status {
        /// Stand name, to find its default state directory.
        #[arg(long)]
        stand: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Guest base image of the libvirt backend.
    Image {
        /// What to do with it.
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Run a node's processes inside its namespace and restart them when they die (started
    /// by `up` with `ip netns exec`; netns backend).
    Supervise {
        /// Directory of `ha-monitor` and `ha-agent`.
        #[arg(long)]
        bin_dir: PathBuf,
        /// Node name.
        node: String,
    },
    /// Run a command on a node and exit with its status: netns, in the node's namespace (it
    /// replaces `ha-provision`: same PID and signals); libvirt, as root over SSH with the
    /// pinned host key (standard input is passed on when it is not a terminal).
    Exec {
        /// Stand name, to find its default state directory.
        #[arg(long)]
        stand: Option<String>,
        /// Node name.
        node: String,
        /// Command and arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

/// `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// Build the shared base image (debootstrap; needs root, debootstrap, qemu-img).
    Build {
        /// Output directory: base.qcow2, vmlinuz, initrd.img, recipe.sh.
        #[arg(long)]
        out: PathBuf,
        /// Debian archive to install from (the build's only network source).
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Root filesystem size in GiB (sparse).
        #[arg(long, default_value_t = 4)]
        size_gib: u32,
    },
}

/// `status --json` output.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// Stand name.
    pub stand: String,
    /// Backend that built it.
    pub backend: BackendKind,
    /// Name prefix.
    pub prefix: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Path of the operator config for `haclt` in the state directory.
    pub haclt_config: PathBuf,
    /// One entry per node.
    pub nodes: Vec<NodeReport>,
}

/// One node in [`StatusReport`].
#[derive(Debug, Serialize)]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// Namespace or libvirt domain name.
    pub target: String,
    /// Whether the namespace or domain exists.
    pub present: bool,
    /// Whether it serves: a libvirt domain is active; a netns node's namespace exists and
    /// every daemon of it runs (a gateway's: HAProxy).
    pub running: bool,
    /// netns: the node's supervisor, its programs and (PostgreSQL nodes) the postmaster, each
    /// as `/proc` shows it now. Empty on libvirt (not checked over SSH yet).
    pub daemons: Vec<daemons::DaemonReport>,
    /// Addresses by network.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// netns: PID of the node's running supervisor (none when stopped).
    pub supervisor_pid: Option<i32>,
}

/// Why a topology file could not be used: the caller exits with [`EXIT_INVALID_TOPOLOGY`].
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InvalidTopology {
    path: PathBuf,
    message: String,
}

/// The topology file of `plan` and `up`: valid, and a cluster ([`Topology::check_cluster`]).
fn load_topology(path: &Path) -> anyhow::Result<(String, Topology)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading {}", path.display()))?;
    let parsed = Topology::parse(&text).and_then(|t| t.check_cluster().map(|()| t));
    let topology = parsed.map_err(|e| InvalidTopology {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((text, topology))
}

fn prefix_for(topology: &Topology, prefix: Option<String>) -> anyhow::Result<String> {
    let prefix = prefix.unwrap_or_else(|| topology.name.clone());
    if !valid_name(&prefix) {
        bail!(
            "prefix `{prefix}` is invalid: use 1 to 32 of a-z, 0-9 and '-', starting with a letter"
        );
    }
    Ok(prefix)
}

/// The state directory of a command that acts on an existing stand.
fn existing_state_dir(explicit: Option<PathBuf>, stand: Option<&str>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit {
        return Ok(dir);
    }
    if let Some(stand) = stand {
        return Ok(StateFile::default_dir(stand));
    }
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(STATE_ROOT) {
        for entry in entries.flatten() {
            if entry.path().join("state.json").exists() {
                found.push(entry.path());
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no stand found under {STATE_ROOT}: pass --stand or --state-dir"),
        _ => bail!(
            "several stands under {STATE_ROOT} ({}): pass --stand or --state-dir",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn load_state(dir: &Path, backend: Option<BackendKind>) -> anyhow::Result<StateFile> {
    let state = StateFile::load(dir)?.with_context(|| {
        format!(
            "no stand state in {}: run `ha-provision up FILE`",
            dir.display()
        )
    })?;
    if let Some(wanted) = backend
        && wanted != state.state().backend
    {
        bail!(
            "stand in {} was built with the {} backend, not {wanted}",
            dir.display(),
            state.state().backend
        );
    }
    Ok(state)
}

/// Runs the command and returns the process exit status.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Plan { file, prefix } => {
            let (_, topology) = load_topology(&file)?;
            let prefix = prefix_for(&topology, prefix)?;
            print!(
                "{}",
                plan(
                    &topology,
                    &prefix,
                    cli.backend.unwrap_or(BackendKind::Netns)
                )
            );
            Ok(0)
        }
        Command::Up {
            file,
            prefix,
            libvirt_uri,
            image,
            packages,
            files,
            ssh_timeout,
            bin_dir,
        } => {
            let (text, topology) = load_topology(&file)?;
            let prefix = prefix_for(&topology, prefix)?;
            let backend = cli.backend.unwrap_or(BackendKind::Netns);
            let dir = cli
                .state_dir
                .unwrap_or_else(|| StateFile::default_dir(&topology.name));
            info!(stand = %topology.name, backend = %backend, prefix = %prefix, state_dir = %dir.display(), "up");
            match backend {
                BackendKind::Netns => {
                    if image.is_some() {
                        bail!(
                            "--image and --files are for the libvirt backend (--backend libvirt)"
                        );
                    }
                    let bins = lab::Binaries::locate(bin_dir)?;
                    let mut state =
                        StateFile::open_for_up(&dir, &text, &topology, backend, &prefix, None)?;
                    let started = Instant::now();
                    netns::up(&topology, &mut state)?;
                    let mut steps = vec![lab::Step {
                        what: "networks (namespaces, bridges, firewall)".into(),
                        took: started.elapsed(),
                    }];
                    let material = Material::new(&topology, &dir);
                    let mut fleet = lab::Supervisors::new(&topology, &prefix, &dir, &bins);
                    steps.extend(lab::up(&topology, &mut state, &material, &mut fleet)?);
                    print_steps(&steps, started);
                }
                BackendKind::Libvirt => {
                    let uri = libvirt_uri.unwrap_or_else(|| topology.libvirt.uri.clone());
                    // Everything the guests will need is checked before the first one boots (and before
                    // anything is created).
                    let options = match image {
                        Some(_) => Some(GuestOptions::resolve(
                            &topology,
                            bin_dir,
                            packages,
                            files,
                            Duration::from_secs(ssh_timeout),
                        )?),
                        None => None,
                    };
                    let mut state = StateFile::open_for_up(
                        &dir,
                        &text,
                        &topology,
                        backend,
                        &prefix,
                        Some(uri.clone()),
                    )?;
                    let guests = match &image {
                        Some(image) => Some(bootstrap::prepare(
                            &topology,
                            &dir,
                            &BaseImage::open(image)?,
                        )?),
                        None => None,
                    };
                    let media = guests.as_ref().map(Guests::media).unwrap_or_default();
                    let started = Instant::now();
                    LibvirtBackend::open(&uri)?.up(&topology, &mut state, &media)?;
                    if let (Some(guests), Some(options)) = (guests, options) {
                        let mut steps = vec![lab::Step {
                            what: "networks and domains defined, started".into(),
                            took: started.elapsed(),
                        }];
                        steps.extend(guest_stand(&topology, &mut state, &guests, &options)?);
                        print_steps(&steps, started);
                    }
                }
            }
            println!("stand {} is up (state in {})", topology.name, dir.display());
            Ok(0)
        }
        Command::Down { stand } => {
            let dir = existing_state_dir(cli.state_dir, stand.as_deref())?;
            let state = load_state(&dir, cli.backend)?;
            let name = state.state().stand.clone();
            match state.state().backend {
                BackendKind::Netns => netns::down(state)?,
                BackendKind::Libvirt => {
                    let uri = state
                        .state()
                        .libvirt_uri
                        .clone()
                        .context("libvirt state without a connection URI")?;
                    LibvirtBackend::open(&uri)?.down(state)?;
                }
            }
            println!("stand {name} is down");
            Ok(0)
        }
        Command::Status { stand, json } => {
            let dir = existing_state_dir(cli.state_dir, stand.as_deref())?;
            let state = load_state(&dir, cli.backend)?;
            let report = status(&state)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "stand {} ({} backend, prefix {}), haclt config {}",
                    report.stand,
                    report.backend,
                    report.prefix,
                    report.haclt_config.display()
                );
                for n in &report.nodes {
                    let addrs: Vec<String> = n
                        .addresses
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let state = match (n.present, n.running) {
                        (_, true) => "up",
                        // A namespace whose daemons do not all run; a domain that is not active.
                        (true, false) if !n.daemons.is_empty() => "degraded",
                        (true, false) => "defined",
                        (false, _) => "missing",
                    };
                    println!(
                        "{:<16} {:<9} {:<28} {:<8} {}",
                        n.name,
                        n.role,
                        n.target,
                        state,
                        addrs.join(" ")
                    );
                    for d in &n.daemons {
                        println!(
                            "    {:<12} {:<10} {:<8} {}",
                            d.name,
                            d.state,
                            d.pid.map_or_else(String::new, |p| p.to_string()),
                            d.detail.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            let down: Vec<&str> = report
                .nodes
                .iter()
                .filter(|n| !n.running)
                .map(|n| n.name.as_str())
                .collect();
            if down.is_empty() {
                Ok(0)
            } else {
                eprintln!("not running: {}", down.join(", "));
                Ok(EXIT_NOT_RUNNING)
            }
        }
        Command::Image {
            action:
                ImageAction::Build {
                    out,
                    mirror,
                    suite,
                    size_gib,
                },
        } => {
            let recipe = ImageRecipe {
                suite,
                mirror,
                size_gib,
            };
            let image = recipe.build(&out)?;
            println!("base image {}", image.disk().display());
            Ok(0)
        }
        Command::Supervise { bin_dir, node } => {
            let dir = existing_state_dir(cli.state_dir, None)?;
            let state = load_state(&dir, Some(BackendKind::Netns))?;
            let topology = state.topology()?;
            tokio::runtime::Runtime::new()
                .context("while starting the async runtime")?
                .block_on(supervise::run(&topology, &dir, &bin_dir, &node))?;
            Ok(0)
        }
        Command::Exec {
            stand,
            node,
            command,
        } => {
            let dir = existing_state_dir(cli.state_dir, stand.as_deref())?;
            let state = load_state(&dir, cli.backend)?;
            let topology = state.topology()?;
            if state.state().backend == BackendKind::Libvirt {
                return guest_exec(&topology, &dir, &node, &command);
            }
            // Exec'd in place (as is every step of the chain): the command gets this
            // process's PID, signals and exit status, so `kill` and `wait` in a script reach it.
            let error =
                netns::exec_command(&topology, &state.state().prefix, &node, &command)?.exec();
            Err(error).context("while starting ip netns exec")
        }
    }
}

fn print_steps(steps: &[lab::Step], started: Instant) {
    for step in steps {
        println!("{:<44} {:>7.2} s", step.what, step.took.as_secs_f64());
    }
    println!("{:<44} {:>7.2} s", "total", started.elapsed().as_secs_f64());
}

/// What `up --backend libvirt --image` needs besides the topology.
struct GuestOptions {
    bins: lab::Binaries,
    packages: PathBuf,
    files: Option<PathBuf>,
    ssh_timeout: Duration,
}

impl GuestOptions {
    /// The binaries and the packages directory (default: `debian/` beside the bin dir), with
    /// every package the topology's roles need found there: a missing one is an error before
    /// any guest boots, not minutes later.
    fn resolve(
        topology: &Topology,
        bin_dir: Option<PathBuf>,
        packages: Option<PathBuf>,
        files: Option<PathBuf>,
        ssh_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let bins = lab::Binaries::locate(bin_dir)?;
        let packages = packages.unwrap_or_else(|| {
            bins.bin_dir
                .parent()
                .unwrap_or(&bins.bin_dir)
                .join("debian")
        });
        for node in &topology.nodes {
            for package in guests::packages(node.role) {
                guests::find_deb(&packages, package)?;
            }
        }
        Ok(Self {
            bins,
            packages,
            files,
            ssh_timeout,
        })
    }
}

/// The stand on booted guests: SSH, packages, the operator's extra files, then the same
/// sequence as on netns ([`lab::up`]) with the material placed for guests.
fn guest_stand(
    topology: &Topology,
    state: &mut StateFile,
    guests: &Guests,
    options: &GuestOptions,
) -> anyhow::Result<Vec<lab::Step>> {
    let dir = state.dir().to_owned();
    let packages = &options.packages;
    let haclt = lab::Haclt {
        binary: options.bins.bin_dir.join("haclt"),
        fabric: None,
        config: StateFile::haclt_config_path(&dir),
    };
    let mut steps = Vec::new();
    let t = Instant::now();
    let mut fleet = GuestFleet::connect(topology, guests, options.ssh_timeout, haclt)?;
    steps.push(lab::Step {
        what: "every guest answers SSH".into(),
        took: t.elapsed(),
    });
    let t = Instant::now();
    let installed = fleet.install_packages(topology, packages)?;
    for (node, debs) in &installed {
        info!(node, packages = ?debs, "installed");
    }
    steps.push(lab::Step {
        what: format!("packages from {}", packages.display()),
        took: t.elapsed(),
    });
    if let Some(files) = &options.files {
        let t = Instant::now();
        for (node, units) in fleet.push_files(guests, files)? {
            println!("{node}: pushed files, units started: {}", units.join(" "));
        }
        steps.push(lab::Step {
            what: "files pushed".into(),
            took: t.elapsed(),
        });
    }
    let material = Material::placed(topology, &dir, Placement::Guest);
    steps.extend(lab::up(topology, state, &material, &mut fleet)?);
    fleet.close();
    Ok(steps)
}

/// `exec` on a libvirt guest: the command as root over SSH, its output passed on, its exit
/// status returned.
fn guest_exec(
    topology: &Topology,
    dir: &Path,
    node: &str,
    command: &[OsString],
) -> anyhow::Result<u8> {
    use std::io::{IsTerminal as _, Read as _, Write as _};
    let guests = bootstrap::reach(topology, dir)?;
    let rt = tokio::runtime::Runtime::new().context("while starting the async runtime")?;
    let session = guests::connect_one(&rt, &guests, node, GUEST_CONNECT)?;
    let line: Vec<String> = command
        .iter()
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect();
    let mut input = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .read_to_end(&mut input)
            .context("while reading standard input")?;
    }
    let out = rt
        .block_on(session.exec_with_stdin(&line.join(" "), &input))
        .with_context(|| format!("while running the command on {node}"))?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stderr().write_all(&out.stderr)?;
    Ok(u8::try_from(out.status).unwrap_or(u8::MAX))
}

/// How long `exec` and `status` wait for a guest's SSH.
const GUEST_CONNECT: Duration = Duration::from_secs(15);

/// The daemons of a running guest: its role's units as systemd reports them over SSH.
fn guest_daemons(
    rt: &tokio::runtime::Runtime,
    guests: Option<&Guests>,
    node: &str,
    role: crate::topology::Role,
) -> Vec<daemons::DaemonReport> {
    let down = |name: &str, detail: String| daemons::DaemonReport {
        name: name.to_owned(),
        state: DaemonState::Down,
        pid: None,
        detail: Some(detail),
    };
    let Some(guests) = guests else {
        return vec![down("ssh", "no keys in the state directory".into())];
    };
    let session = match guests::connect_one(rt, guests, node, GUEST_CONNECT) {
        Ok(s) => s,
        Err(e) => return vec![down("ssh", e.to_string())],
    };
    let units = match guests::units_status(rt, &session, role) {
        Ok(u) => u,
        Err(e) => return vec![down("ssh", e)],
    };
    let _ = rt.block_on(session.close());
    units
        .into_iter()
        .map(|u| daemons::DaemonReport {
            state: u.daemon_state(),
            detail: Some(format!("{}, {} restarts", u.state, u.restarts)),
            pid: u.pid,
            name: u.unit,
        })
        .collect()
}

/// The report of `status`.
pub fn status(state: &StateFile) -> anyhow::Result<StatusReport> {
    let topology = state.topology()?;
    let s = state.state();
    let nodes = match s.backend {
        BackendKind::Netns => netns::status(&topology, &s.prefix)
            .into_iter()
            .map(|n| (n.node, n.namespace, n.present, n.present))
            .collect::<Vec<_>>(),
        BackendKind::Libvirt => {
            let uri = s
                .libvirt_uri
                .as_deref()
                .context("libvirt state without a connection URI")?;
            LibvirtBackend::open(uri)?
                .status(&topology, &s.prefix)?
                .into_iter()
                .map(|d| (d.node, d.domain, d.defined, d.active))
                .collect()
        }
    };
    let material = Material::new(&topology, state.dir());
    let (rt, guests) = match s.backend {
        BackendKind::Netns => (None, None),
        BackendKind::Libvirt => (
            Some(tokio::runtime::Runtime::new().context("while starting the async runtime")?),
            bootstrap::reach(&topology, state.dir()).ok(),
        ),
    };
    let nodes = nodes
        .into_iter()
        .map(|(name, target, present, active)| {
            let node = topology
                .node(&name)
                .expect("status lists exactly the topology's nodes");
            let netns = s.backend == BackendKind::Netns;
            let supervisor_pid = netns
                .then(|| lab::supervisor_pid(&topology, state.dir(), &name))
                .flatten();
            let daemons = if netns && present {
                daemons::node_daemons(&material, &name, node.role, supervisor_pid)
            } else if let Some(rt) = rt.as_ref().filter(|_| active) {
                guest_daemons(rt, guests.as_ref(), &name, node.role)
            } else {
                Vec::new()
            };
            NodeReport {
                running: active && daemons.iter().all(|d| d.state == DaemonState::Running),
                supervisor_pid,
                role: node.role.to_string(),
                addresses: node.addresses.clone(),
                daemons,
                name,
                target,
                present,
            }
        })
        .collect();
    Ok(StatusReport {
        stand: s.stand.clone(),
        backend: s.backend,
        prefix: s.prefix.clone(),
        state_dir: state.dir().to_owned(),
        haclt_config: StateFile::haclt_config_path(state.dir()),
        nodes,
    })
}

/// The text of `plan`: the backend's layout, each node's firewall, and the libvirt XML.
pub fn plan(topology: &Topology, prefix: &str, backend: BackendKind) -> String {
    let mut out = format!(
        "# stand {} (prefix {prefix}, backend {backend})\n",
        topology.name
    );
    if backend == BackendKind::Netns {
        out.push_str("\n## network namespaces\n");
        out.push_str(&Layout::new(topology, prefix).describe());
    }
    out.push_str("\n## firewall (nft -f, per node)\n");
    for node in &topology.nodes {
        out.push_str(&format!("\n# {} ({})\n", node.name, node.role));
        out.push_str(&node_firewall(topology, node).to_nft());
    }
    out.push_str(&format!(
        "\n## libvirt XML ({}, domain type {})\n",
        topology.libvirt.uri, topology.libvirt.domain_type
    ));
    for k in 0..topology.networks.len() {
        if let Some(xml) = libvirt::network_xml(topology, prefix, k) {
            out.push('\n');
            out.push_str(&xml);
        }
    }
    for node in &topology.nodes {
        out.push('\n');
        out.push_str(&libvirt::domain_xml(topology, prefix, node, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::example;

    #[test]
    fn plan_shows_layout_rules_and_xml() {
        let p = plan(&example(), "lab", BackendKind::Netns);
        assert!(p.contains("namespace lab-psql1server (postgres)"), "{p}");
        assert!(
            p.contains("# psql1server (postgres)\nadd table inet ha_provision"),
            "{p}"
        );
        assert!(p.contains("<name>lab-backend</name>"), "{p}");
        assert!(p.contains("<name>lab-mon3server</name>"), "{p}");
    }

    #[test]
    fn cli_parses_exec_after_double_dash() {
        let cli = Cli::try_parse_from([
            "ha-provision",
            "--state-dir",
            "/tmp/x",
            "exec",
            "e1server",
            "--",
            "ip",
            "-br",
            "addr",
        ])
        .expect("valid command line");
        match cli.command {
            Command::Exec { node, command, .. } => {
                assert_eq!(node, "e1server");
                assert_eq!(command, ["ip", "-br", "addr"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn cli_parses_image_build_and_guest_options_of_up() {
        let cli = Cli::try_parse_from(["ha-provision", "image", "build", "--out", "/var/img"])
            .expect("valid command line");
        match cli.command {
            Command::Image {
                action:
                    ImageAction::Build {
                        out,
                        mirror,
                        suite,
                        size_gib,
                    },
            } => {
                assert_eq!(out, Path::new("/var/img"));
                assert_eq!(mirror, "http://deb.debian.org/debian");
                assert_eq!(suite, "bookworm");
                assert_eq!(size_gib, 4);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "ha-provision",
            "--backend",
            "libvirt",
            "up",
            "lab.toml",
            "--image",
            "/var/img",
            "--files",
            "/srv/files",
            "--ssh-timeout",
            "90",
        ])
        .expect("valid command line");
        match cli.command {
            Command::Up {
                image,
                files,
                ssh_timeout,
                ..
            } => {
                assert_eq!(image.as_deref(), Some(Path::new("/var/img")));
                assert_eq!(files.as_deref(), Some(Path::new("/srv/files")));
                assert_eq!(ssh_timeout, 90);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(
            Cli::try_parse_from(["ha-provision", "up", "lab.toml", "--files", "/srv/files"])
                .is_err(),
            "--files needs --image"
        );
    }
}
