//! `ha-monitor --config PATH`: the TOML file, parsed strictly (unknown keys are errors, a
//! mistyped timeout must not silently become a default) and validated into [`MonitorConfig`]
//! before any port is bound or any file is written.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused. `main` prints it and exits 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// This monitor's Raft id: unique, never reused (a wiped monitor rejoins under a new id).
    id: u64,
    data_dir: PathBuf,
    /// Where this monitor serves agents, operators and its peers (one gRPC port).
    listen: SocketAddr,
    /// The address other monitors and agents use to reach this one (default: `listen`).
    advertise: Option<String>,
    /// Initial members when the cluster is created; also where a joining member finds peers.
    #[serde(default)]
    members: Vec<MemberEntry>,
    /// True for a member added later with `haclt monitor add`: it does not bootstrap.
    #[serde(default)]
    join: bool,
    #[serde(default)]
    timings: Timings,
    tls: Option<TlsFiles>,
    /// Plaintext and single-monitor clusters need this (and the `--dev` flag).
    #[serde(default)]
    dev: bool,
    /// Drills may ask this monitor to exit abruptly (kill-monitor-leader).
    #[serde(default)]
    allow_drills: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberEntry {
    id: u64,
    address: String,
}

/// The `[tls]` section: the cluster CA bundle, this monitor's certificate (role monitor, name
/// `monitor-<id>`) and key, and optionally the CA's private key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA's private key (a PEM file of mode 0600, refused if group or others may
    /// read it; reloaded like the other files, so a CA rotation needs no restart). With it the
    /// leader signs the CSR a node sends with Join; without it a node joins with a pre-issued
    /// certificate and an empty CSR.
    pub ca_key: Option<PathBuf>,
    /// How long a node certificate signed by the leader (at join or renewal) is valid, capped
    /// at the CA's own expiry. Agents renew at about two thirds of it.
    #[serde(
        default = "default_node_certificate_lifetime",
        with = "humantime_serde"
    )]
    pub node_certificate_lifetime: Duration,
}

/// The default of `tls.node_certificate_lifetime`: short enough that a leaked key or a removed
/// node's certificate is useless within days, long enough to ride out a week without monitors.
pub const DEFAULT_NODE_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// The bounds of `tls.node_certificate_lifetime` (the lower one for tests of renewal).
pub const NODE_CERTIFICATE_LIFETIME_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(10)..=Duration::from_secs(397 * 86_400);

fn default_node_certificate_lifetime() -> Duration {
    DEFAULT_NODE_CERTIFICATE_LIFETIME
}

impl TlsFiles {
    /// The files of the TLS connections (the CA key is reloaded by [`crate::signer`]).
    pub fn tls(&self) -> ha_pki::TlsFiles {
        ha_pki::TlsFiles {
            ca_bundle: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let paths = [
            ("ca", Some(&self.ca)),
            ("cert", Some(&self.cert)),
            ("key", Some(&self.key)),
            ("ca_key", self.ca_key.as_ref()),
        ];
        for (name, path) in paths {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(invalid(format!(
                    "tls.{name} must be an absolute path, not {}",
                    path.display()
                )));
            }
        }
        if !NODE_CERTIFICATE_LIFETIME_RANGE.contains(&self.node_certificate_lifetime) {
            return Err(invalid(format!(
                "tls.node_certificate_lifetime must be between {} and {}, not {}",
                humantime::format_duration(*NODE_CERTIFICATE_LIFETIME_RANGE.start()),
                humantime::format_duration(*NODE_CERTIFICATE_LIFETIME_RANGE.end()),
                humantime::format_duration(self.node_certificate_lifetime)
            )));
        }
        Ok(())
    }
}

/// Timings of failure detection and consensus (monitor/README.md, `[timings]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timings {
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub unhealthy_after: Duration,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub lease_margin: Duration,
    #[serde(with = "humantime_serde")]
    pub raft_tick: Duration,
    pub election_ticks: u32,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_millis(500),
            unhealthy_after: Duration::from_millis(1500),
            lease: Duration::from_secs(3),
            lease_margin: Duration::from_secs(1),
            raft_tick: Duration::from_millis(100),
            election_ticks: 10,
        }
    }
}

impl Timings {
    pub fn election_timeout(&self) -> Duration {
        self.raft_tick * self.election_ticks
    }

