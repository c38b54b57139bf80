//! Conversions between the generated wire types (`crate::v1`) and the domain types.
//!
//! Wire to domain is fallible and never panics: an unknown enum value, a missing required
//! field, an out-of-range port or a malformed name becomes a [`WireError`] that names the field.
//! A [`WireError`] maps to `INVALID_ARGUMENT` at the gRPC edge.

use crate::types::{Endpoint, Epoch, GoalState, NodeId, NodeKind, ParseError};
use crate::v1;

/// A wire message that does not describe a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("field `{field}` is required")]
    Missing { field: &'static str },
    #[error("field `{field}` has unknown enum value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("field `{field}`: {source}")]
    Invalid {
        field: &'static str,
        #[source]
        source: ParseError,
    },
    #[error("field `{field}` is out of range: {value}")]
    OutOfRange { field: &'static str, value: u64 },
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Unwraps an optional sub-message that the contract requires.
pub fn required<T>(value: Option<T>, field: &'static str) -> Result<T, WireError> {
    value.ok_or(WireError::Missing { field })
}

/// Parses a node name field.
pub fn node_id(value: &str, field: &'static str) -> Result<NodeId, WireError> {
    if value.is_empty() {
        return Err(WireError::Missing { field });
    }
    NodeId::new(value).map_err(|source| WireError::Invalid { field, source })
}

/// Decodes a raw enum field into its generated Rust enum, rejecting unknown values and the
/// `*_UNSPECIFIED` zero value (which means the sender forgot the field).
fn known_enum<E: TryFrom<i32>>(raw: i32, field: &'static str) -> Result<E, WireError> {
    if raw == 0 {
        return Err(WireError::Missing { field });
    }
    E::try_from(raw).map_err(|_| WireError::UnknownEnum { field, value: raw })
}

pub fn node_kind(raw: i32, field: &'static str) -> Result<NodeKind, WireError> {
    Ok(match known_enum::<v1::NodeKind>(raw, field)? {
        v1::NodeKind::Postgres => NodeKind::Postgres,
        v1::NodeKind::Ejabberd => NodeKind::Ejabberd,
        v1::NodeKind::Unspecified => return Err(WireError::Missing { field }),
    })
}

impl From<NodeKind> for v1::NodeKind {
    fn from(k: NodeKind) -> Self {
        match k {
            NodeKind::Postgres => v1::NodeKind::Postgres,
            NodeKind::Ejabberd => v1::NodeKind::Ejabberd,
        }
    }
}

pub fn goal_state(raw: i32, field: &'static str) -> Result<GoalState, WireError> {
    Ok(match known_enum::<v1::GoalState>(raw, field)? {
        v1::GoalState::Single => GoalState::Single,
        v1::GoalState::Primary => GoalState::Primary,
        v1::GoalState::Standby => GoalState::Standby,
        v1::GoalState::Draining => GoalState::Draining,
        v1::GoalState::Fenced => GoalState::Fenced,
        v1::GoalState::StopReplication => GoalState::StopReplication,
        v1::GoalState::Maintenance => GoalState::Maintenance,
        v1::GoalState::Removed => GoalState::Removed,
        v1::GoalState::Follow => GoalState::Follow,
        v1::GoalState::Unspecified => return Err(WireError::Missing { field }),
    })
}

impl From<GoalState> for v1::GoalState {
    fn from(g: GoalState) -> Self {
        match g {
            GoalState::Single => v1::GoalState::Single,
            GoalState::Primary => v1::GoalState::Primary,
            GoalState::Standby => v1::GoalState::Standby,
            GoalState::Draining => v1::GoalState::Draining,
            GoalState::Fenced => v1::GoalState::Fenced,
            GoalState::StopReplication => v1::GoalState::StopReplication,
            GoalState::Maintenance => v1::GoalState::Maintenance,
            GoalState::Removed => v1::GoalState::Removed,
            GoalState::Follow => v1::GoalState::Follow,
        }
    }
}

impl TryFrom<v1::Endpoint> for Endpoint {
    type Error = WireError;
    fn try_from(e: v1::Endpoint) -> Result<Self, Self::Error> {
        if e.host.is_empty() {
            return Err(WireError::Missing {
                field: "endpoint.host",
            });
        }
        let port = u16::try_from(e.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(WireError::OutOfRange {
                field: "endpoint.port",
                value: u64::from(e.port),
            })?;
        Ok(Endpoint { host: e.host, port })
    }
}

impl From<Endpoint> for v1::Endpoint {
    fn from(e: Endpoint) -> Self {
        v1::Endpoint {
            host: e.host,
            port: u32::from(e.port),
        }
    }
}

/// The goal the monitor assigns to one node, in domain form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goal {
    pub node: NodeId,
    pub state: GoalState,
    pub epoch: Epoch,
    /// Whom to stream from (standby) or to use as database (ejabberd), with its name.
    pub upstream: Option<(NodeId, Endpoint)>,
    pub synchronous_standbys: Vec<NodeId>,
    pub synchronous_quorum: u32,
}

impl TryFrom<v1::Goal> for Goal {
    type Error = WireError;
    fn try_from(g: v1::Goal) -> Result<Self, Self::Error> {
        let state = goal_state(g.state, "goal.state")?;
        let upstream = match g.upstream {
            Some(ep) => Some((
                node_id(&g.upstream_node, "goal.upstream_node")?,
                Endpoint::try_from(ep)?,
            )),
            None => None,
        };
        if matches!(state, GoalState::Standby | GoalState::Follow) && upstream.is_none() {
            return Err(WireError::Missing {
                field: "goal.upstream",
            });
        }
        let synchronous_standbys = g
            .synchronous_standbys
            .iter()
            .map(|n| node_id(n, "goal.synchronous_standbys"))
            .collect::<Result<Vec<_>, _>>()?;
        if g.synchronous_quorum as usize > synchronous_standbys.len() {
            return Err(WireError::OutOfRange {
                field: "goal.synchronous_quorum",
                value: u64::from(g.synchronous_quorum),
            });
        }
        Ok(Goal {
            node: node_id(&g.node, "goal.node")?,
            state,
            epoch: Epoch(g.epoch),
            upstream,
            synchronous_standbys,
            synchronous_quorum: g.synchronous_quorum,
        })
    }
}

impl From<Goal> for v1::Goal {
    fn from(g: Goal) -> Self {
        let (upstream_node, upstream) = match g.upstream {
            Some((n, ep)) => (n.to_string(), Some(ep.into())),
            None => (String::new(), None),
        };
        v1::Goal {
            node: g.node.to_string(),
            state: v1::GoalState::from(g.state).into(),
            epoch: g.epoch.get(),
            upstream,
            upstream_node,
            synchronous_standbys: g
                .synchronous_standbys
                .iter()
                .map(ToString::to_string)
                .collect(),
            synchronous_quorum: g.synchronous_quorum,
            drill: None,
            report_interval_ms: 0,
            vouchers: Vec::new(),
            failsafe_ms: 0,
            revision: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn goal_strategy() -> impl Strategy<Value = Goal> {
        let name = "[a-z][a-z0-9-]{0,20}".prop_map(|s| NodeId::new(s).expect("valid by regex"));
        let state = prop_oneof![
            Just(GoalState::Single),
            Just(GoalState::Primary),
            Just(GoalState::Standby),
            Just(GoalState::Draining),
            Just(GoalState::Fenced),
            Just(GoalState::StopReplication),
            Just(GoalState::Maintenance),
            Just(GoalState::Removed),
            Just(GoalState::Follow),
        ];
        (
            name.clone(),
            state,
            any::<u64>(),
            (name.clone(), "[a-z0-9.]{1,20}", 1u16..),
            proptest::collection::vec(name, 0..4),
        )
            .prop_flat_map(|(node, state, epoch, (un, host, port), standbys)| {
                let n = standbys.len() as u32;
                (0..=n).prop_map(move |quorum| Goal {
                    node: node.clone(),
                    state,
                    epoch: Epoch(epoch),
                    upstream: Some((
                        un.clone(),
                        Endpoint {
                            host: host.clone(),
                            port,
                        },
                    )),
                    synchronous_standbys: standbys.clone(),
                    synchronous_quorum: quorum,
                })
            })
    }

    proptest! {
        #[test]
        fn goal_round_trips_through_the_wire(goal in goal_strategy()) {
            let wire = v1::Goal::from(goal.clone());
            let bytes = wire.encode_to_vec();
            let decoded = v1::Goal::decode(bytes.as_slice()).expect("decodes");
            prop_assert_eq!(Goal::try_from(decoded), Ok(goal));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(wire) = v1::Goal::decode(bytes.as_slice()) {
                let _ = Goal::try_from(wire);
            }
            let _ = v1::ReportRequest::decode(bytes.as_slice());
        }
    }

    #[test]
    fn unknown_enum_value_is_a_clear_error() {
        let wire = v1::Goal {
            node: "a".into(),
            state: 42,
            ..Default::default()
        };
        let err = Goal::try_from(wire).unwrap_err();
        assert_eq!(
            err,
            WireError::UnknownEnum {
                field: "goal.state",
                value: 42
            }
        );
        assert_eq!(
            err.to_string(),
            "field `goal.state` has unknown enum value 42"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        let unspecified = v1::Goal {
            node: "a".into(),
            ..Default::default()
        };
        assert_eq!(
            Goal::try_from(unspecified).unwrap_err(),
            WireError::Missing {
                field: "goal.state"
            }
        );
        let standby_without_upstream = v1::Goal {
            node: "a".into(),
            state: v1::GoalState::Standby.into(),
            ..Default::default()
        };
        assert_eq!(
            Goal::try_from(standby_without_upstream).unwrap_err(),
            WireError::Missing {
                field: "goal.upstream"
            }
        );
        let bad_name = v1::Goal {
            node: "Not A Name".into(),
            state: v1::GoalState::Single.into(),
            ..Default::default()
        };
        assert!(matches!(
            Goal::try_from(bad_name),
            Err(WireError::Invalid {
                field: "goal.node",
                ..
            })
        ));
        let bad_port = v1::Endpoint {
            host: "h".into(),
            port: 70_000,
        };
        assert_eq!(
            Endpoint::try_from(bad_port).unwrap_err(),
            WireError::OutOfRange {
                field: "endpoint.port",
                value: 70_000
            }
        );
        let too_big_quorum = v1::Goal {
            node: "a".into(),
            state: v1::GoalState::Primary.into(),
            synchronous_standbys: vec!["b".into()],
            synchronous_quorum: 2,
            ..Default::default()
        };
        assert!(matches!(
            Goal::try_from(too_big_quorum),
            Err(WireError::OutOfRange {
                field: "goal.synchronous_quorum",
                ..
            })
        ));
    }

    #[test]
    fn malformed_bytes_are_a_decode_error() {
        // Field 1 (string) announcing 100 bytes with only 3 present.
        let truncated = [0x0a, 100, b'a', b'b', b'c'];
        let err = v1::Goal::decode(truncated.as_slice()).unwrap_err();
        assert!(err.to_string().contains("buffer underflow"), "{err}");
        // A wire type that does not match the field's type.
        let wrong_type = [0x10 | 0x02, 1, 0];
        assert!(v1::Goal::decode(wrong_type.as_slice()).is_err());
    }

    #[test]
    fn unknown_field_numbers_are_skipped_for_rolling_upgrades() {
        let mut bytes = v1::Goal {
            node: "a".into(),
            state: v1::GoalState::Single.into(),
            epoch: 3,
            ..Default::default()
        }
        .encode_to_vec();
        // Field 99, varint 1: a field a newer monitor might add.
        bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
        let decoded = v1::Goal::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(Goal::try_from(decoded).expect("valid").epoch, Epoch(3));
    }
}
