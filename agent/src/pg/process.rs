//! Running PostgreSQL programs as the PostgreSQL OS user, and supervising the postmaster.
//!
//! Invariants: every program runs with a cleared environment plus `LC_ALL=C` (so parsed output
//! is in English) and, when the agent is root, under the PostgreSQL user's uid and gid. The
//! postmaster is the agent's direct child in its own process group (a signal to the agent's
//! terminal does not reach it), so the agent knows its PID and sees its exit status; a postmaster
//! left by a previous agent run is adopted from `postmaster.pid` and watched by polling.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::PgError;
use super::files::Owner;

/// The OS identity PostgreSQL programs run as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub owner: Owner,
    /// True when the agent is root and must switch to `owner` for each program.
    switch: bool,
}

impl RunAs {
    /// Resolves `user`; the agent must be that user already, or root.
    pub fn resolve(user: &str) -> Result<Self, PgError> {
        let found = User::from_name(user)
            .map_err(|e| PgError::User {
                user: user.to_owned(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| PgError::User {
                user: user.to_owned(),
                reason: "no such user".to_owned(),
            })?;
        let me = geteuid();
        if me != found.uid && !me.is_root() {
            return Err(PgError::User {
                user: user.to_owned(),
                reason: format!("the agent runs as uid {me}, neither that user nor root"),
            });
        }
        Ok(Self {
            owner: Owner {
                uid: found.uid.as_raw(),
                gid: found.gid.as_raw(),
            },
            switch: me != found.uid,
        })
    }

    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir("/")
            .stdin(Stdio::null());
        if self.switch {
            cmd.uid(self.owner.uid).gid(self.owner.gid);
        }
        cmd
    }

    /// Runs a PostgreSQL program to completion; its stdout on success.
    pub async fn run_tool<I, S>(&self, program: &Path, args: I) -> Result<String, PgError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.run_tool_with_messages(program, args).await?.0)
    }

    /// Like [`Self::run_tool`], and also returns what the tool wrote on stderr when it
    /// succeeded (PostgreSQL's tools log their progress and conclusions there).
    pub async fn run_tool_with_messages<I, S>(
        &self,
        program: &Path,
        args: I,
    ) -> Result<(String, String), PgError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let tool = program
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let out = self
            .command(program)
            .args(args)
            .output()
            .await
            .map_err(|e| PgError::io("running", program, e))?;
        if out.status.success() {
            debug!(tool, "tool finished");
            Ok((
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        } else {
            Err(PgError::Tool {
                tool,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }
}

/// How a postmaster ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// An adopted postmaster (not our child): it is gone, its status unknowable.
    Unknown,
}

/// A running (or just ended) postmaster.
#[derive(Debug)]
pub struct Postmaster {
    pid: Pid,
    exited: watch::Receiver<Option<Exit>>,
}

impl Postmaster {
    /// Starts `postgres -D data_dir` as a child, output appended to `log_file`.
    pub fn spawn(
        run_as: &RunAs,
        bin_dir: &Path,
        data_dir: &Path,
        log_file: &Path,
    ) -> Result<Self, PgError> {
        // The agent may be root and the log's directory the postgres user's: no link followed.
        let log = ha_files::open_append(log_file, 0o600)?;
        let log2 = log
            .try_clone()
            .map_err(|e| PgError::io("opening the server log", log_file, e))?;
        let program = bin_dir.join("postgres");
        let mut child = run_as
            .command(&program)
            .arg("-D")
            .arg(data_dir)
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| PgError::io("starting", &program, e))?;
        let raw = child.id().ok_or(PgError::Start {
            reason: "the postmaster exited before its PID was read".into(),
        })?;
        let pid = Pid::from_raw(i32::try_from(raw).map_err(|_| PgError::Start {
            reason: format!("PID {raw} out of range"),
        })?);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt as _;
            let exit = match child.wait().await {
                Ok(st) => match (st.code(), st.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    (None, None) => Exit::Unknown,
                },
                Err(e) => {
                    warn!(error = %e, "waiting for the postmaster failed");
                    Exit::Unknown
                }
            };
            let _ = tx.send(Some(exit));
        });
        Ok(Self { pid, exited: rx })
    }

    /// Watches a postmaster started by an earlier agent process.
    pub fn adopt(pid: Pid) -> Self {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                if !alive(pid) {
                    let _ = tx.send(Some(Exit::Unknown));
                    return;
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        });
        Self { pid, exited: rx }
    }

    /// The live postmaster named by `data_dir/postmaster.pid`, if any.
    pub fn find_running(data_dir: &Path) -> Option<Pid> {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let raw: i32 = text.lines().next()?.trim().parse().ok()?;
        let pid = Pid::from_raw(raw);
        let comm = std::fs::read_to_string(format!("/proc/{raw}/comm")).ok()?;
        (alive(pid) && comm.trim() == "postgres").then_some(pid)
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// `Some` once the postmaster has ended.
    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    /// Waits up to `timeout` for the postmaster to end.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<Exit> {
        let waited = tokio::time::timeout(timeout, self.exited.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(exit)) => *exit,
            // The watcher task vanished: only possible when the runtime shuts down.
            Ok(Err(_)) => Some(Exit::Unknown),
            Err(_) => None,
        }
    }

    pub fn signal(&self, sig: Signal) -> Result<(), PgError> {
        match kill(self.pid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(PgError::Signal {
                pid: self.pid.as_raw(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Whether `pid` is a live (non-zombie) process.
fn alive(pid: Pid) -> bool {
    if kill(pid, None).is_err() {
        return false;
    }
    // A zombie still answers kill(0); its state letter in /proc/PID/stat (after the command
    // name in parentheses) is 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