    /// The failure-detection timings every monitor judges with (replicated in the catalog).
    pub fn catalog(&self) -> crate::catalog::Timings {
        crate::catalog::Timings {
            report_interval: self.report_interval,
            unhealthy_after: self.unhealthy_after,
            lease: self.lease,
            lease_margin: self.lease_margin,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.catalog()
            .validate()
            .map_err(|e| invalid(format!("timings: {e}")))?;
        if self.report_interval.is_zero() || self.raft_tick.is_zero() {
            return Err(invalid(
                "timings.report_interval and timings.raft_tick must be above zero",
            ));
        }
        if self.election_ticks < 3 {
            return Err(invalid("timings.election_ticks must be at least 3"));
        }
        if self.unhealthy_after < self.report_interval * 2 {
            return Err(invalid(format!(
                "timings.unhealthy_after ({:?}) must cover at least two report intervals ({:?})",
                self.unhealthy_after, self.report_interval
            )));
        }
        // A monitor election must not look like a database failure: the primary's lease has to
        // outlast a leader change (monitor/README.md, `[timings]`).
        if self.lease <= self.election_timeout() * 2 {
            return Err(invalid(format!(
                "timings.lease ({:?}) must be longer than two monitor election timeouts ({:?})",
                self.lease,
                self.election_timeout() * 2
            )));
        }
        if self.lease <= self.report_interval * 2 {
            return Err(invalid(
                "timings.lease must cover at least two report intervals",
            ));
        }
        Ok(())
    }
}

/// A validated monitor configuration.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    /// Initial members (id -> address), including this one unless `join` is set.
    pub members: BTreeMap<u64, String>,
    pub join: bool,
    pub timings: Timings,
    pub tls: Option<TlsFiles>,
    pub dev: bool,
    pub allow_drills: bool,
}

impl MonitorConfig {
    /// Reads and validates `path`. `dev_flag` is the command line's `--dev`: insecure settings
    /// need both it and `dev = true` in the file, so neither alone can weaken a cluster.
    pub fn load(path: &Path, dev_flag: bool) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, dev_flag)
    }

    pub fn parse(text: &str, path: &Path, dev_flag: bool) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        file.validate(dev_flag)
    }
}

