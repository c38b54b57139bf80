//! Deliberate safety bugs, for the chaos test that proves its checker can fail
//! (`tests/tests/chaos.rs`, `a_broken_build_fails_the_checker`).
//!
//! Only a build with the `deliberately-broken` feature reads `HA_MONITOR_BREAK`; every other
//! build (the workspace's, a release, a package) has no way to switch these on: [`active`] is
//! a constant there. The value is a comma-separated list of:
//! - `lease`: a failed primary counts as fenced at once; the promotion does not wait for its
//!   lease to run out.
//! - `sync`: the primary never gets a synchronous standby, and every failover is allowed to
//!   lose data (the promoted standby need not hold every acknowledged write).
//!
//! With synchronous replication intact, `lease` alone is hidden in a two-node group: the
//! promotion cuts the only synchronous stream, so a primary that did not fence itself yet can
//! no longer acknowledge a commit. Both together let a partitioned primary acknowledge writes
//! that the promoted standby never receives, while the two are writable at once.

/// The bugs this process runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breaks {
    pub lease: bool,
    pub sync: bool,
}

impl Breaks {
    /// Parses `HA_MONITOR_BREAK`'s value.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut breaks = Self::default();
        for word in value.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "lease" => breaks.lease = true,
                "sync" => breaks.sync = true,
                other => {
                    return Err(format!(
                        "HA_MONITOR_BREAK: unknown break {other:?} (known: lease, sync)"
                    ));
                }
            }
        }
        Ok(breaks)
    }
}

#[cfg(feature = "deliberately-broken")]
static ACTIVE: std::sync::OnceLock<Breaks> = std::sync::OnceLock::new();

/// Reads `HA_MONITOR_BREAK` once, at start; an unknown word is an error (exit 64).
#[cfg(feature = "deliberately-broken")]
pub fn init() -> Result<Breaks, String> {
    let value = std::env::var("HA_MONITOR_BREAK").unwrap_or_default();
    let breaks = Breaks::parse(&value)?;
    Ok(*ACTIVE.get_or_init(|| breaks))
}

/// The bugs switched on (none unless [`init`] read some).
#[cfg(feature = "deliberately-broken")]
pub fn active() -> Breaks {
    ACTIVE.get().copied().unwrap_or_default()
}

/// Without the feature nothing can switch a bug on.
#[cfg(not(feature = "deliberately-broken"))]
pub const fn active() -> Breaks {
    Breaks {
        lease: false,
        sync: false,
    }
}

#[cfg(test)]
mod tests {
    use super::Breaks;

    #[test]
    fn parses_the_list_and_rejects_unknown_words() {
        assert_eq!(Breaks::parse(""), Ok(Breaks::default()));
        assert_eq!(
            Breaks::parse("lease, sync"),
            Ok(Breaks {
                lease: true,
                sync: true
            })
        );
        assert!(
            Breaks::parse("lease,fsync")
                .unwrap_err()
                .contains("\"fsync\"")
        );
    }
}
