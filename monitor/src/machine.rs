//! The catalog as the Raft state machine: commands travel as JSON, outcomes come back as JSON,
//! and after every applied batch a read-only copy of the catalog is published on a watch
//! channel for the gRPC services (readers never lock the state machine).
//!
//! Publishing after every batch, before the Raft node answers the batch's proposers, is what
//! gives read-your-writes: whatever a proposer was told is applied is already in the catalog
//! every service reads. It stays cheap because the catalog's collections are persistent: the
//! published copy shares structure with the live one, so a publication costs O(1) and the next
//! batch's writes copy only the paths they change.

use std::sync::Arc;

use tokio::sync::watch;

use crate::catalog::{Catalog, Command, Outcome, Rejected};
use crate::consensus::{SnapshotJob, StateMachine};

#[derive(Debug)]
pub struct CatalogMachine {
    catalog: Catalog,
    published: watch::Sender<Arc<Catalog>>,
}

impl CatalogMachine {
    pub fn new() -> (Self, watch::Receiver<Arc<Catalog>>) {
        let (published, rx) = watch::channel(Arc::new(Catalog::new()));
        (
            Self {
                catalog: Catalog::new(),
                published,
            },
            rx,
        )
    }
}

pub fn encode_command(cmd: &Command) -> Vec<u8> {
    serde_json::to_vec(cmd).expect("commands hold only plain data, which always serializes")
}

/// Decodes the output of [`CatalogMachine::apply`].
pub fn decode_outcome(bytes: &[u8]) -> Outcome {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        Err(Rejected::Invalid(format!(
            "monitor answered an unreadable outcome: {e}"
        )))
    })
}

impl StateMachine for CatalogMachine {
    type Output = Vec<u8>;

    fn apply(&mut self, index: u64, data: &[u8]) -> Vec<u8> {
        let outcome = match serde_json::from_slice::<Command>(data) {
            Ok(cmd) => self.catalog.apply(index, &cmd),
            // Every member fails the same way on the same bytes, so this stays deterministic.
            Err(e) => Err(Rejected::Invalid(format!("undecodable command: {e}"))),
        };
        serde_json::to_vec(&outcome).expect("outcomes hold only plain data")
    }

    fn snapshot_job(&self) -> SnapshotJob {
        // O(1): the copy shares structure with the live catalog, which later batches do not
        // change under it.
        let copy = self.catalog.clone();
        Box::new(move || copy.to_bytes())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        self.catalog = Catalog::from_bytes(data).map_err(|e| e.to_string())?;
        self.published.send_replace(Arc::new(self.catalog.clone()));
        Ok(())
    }

    fn after_batch(&mut self, _applied: u64) {
        self.published.send_replace(Arc::new(self.catalog.clone()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use ha_proto::types::{Endpoint, NodeId, NodeKind};

    use super::*;
    use crate::catalog::{Command, Op, Registration};

    fn register(name: &str) -> Vec<u8> {
        encode_command(&Command {
            request_id: format!("register-{name}"),
            at_unix_ms: 1,
            op: Op::RegisterNode {
                node: NodeId::new(name).unwrap(),
                kind: NodeKind::Postgres,
                group: "g".into(),
                endpoint: Endpoint {
                    host: format!("{name}.lan"),
                    port: 5432,
                },
                source: Registration::Config,
                certificate: None,
            },
        })
    }

    #[test]
    fn every_batch_is_published_and_earlier_publications_never_change() {
        let (mut m, rx) = CatalogMachine::new();
        let (p1, p2) = (NodeId::new("p1").unwrap(), NodeId::new("p2").unwrap());
        assert!(decode_outcome(&m.apply(1, &register("p1"))).is_ok());
        m.after_batch(1);
        let first = rx.borrow().clone();
        assert!(
            first.node(&p1).is_some(),
            "the batch is visible once applied"
        );

        assert!(decode_outcome(&m.apply(2, &register("p2"))).is_ok());
        m.after_batch(2);
        let second = rx.borrow().clone();
        assert!(second.node(&p2).is_some());
        assert_eq!(second.applied_index(), 2);
        // The live catalog shares structure with what it published: writing must not leak
        // into a copy a reader still holds.
        assert!(first.node(&p2).is_none());
        assert_eq!(first.applied_index(), 1);
        assert_eq!(first.group("g").unwrap().revision, 1);
        assert_eq!(second.group("g").unwrap().revision, 2);
    }
}
