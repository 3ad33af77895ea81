//! The protocol between agents: what a source asks a destination for a host move
//! (`incoming`, then `finish` or `abort`), what the destination answers, the storage a
//! host + storage move brings along, and the migration settings a caller may give.

use std::collections::BTreeMap;

use crate::error::{bail, Result};
use datastore::Owner;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vm_glue::spec::VmSpec;

/// Migration settings a caller may give.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// Longest acceptable stop of the guest at switchover (ms; QEMU's default 300).
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit (bytes/s).
    pub bandwidth: Option<u64>,
    /// Parallel migration connections (multifd) when more than 1.
    pub multifd_channels: Option<u32>,
    /// Give up (and stay on the source) after this long (s; default 300).
    pub timeout_s: Option<u64>,
}

impl MigrateParams {
    /// Refuses values out of range (errors name the field), before anything is handed over.
    pub fn check(&self) -> Result<()> {
        fn within<T: PartialOrd + std::fmt::Display + Copy>(
            field: &str,
            v: Option<T>,
            lo: T,
            hi: T,
            unit: &str,
        ) -> Result<()> {
            match v {
                Some(v) if v < lo || v > hi => {
                    bail!("`{field}` = {v}: must be {lo} to {hi}{unit}")
                }
                _ => Ok(()),
            }
        }
        within("downtime_ms", self.downtime_ms, 1, 600_000, " ms")?;
        within("bandwidth", self.bandwidth, 1 << 20, 1 << 40, " bytes/s")?;
        within("multifd_channels", self.multifd_channels, 1, 16, "")?;
        within("timeout_s", self.timeout_s, 1, MAX_TIMEOUT_S, " s")
    }
}

/// The longest relocation a caller may allow (one day).
pub const MAX_TIMEOUT_S: u64 = 86_400;

/// How long the destination waits for its side of the migration to complete once the
/// source asked it to finish (the source's `finish` call waits longer).
pub const COMPLETION_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the destination answers to `incoming`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incoming {
    /// Where the source QEMU migrates to (`tcp:ADDR:PORT`).
    pub uri: String,
    /// The destination's owner identity per datastore uuid (for lock handoffs).
    pub owners: BTreeMap<Uuid, Owner>,
    /// With `storage`: the destination's NBD address (TCP) serving the new files.
    #[serde(default)]
    pub nbd: Option<String>,
    /// With `storage`: the definition the VM will run from there (the new files).
    #[serde(default)]
    pub spec: Option<VmSpec>,
}

/// What the source sends to `incoming`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingReq {
    pub spec: VmSpec,
    /// The datastore holding the definition (label).
    pub home: String,
    pub source_host: String,
    /// The source's owner identity per datastore: where locks go back if the source
    /// never finishes or aborts the move.
    #[serde(default)]
    pub source_owners: BTreeMap<Uuid, Owner>,
    /// The destination removes the incoming VM by itself if the move has not finished
    /// this long after it began (s).
    #[serde(default)]
    pub give_up_s: Option<u64>,
    /// Host + storage at once: the disks that move to new files on the destination's
    /// datastores, and the definition's new datastore ([`crate::relocation::targets`]).
    #[serde(default)]
    pub storage: Option<NewStorage>,
    /// Parallel migration connections (the destination must expect them too).
    #[serde(default)]
    pub multifd_channels: Option<u32>,
    /// Names this attempt: an abort for another (an earlier attempt's retried abort)
    /// leaves it alone.
    #[serde(default)]
    pub attempt: Option<String>,
    /// A powered-off VM's host + storage move: only the new files, no QEMU
    /// ([`crate::relocation::cold_move`]).
    #[serde(default)]
    pub cold: bool,
}

/// One disk's new home, as the source asks for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDisk {
    /// Datastore label (on the destination).
    pub datastore: String,
    /// `thin`, `lazy-thick` or `eager-thick`.
    pub provisioning: String,
    /// Bytes the source file has allocated (what a thin copy needs).
    pub allocated: u64,
}

/// The storage half of a host + storage move.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStorage {
    /// Disks that move to new files, by disk name. The others stay on their (shared)
    /// datastores and change owner as in a host-only move.
    pub disks: BTreeMap<String, NewDisk>,
    /// The definition's datastore after the move (label).
    pub home: String,
    /// The generation and slot of the definition the source runs from.
    pub generation: u64,
    pub slot: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        let ok = MigrateParams {
            downtime_ms: Some(300),
            bandwidth: Some(1 << 30),
            multifd_channels: Some(4),
            timeout_s: Some(600),
        };
        ok.check().unwrap();
        MigrateParams::default().check().unwrap();
        // A huge timeout overflowed the destination's give-up time (a panic after the
        // definition was handed over).
        for (p, field) in [
            (
                MigrateParams {
                    timeout_s: Some(u64::MAX),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                MigrateParams {
                    timeout_s: Some(0),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                MigrateParams {
                    downtime_ms: Some(0),
                    ..ok.clone()
                },
                "downtime_ms",
            ),
            (
                MigrateParams {
                    bandwidth: Some(1),
                    ..ok.clone()
                },
                "bandwidth",
            ),
            (
                MigrateParams {
                    multifd_channels: Some(1000),
                    ..ok.clone()
                },
                "multifd_channels",
            ),
        ] {
            let e = p.check().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
