//! Errors of the block I/O layer.
//!
//! Every error names the object (a path, or a device) it concerns, and where it makes sense
//! the byte offset. `Error::kind()` gives a small matchable classification that callers act
//! on (a full disk, an unsupported feature, corruption) without parsing messages.
//! Messages are one line and already include the operating-system cause, so they are
//! printed as they are (the cause is not chained a second time).

use std::io;
use std::path::{Path, PathBuf};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as a caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error from the operating system.
    Io,
    /// The device or file system is full.
    NoSpace,
    /// The object does not exist.
    NotFound,
    /// The object exists and would be overwritten.
    Exists,
    /// The image uses a feature ferry does not support.
    Unsupported,
    /// The image's metadata is damaged or not what it claims to be.
    Corrupt,
    /// The request itself is wrong (out of range, bad size, read-only image).
    InvalidInput,
}

/// An error of the block I/O layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on an object.
    #[error("{}: {op} at offset {offset} failed: {err}", object.display())]
    Io {
        object: PathBuf,
        op: &'static str,
        offset: u64,
        err: io::Error,
    },
    /// Opening or creating an object failed.
    #[error("{}: cannot {op}: {err}", object.display())]
    Open {
        object: PathBuf,
        op: &'static str,
        err: io::Error,
    },
    /// The object already exists.
    #[error("{}: already exists (use --force to overwrite it)", object.display())]
    Exists { object: PathBuf },
    /// A feature of the image is not supported.
    #[error("{}: {feature} is not supported{hint}", object.display())]
    Unsupported {
        object: PathBuf,
        feature: String,
        hint: String,
    },
    /// The image's metadata is damaged.
    #[error("{}: corrupt image: {detail}", object.display())]
    Corrupt { object: PathBuf, detail: String },
    /// A request that cannot be honoured as asked.
    #[error("{}: {detail}", object.display())]
    Invalid { object: PathBuf, detail: String },
}

impl Error {
    /// The matchable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { err, .. } | Error::Open { err, .. } => io_kind(err),
            Error::Exists { .. } => ErrorKind::Exists,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Invalid { .. } => ErrorKind::InvalidInput,
        }
    }

    pub(crate) fn io(object: &Path, op: &'static str, offset: u64, err: io::Error) -> Self {
        Error::Io {
            object: object.to_path_buf(),
            op,
            offset,
            err,
        }
    }

    pub(crate) fn open(object: &Path, op: &'static str, err: io::Error) -> Self {
        Error::Open {
            object: object.to_path_buf(),
            op,
            err,
        }
    }

    pub(crate) fn invalid(object: &Path, detail: impl Into<String>) -> Self {
        Error::Invalid {
            object: object.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub(crate) fn corrupt(object: &Path, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(object: &Path, feature: impl Into<String>, hint: &str) -> Self {
        Error::Unsupported {
            object: object.to_path_buf(),
            feature: feature.into(),
            hint: if hint.is_empty() {
                String::new()
            } else {
                format!(" ({hint})")
            },
        }
    }
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EEXIST) => ErrorKind::Exists,
        Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
        Some(libc::EINVAL) | Some(libc::EROFS) | Some(libc::EBADF) => ErrorKind::InvalidInput,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::InvalidInput,
            _ => ErrorKind::Io,
        },
    }
}
