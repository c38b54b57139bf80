//! The catalog as the Raft state machine: commands travel as JSON, outcomes come back as JSON,
//! and after every applied batch a read-only copy of the catalog is published on a watch
//! channel for the gRPC services (readers never lock the state machine).

use std::sync::Arc;

use tokio::sync::watch;

use crate::catalog::{Catalog, Command, Outcome, Rejected};
use crate::consensus::StateMachine;

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

    fn snapshot(&self) -> Vec<u8> {
        self.catalog.to_bytes()
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
