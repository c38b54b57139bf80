//! The catalog as the Raft state machine: commands travel as JSON, outcomes come back as JSON,
//! and a read-only copy of the catalog is published on a watch channel for the gRPC services
//! (readers never lock the state machine).
//!
//! Publishing clones the whole catalog, which dominated the monitor's CPU when batches were
//! applied hundreds of times a second (a profile of the benchmark: 57% of all CPU). So a batch
//! is published at once only if the previous publication is at least [`PUBLISH_EVERY`] old;
//! otherwise it waits for the next flush: the Raft thread flushes on every tick and before it
//! answers a linearizable read, so readers that need the latest state get it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::catalog::{Catalog, Command, Outcome, Rejected};
use crate::consensus::StateMachine;

/// Minimum spacing of publications while batches keep coming.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct CatalogMachine {
    catalog: Catalog,
    published: watch::Sender<Arc<Catalog>>,
    last_publish: Instant,
    dirty: bool,
}

impl CatalogMachine {
    pub fn new() -> (Self, watch::Receiver<Arc<Catalog>>) {
        let (published, rx) = watch::channel(Arc::new(Catalog::new()));
        (
            Self {
                catalog: Catalog::new(),
                published,
                last_publish: Instant::now(),
                dirty: false,
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
        self.dirty = true;
        self.flush();
        Ok(())
    }

    fn after_batch(&mut self, _applied: u64) {
        self.dirty = true;
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.dirty {
            self.published.send_replace(Arc::new(self.catalog.clone()));
            self.last_publish = Instant::now();
            self.dirty = false;
        }
    }
}