impl File {
    fn validate(self, dev_flag: bool) -> Result<MonitorConfig, ConfigError> {
        if self.id == 0 {
            return Err(invalid("id must be above zero (0 is reserved by raft)"));
        }
        self.timings.validate()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        let mut members = BTreeMap::new();
        for m in &self.members {
            if m.id == 0 {
                return Err(invalid("members: id 0 is reserved"));
            }
            if m.address.trim().is_empty() {
                return Err(invalid(format!(
                    "members: monitor {} has an empty address",
                    m.id
                )));
            }
            if members.insert(m.id, m.address.clone()).is_some() {
                return Err(invalid(format!(
                    "members: monitor {} is listed twice",
                    m.id
                )));
            }
        }
        let advertise = self.advertise.unwrap_or_else(|| self.listen.to_string());
        if self.join {
            if members.contains_key(&self.id) {
                return Err(invalid(format!(
                    "join = true but id {} is already among members: a joining monitor needs a new id",
                    self.id
                )));
            }
            if members.is_empty() {
                return Err(invalid("join = true needs the current members to contact"));
            }
        } else {
            match members.get(&self.id) {
                None => {
                    return Err(invalid(format!(
                        "id {} is not among members: list every initial monitor including this one",
                        self.id
                    )));
                }
                Some(addr) if *addr != advertise => {
                    return Err(invalid(format!(
                        "members lists monitor {} at {addr} but it advertises {advertise}",
                        self.id
                    )));
                }
                Some(_) => {}
            }
        }
        let insecure = self.tls.is_none() || members.len() < 3;
        if insecure && !(self.dev && dev_flag) {
            let what = if self.tls.is_none() {
                "no [tls] section (plaintext)"
            } else {
                "fewer than three monitors (no fault tolerance)"
            };
            return Err(invalid(format!(
                "{what}: allowed only with `dev = true` in the file and the --dev flag"
            )));
        }
        if members.len() % 2 == 0 && !self.join {
            return Err(invalid(format!(
                "{} initial monitors: use an odd number (1, 3 or 5); an even count tolerates no more failures than one fewer",
                members.len()
            )));
        }
        Ok(MonitorConfig {
            id: self.id,
            data_dir: self.data_dir,
            listen: self.listen,
            advertise,
            members,
            join: self.join,
            timings: self.timings,
            tls: self.tls,
            dev: self.dev && dev_flag,
            allow_drills: self.allow_drills,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = 1
data_dir = "/var/lib/ha-monitor"
listen = "127.0.0.1:7400"
members = [
  { id = 1, address = "127.0.0.1:7400" },
  { id = 2, address = "127.0.0.1:7410" },
  { id = 3, address = "127.0.0.1:7420" },
]
[tls]
ca = "/etc/ha/ca.pem"
cert = "/etc/ha/m1.pem"
key = "/etc/ha/m1.key"
[timings]
report_interval = "250ms"
"#;

    fn parse(text: &str, dev: bool) -> Result<MonitorConfig, ConfigError> {
        MonitorConfig::parse(text, Path::new("test.toml"), dev)
    }

    #[test]
    fn good_config_with_defaults() {
        let c = parse(GOOD, false).unwrap();
        assert_eq!(c.id, 1);
        assert_eq!(c.members.len(), 3);
        assert_eq!(c.advertise, "127.0.0.1:7400");
        assert_eq!(c.timings.report_interval, Duration::from_millis(250));
        assert_eq!(c.timings.lease, Duration::from_secs(3));
        assert!(!c.dev);
    }

    fn err(text: &str, dev: bool) -> String {
        parse(text, dev).unwrap_err().to_string()
    }

    #[test]
    fn mistakes_are_named() {
        let typo = GOOD.replace("report_interval", "report_intervall");
        assert!(err(&typo, false).contains("unknown field `report_intervall`"));
        let bad_duration = GOOD.replace("250ms", "250 parsecs");
        assert!(err(&bad_duration, false).contains("report_interval"));
        let not_member = GOOD.replace("id = 1\n", "id = 9\n");
        assert!(err(&not_member, false).contains("id 9 is not among members"));
        let short_lease = format!("{GOOD}lease = \"2s\"\n");
        assert!(err(&short_lease, false).contains("longer than two monitor election timeouts"));
        let dup = GOOD.replace("id = 3,", "id = 2,");
        assert!(err(&dup, false).contains("listed twice"));
        let zero = GOOD.replace("id = 1\n", "id = 0\n");
        assert!(err(&zero, false).contains("above zero"));
    }

    #[test]
    fn insecure_needs_both_dev_switches() {
        let plaintext = GOOD
            .replace("[tls]\n", "")
            .replace("ca = \"/etc/ha/ca.pem\"\n", "")
            .replace("cert = \"/etc/ha/m1.pem\"\n", "")
            .replace("key = \"/etc/ha/m1.key\"\n", "");
        assert!(err(&plaintext, true).contains("plaintext"));
        let with_dev = format!("dev = true\n{plaintext}");
        assert!(err(&with_dev, false).contains("--dev flag"));
        assert!(parse(&with_dev, true).unwrap().dev);
    }

    #[test]
    fn tls_paths_must_be_absolute_and_the_ca_key_is_optional() {
        assert_eq!(parse(GOOD, false).unwrap().tls.unwrap().ca_key, None);
        let with_key = GOOD.replace(
            "key = \"/etc/ha/m1.key\"\n",
            "key = \"/etc/ha/m1.key\"\nca_key = \"/etc/ha/ca.key\"\n",
        );
        let tls = parse(&with_key, false).unwrap().tls.unwrap();
        assert_eq!(tls.ca_key, Some(PathBuf::from("/etc/ha/ca.key")));
        assert_eq!(tls.tls().ca_bundle, PathBuf::from("/etc/ha/ca.pem"));
        let relative = GOOD.replace("\"/etc/ha/m1.pem\"", "\"m1.pem\"");
        assert!(err(&relative, false).contains("tls.cert must be an absolute path"));
    }

    #[test]
    fn node_certificate_lifetime_defaults_to_a_week_and_is_bounded() {
        let tls = parse(GOOD, false).unwrap().tls.unwrap();
        assert_eq!(
            tls.node_certificate_lifetime,
            DEFAULT_NODE_CERTIFICATE_LIFETIME
        );
        let with = |v: &str| {
            GOOD.replace(
                "key = \"/etc/ha/m1.key\"\n",
                &format!("key = \"/etc/ha/m1.key\"\nnode_certificate_lifetime = \"{v}\"\n"),
            )
        };
        let tls = parse(&with("2days"), false).unwrap().tls.unwrap();
        assert_eq!(
            tls.node_certificate_lifetime,
            Duration::from_secs(2 * 86_400)
        );
        assert!(err(&with("5s"), false).contains("must be between 10s and"));
        assert!(err(&with("2years"), false).contains("must be between"));
    }

    #[test]
    fn joining_member_needs_a_new_id() {
        let join = GOOD.replace("id = 1\n", "id = 1\njoin = true\n");
        assert!(err(&join, false).contains("needs a new id"));
        let join = GOOD.replace("id = 1\n", "id = 4\njoin = true\n");
        assert!(parse(&join, false).unwrap().join);
    }
}
