//! `haclt show uri`: a multi-host libpq connection URI for applications that find the primary
//! through libpq instead of a proxy.
//!
//! libpq tries the hosts in order and keeps the first whose session matches
//! `target_session_attrs`: `read-write` finds the writable primary, `prefer-standby` a
//! standby and else the primary. After a failover the application's next connection attempt
//! lands on the new primary by itself; a fenced old primary is read-only or down, so it is
//! skipped. The hosts are the group's PostgreSQL nodes as the monitors know them (the
//! endpoints their certificates name, so `sslmode=verify-full` checks each one), the current
//! primary first for `read-write` (one attempt in the common case), standbys first otherwise.
//! Nodes in maintenance stay in the list: they may come back, and libpq skips them meanwhile.

use std::fmt::Write as _;
use std::path::Path;

use crate::client::Failure;
use crate::output::Status;

/// What the URI is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The writable primary.
    Primary,
    /// A standby if any answers, else the primary (reads that may lag).
    Standby,
}

/// The parts of the URI that do not come from the cluster.
#[derive(Debug, Clone, Copy)]
pub struct UriOptions<'a> {
    pub group: &'a str,
    pub target: Target,
    pub dbname: &'a str,
    pub user: Option<&'a str>,
    /// The cluster CA: `sslmode=verify-full` with it; without it `sslmode=require`.
    pub sslrootcert: Option<&'a Path>,
    /// A client certificate and key for `cert` authentication.
    pub sslcert: Option<&'a Path>,
    pub sslkey: Option<&'a Path>,
}

/// Percent-encodes everything but RFC 3986's unreserved characters (and `/` in paths).
fn encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The URI for `opts.group` in `status`.
pub fn uri(status: &Status, opts: &UriOptions<'_>) -> Result<String, Failure> {
    let group = status
        .groups
        .iter()
        .find(|g| g.name == opts.group)
        .ok_or_else(|| Failure::NotFound(format!("group {:?}", opts.group)))?;
    let mut nodes: Vec<_> = status
        .nodes
        .iter()
        .filter(|n| n.kind == "postgres" && n.group == opts.group && !n.host.is_empty())
        .collect();
    if nodes.is_empty() {
        return Err(Failure::NotFound(format!(
            "no PostgreSQL node in group {:?}",
            opts.group
        )));
    }
    let is_primary = |name: &str| group.primary.as_deref() == Some(name);
    // Stable: within each part the catalog's order.
    nodes.sort_by_key(|n| match opts.target {
        Target::Primary => !is_primary(&n.name),
        Target::Standby => is_primary(&n.name),
    });
    let hosts: Vec<String> = nodes
        .iter()
        .map(|n| {
            let host = if n.host.contains(':') {
                format!("[{}]", n.host)
            } else {
                encode(&n.host, false)
            };
            format!("{host}:{}", n.port)
        })
        .collect();
    let mut uri = "postgresql://".to_owned();
    if let Some(user) = opts.user {
        let _ = write!(uri, "{}@", encode(user, false));
    }
    let _ = write!(
        uri,
        "{}/{}?target_session_attrs={}",
        hosts.join(","),
        encode(opts.dbname, false),
        match opts.target {
            Target::Primary => "read-write",
            Target::Standby => "prefer-standby",
        }
    );
    match opts.sslrootcert {
        Some(ca) => {
            let _ = write!(
                uri,
                "&sslmode=verify-full&sslrootcert={}",
                encode(&ca.to_string_lossy(), true)
            );
        }
        None => uri.push_str("&sslmode=require"),
    }
    for (key, path) in [("sslcert", opts.sslcert), ("sslkey", opts.sslkey)] {
        if let Some(path) = path {
            let _ = write!(uri, "&{key}={}", encode(&path.to_string_lossy(), true));
        }
    }
    // A node that does not answer is given up after 2 s and the next one tried.
    uri.push_str("&connect_timeout=2");
    Ok(uri)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::output::{Group, Node};

    fn node(name: &str, kind: &str, host: &str) -> Node {
        Node {
            name: name.into(),
            kind: kind.into(),
            group: "main".into(),
            host: host.into(),
            port: 5432,
            state: "standby".into(),
            goal: "standby".into(),
            epoch: 3,
            healthy: true,
            unhealthy: None,
            last_report_age_ms: Some(10),
            candidate_priority: 50,
            replication_quorum: true,
            maintenance: false,
            last_error: None,
            postgres: None,
            ejabberd: None,
        }
    }

    fn status() -> Status {
        Status {
            stale: false,
            answered_by: 1,
            groups: vec![Group {
                name: "main".into(),
                primary: Some("psql2".into()),
                epoch: 3,
                synchronous: true,
                pending: None,
                sync_quorum: 1,
                max_sync_lag_bytes: 0,
                on_standby_loss: "async".into(),
                failsafe_ms: 0,
            }],
            nodes: vec![
                node("psql1", "postgres", "10.0.0.1"),
                node("e1", "ejabberd", "10.0.0.9"),
                node("psql2", "postgres", "10.0.0.2"),
                node("psql3", "postgres", "db3.example"),
            ],
            monitors: Vec::new(),
        }
    }

    fn opts(target: Target) -> UriOptions<'static> {
        UriOptions {
            group: "main",
            target,
            dbname: "xmpp db",
            user: Some("app@x"),
            sslrootcert: Some(Path::new("/etc/ha/ca bundle.crt")),
            sslcert: None,
            sslkey: None,
        }
    }

    #[test]
    fn primary_first_for_writes_standbys_first_for_reads() {
        assert_eq!(
            uri(&status(), &opts(Target::Primary)).unwrap(),
            "postgresql://app%40x@10.0.0.2:5432,10.0.0.1:5432,db3.example:5432/xmpp%20db\
             ?target_session_attrs=read-write&sslmode=verify-full\
             &sslrootcert=/etc/ha/ca%20bundle.crt&connect_timeout=2"
        );
        let reads = uri(&status(), &opts(Target::Standby)).unwrap();
        assert!(
            reads.contains("@10.0.0.1:5432,db3.example:5432,10.0.0.2:5432/")
                && reads.contains("target_session_attrs=prefer-standby"),
            "{reads}"
        );
    }

    #[test]
    fn without_a_ca_the_uri_still_requires_tls_and_an_unknown_group_is_not_found() {
        let o = UriOptions {
            sslrootcert: None,
            user: None,
            ..opts(Target::Primary)
        };
        let u = uri(&status(), &o).unwrap();
        assert!(u.starts_with("postgresql://10.0.0.2:5432,"), "{u}");
        assert!(u.contains("&sslmode=require"), "{u}");
        let o = UriOptions {
            group: "other",
            ..opts(Target::Primary)
        };
        assert!(matches!(uri(&status(), &o), Err(Failure::NotFound(_))));
    }
}
