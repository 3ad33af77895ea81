//! `datastore` owns ferry's clustered on-disk format (DESIGN §3): several hosts share one
//! block device, each through its own path, and never both write the same object.
//!
//! - [`format`]: the records (superblock, heartbeat slots, volume-lease leader and
//!   ballots, lock records), each one 4 KiB block with magic, version, generation, crc32c.
//! - [`device`]: synchronous `O_DIRECT|O_DSYNC` record I/O, and the fault seam.
//! - [`clock`]: the only time source of lease logic (`CLOCK_BOOTTIME`, or a test clock).
//! - [`store`]: open / format, and the [`store::Observer`] that judges liveness.
//! - [`hostlease`]: delta leases — join, renew on a thread of their own, leave.
//! - [`paxos`]: the volume lease, by Disk Paxos.
//! - [`locks`]: object locks (exclusive, shared, multi-writer), handoff, breaking.
//! - [`fence`]: the host cgroup and the watchdog supervisor that empties it.
//! - [`failpoint`]: named test hooks; the shipped binary installs none.
//!
//! Safety needs only atomic single-record writes: no compare-and-swap, no host-local
//! locks, no wall-clock time. Files, directories and space are in [`files`] (descriptors in
//! [`filerec`]), made crash-atomic by each host's redo [`journal`]; [`check`] verifies a
//! datastore and repairs what a dead host left.
#![forbid(unsafe_code)]

pub mod check;
pub mod clock;
pub mod device;
pub mod failpoint;
pub mod fence;
pub mod filerec;
pub mod files;
pub mod format;
pub mod hostlease;
pub mod journal;
pub mod locks;
pub mod paxos;
pub mod store;

use std::path::PathBuf;

pub use format::{LockMode, Owner, Profile, Superblock};
pub use store::{Datastore, Observer};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the datastore. Messages are one line and name the device or object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {detail}", object.display())]
    Io { object: PathBuf, detail: String },
    #[error("{}: {detail}", object.display())]
    Invalid { object: PathBuf, detail: String },
    #[error("{}: not a ferry datastore{detail}", object.display())]
    NotDatastore { object: PathBuf, detail: String },
    #[error("{}: {detail}", object.display())]
    Exists { object: PathBuf, detail: String },
    /// A lock is held by others.
    #[error("lock {object:?} is held {mode} by {holders}")]
    LockHeld {
        object: String,
        mode: String,
        holders: String,
    },
    /// The host lease was lost: locks are no longer valid.
    #[error("{}: host lease lost: {detail}", object.display())]
    LeaseLost { object: PathBuf, detail: String },
    /// Waited too long.
    #[error("{what}: gave up after {secs:.1}s")]
    Timeout { what: String, secs: f64 },
    /// The datastore has no free block left for this host.
    #[error("{}: no space left: {detail}", object.display())]
    NoSpace { object: PathBuf, detail: String },
    /// No such file or folder.
    #[error("{}: no such file or folder", object.display())]
    NotFound { object: PathBuf },
    /// A data I/O error from the block layer.
    #[error(transparent)]
    Block(#[from] diskfmt::Error),
}

impl Error {
    pub(crate) fn io(object: &std::path::Path, op: &str, e: std::io::Error) -> Error {
        Error::Io {
            object: object.to_path_buf(),
            detail: format!("{op} failed: {e}"),
        }
    }
}
