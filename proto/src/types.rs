//! Domain newtypes shared by every crate. A bare `u64` or `String` for an identity or position
//! never crosses a crate boundary: these types carry their validation and their display form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a textual identity or position was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "node name {0:?} is invalid: use 1 to 63 characters a-z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    NodeName(String),
    #[error("LSN {0:?} is invalid: expected PostgreSQL form such as 0/3000060")]
    Lsn(String),
    #[error("node kind {0:?} is invalid: expected postgres or ejabberd")]
    NodeKind(String),
}

/// The identity of a PostgreSQL or ejabberd node: its name, which is also the common name of its
/// certificate, its `application_name` when it streams, and (after [`NodeId::slot_name`]) the
/// name of its replication slot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub const MAX_LEN: usize = 63;

    pub fn new(name: impl Into<String>) -> Result<Self, ParseError> {
        let name = name.into();
        let valid_first = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let valid_rest = name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        });
        if valid_first && valid_rest && name.len() <= Self::MAX_LEN {
            Ok(Self(name))
        } else {
            Err(ParseError::NodeName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// PostgreSQL replication slot names allow only `[a-z0-9_]`.
    pub fn slot_name(&self) -> String {
        let body: String = self
            .0
            .chars()
            .map(|c| if c == '-' || c == '.' { '_' } else { c })
            .collect();
        format!("ha_{body}")
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

macro_rules! counter_newtype {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            pub const ZERO: Self = Self(0);

            pub fn get(self) -> $inner {
                self.0
            }

            /// The next value; panics only if the counter would wrap, which persisted state
            /// can never legitimately reach.
            pub fn next(self) -> Self {
                Self(self.0.checked_add(1).expect(concat!(stringify!($name), " overflow")))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }
    };
}

counter_newtype!(
    /// Monotonic number of a primary assignment. Every promotion carries a new, higher epoch;
    /// agents persist the highest they have seen and refuse commands with an older one.
    Epoch, u64, "e"
);
counter_newtype!(
    /// A Raft term.
    Term, u64, "t"
);
counter_newtype!(
    /// A monitor's Raft id (never reused: a wiped monitor rejoins under a new id).
    MonitorId, u64, "m"
);
counter_newtype!(
    /// A PostgreSQL timeline.
    Timeline, u32, "tl"
);

/// A PostgreSQL WAL position. Displayed and parsed as PostgreSQL does (`16/B374D848`),
/// serialized in JSON in that same form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Self = Self(0);

    /// Bytes from `self` up to `ahead`, zero when `ahead` is not ahead.
    pub fn bytes_behind(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Lsn(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Self((hi << 32) | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Postgres,
    Ejabberd,
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeKind::Postgres => "postgres",
            NodeKind::Ejabberd => "ejabberd",
        })
    }
}

impl FromStr for NodeKind {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "postgres" => Ok(NodeKind::Postgres),
            "ejabberd" => Ok(NodeKind::Ejabberd),
            other => Err(ParseError::NodeKind(other.to_owned())),
        }
    }
}

/// What the monitor asks a node to be (see `GoalState` in the `.proto` for each meaning).
/// Agents match on it exhaustively, so a new state cannot be added without every agent
/// knowing how to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoalState {
    Single,
    Primary,
    Standby,
    Draining,
    Fenced,
    StopReplication,
    Maintenance,
    Removed,
    Follow,
}

impl GoalState {
    pub fn as_str(self) -> &'static str {
        match self {
            GoalState::Single => "single",
            GoalState::Primary => "primary",
            GoalState::Standby => "standby",
            GoalState::Draining => "draining",
            GoalState::Fenced => "fenced",
            GoalState::StopReplication => "stop_replication",
            GoalState::Maintenance => "maintenance",
            GoalState::Removed => "removed",
            GoalState::Follow => "follow",
        }
    }

    /// Whether a node in this goal may accept writes.
    pub fn is_writable(self) -> bool {
        matches!(self, GoalState::Single | GoalState::Primary)
    }
}

impl fmt::Display for GoalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host and TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsn_matches_postgres_form() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("0/3000060".parse::<Lsn>(), Ok(Lsn(0x300_0060)));
        for bad in ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0", "-1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn node_names_are_validated() {
        for good in ["psql1server", "e1server", "a", "node-2.dc_1"] {
            assert!(NodeId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "a b", "a/b", "é", &"x".repeat(64)] {
            assert!(NodeId::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(NodeId::new("psql-1.x").unwrap().slot_name(), "ha_psql_1_x");
    }

    #[test]
    fn json_forms() {
        let id = NodeId::new("psql1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"psql1\"");
        assert_eq!(
            serde_json::to_string(&Lsn(0x300_0060)).unwrap(),
            "\"0/3000060\""
        );
        assert!(serde_json::from_str::<NodeId>("\"Bad Name\"").is_err());
        assert_eq!(Epoch(7).to_string(), "e7");
        assert_eq!(GoalState::StopReplication.to_string(), "stop_replication");
    }

    proptest! {
        #[test]
        fn lsn_text_round_trips(v in any::<u64>()) {
            let text = Lsn(v).to_string();
            prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(v)));
        }
    }
}
