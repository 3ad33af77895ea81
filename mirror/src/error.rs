//! What a mirror job's control operations (start, ready, pivot, commit) fail with. Guest
//! I/O through a running [`crate::Mirror`] fails with the block layer's own
//! [`diskfmt::Error`], as any [`diskfmt::BlockDev`] does.

use std::path::PathBuf;

/// A mirror job's error; each names the source (or target) it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job cannot start: the target does not fit the source, or the options are wrong.
    #[error("{}: {detail}", object.display())]
    Invalid { object: PathBuf, detail: String },
    /// The job failed (too many target errors in a row); the source stays the disk.
    #[error("{}: mirror failed: {reason}", object.display())]
    Failed { object: PathBuf, reason: String },
    /// The job was cancelled; the source stays the disk.
    #[error("{}: the mirror was cancelled", object.display())]
    Cancelled { object: PathBuf },
    /// The pivot was not done (not in sync in time, requests that did not finish, the
    /// target's flush failed, or a job no longer completing): nothing switched.
    #[error("{}: {detail}", object.display())]
    Pivot { object: PathBuf, detail: String },
}

/// The result of a mirror job's control operations.
pub type Result<T> = std::result::Result<T, Error>;
