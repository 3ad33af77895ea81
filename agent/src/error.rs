//! The agent's errors: what failed, on which object, and of which [`Kind`]. The kind, not
//! the message, decides the HTTP status the API answers ([`Kind::status`]), travels in
//! every error reply (`{"error": …, "kind": …}`), and is what a peer agent or the CLI
//! acts on.
//!
//! Inside the crate errors are made with [`fail!`] / [`bail!`] (kind `failed`), with
//! the constructors of a kind ([`Error::not_found`], [`Error::invalid`],
//! [`Error::busy`], …), or come from the layers below (datastore, disk, VM definition,
//! QMP); [`Context`] adds what was being done, keeping the kind.

use std::fmt::Display;

use serde::{Deserialize, Serialize};

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// No such VM, datastore, export, task or file.
    NotFound,
    /// The request is wrong: fix it and ask again.
    Invalid,
    /// The object is busy or in a state that does not allow this (another relocation
    /// runs, another host holds its lock, it is not running): wait, or end the other work.
    Conflict,
    /// A datastore has not enough free space.
    NoSpace,
    /// Another host's agent could not be reached, or did not answer in time.
    PeerUnreachable,
    /// The VM already runs on the host that answered: its move there happened.
    RunsThere,
    /// Whether a change landed is not known yet; nothing is undone until it is.
    InDoubt,
    /// The operation failed.
    Failed,
}

impl Kind {
    /// The HTTP status the API answers for this kind.
    pub fn status(self) -> u16 {
        match self {
            Kind::NotFound => 404,
            Kind::Invalid => 400,
            Kind::Conflict | Kind::RunsThere | Kind::InDoubt => 409,
            Kind::NoSpace => 507,
            Kind::PeerUnreachable => 502,
            Kind::Failed => 500,
        }
    }
}

/// An error of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A failure of its own kind, with its message.
    #[error("{message}")]
    Of { kind: Kind, message: String },
    /// An error another host's agent answered.
    #[error("host {host}: {message}")]
    Peer {
        host: String,
        kind: Kind,
        message: String,
    },
    #[error(transparent)]
    Datastore(#[from] datastore::Error),
    #[error(transparent)]
    Disk(#[from] diskfmt::Error),
    #[error(transparent)]
    Mirror(#[from] mirror::Error),
    #[error(transparent)]
    Definition(#[from] vm_glue::definition::Error),
    #[error(transparent)]
    Qmp(#[from] vm_glue::qmp::QmpError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// What was being done when `inner` happened (the kind is `inner`'s).
    #[error("{context}: {inner}")]
    Context { context: String, inner: Box<Error> },
}

/// The result of the agent's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind`.
    pub fn of(kind: Kind, message: impl Into<String>) -> Error {
        Error::Of {
            kind,
            message: message.into(),
        }
    }
    /// No such object.
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::of(Kind::NotFound, message)
    }
    /// A wrong request.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::of(Kind::Invalid, message)
    }
    /// Busy, or in a state that does not allow it.
    pub fn busy(message: impl Into<String>) -> Error {
        Error::of(Kind::Conflict, message)
    }
    /// Not enough space.
    pub fn no_space(message: impl Into<String>) -> Error {
        Error::of(Kind::NoSpace, message)
    }
    /// Another agent could not be asked.
    pub fn peer_unreachable(message: impl Into<String>) -> Error {
        Error::of(Kind::PeerUnreachable, message)
    }
    /// Whether a change landed is not known.
    pub fn in_doubt(message: impl Into<String>) -> Error {
        Error::of(Kind::InDoubt, message)
    }

    /// The kind of this error (of the innermost error under its contexts).
    pub fn kind(&self) -> Kind {
        use datastore::Error as D;
        match self {
            Error::Of { kind, .. } | Error::Peer { kind, .. } => *kind,
            Error::Datastore(e) => match e {
                D::NotFound { .. } => Kind::NotFound,
                D::LockHeld { .. } | D::Exists { .. } => Kind::Conflict,
                D::Invalid { .. } => Kind::Invalid,
                D::NoSpace { .. } => Kind::NoSpace,
                _ => Kind::Failed,
            },
            Error::Disk(e) => match e.kind() {
                diskfmt::ErrorKind::InvalidInput => Kind::Invalid,
                _ => Kind::Failed,
            },
            Error::Definition(vm_glue::definition::Error::Invalid { .. })
            | Error::Mirror(mirror::Error::Invalid { .. }) => Kind::Invalid,
            Error::Definition(_) | Error::Mirror(_) | Error::Qmp(_) | Error::Io(_) => Kind::Failed,
            Error::Context { inner, .. } => inner.kind(),
        }
    }

    /// This error, saying what was being done.
    pub fn context(self, context: impl Display) -> Error {
        Error::Context {
            context: context.to_string(),
            inner: Box::new(self),
        }
    }

    /// The datastore error under the contexts, if it is one.
    pub fn datastore(&self) -> Option<&datastore::Error> {
        match self {
            Error::Datastore(e) => Some(e),
            Error::Context { inner, .. } => inner.datastore(),
            _ => None,
        }
    }
}

macro_rules! from_as_failed {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::of(Kind::Failed, e.to_string())
            }
        }
    )*};
}
from_as_failed!(
    serde_json::Error,
    tokio::task::JoinError,
    nix::errno::Errno,
    std::num::ParseIntError,
);

/// Adds what was being done to an error, keeping its kind (as `anyhow::Context` does).
pub trait Context<T> {
    /// With the context `c`.
    fn context<C: Display>(self, c: C) -> Result<T>;
    /// With the context `f()`, made only on error.
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, c: C) -> Result<T> {
        self.map_err(|e| e.into().context(c))
    }
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, c: C) -> Result<T> {
        self.ok_or_else(|| Error::of(Kind::Failed, c.to_string()))
    }
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::of(Kind::Failed, f().to_string()))
    }
}

/// An error of kind `failed` from a format string (or from any `Display`).
macro_rules! fail {
    ($fmt:literal $(, $arg:expr)* $(,)?) => {
        $crate::error::Error::of($crate::error::Kind::Failed, format!($fmt $(, $arg)*))
    };
    ($e:expr $(,)?) => {
        $crate::error::Error::of($crate::error::Kind::Failed, ($e).to_string())
    };
}

/// Returns [`fail!`]`(…)` as the error.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::fail!($($t)*).into())
    };
}

pub(crate) use {bail, fail};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_keeps_the_kind_and_says_what_was_done() {
        let e: Result<()> = Err(Error::not_found("no VM named \"a\""));
        let e = e.context("starting VM a").unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound);
        assert_eq!(e.to_string(), "starting VM a: no VM named \"a\"");
        let e = Error::from(datastore::Error::NoSpace {
            object: "ds0".into(),
            detail: "1 MiB needed, 0 free".into(),
        })
        .context("creating /a/disk0");
        assert_eq!(e.kind(), Kind::NoSpace);
        assert_eq!(e.kind().status(), 507);
        assert!(e.datastore().is_some());
        assert_eq!(fail!("x {}", 1).kind(), Kind::Failed);
        let none: Option<u8> = None;
        assert_eq!(none.context("gone").unwrap_err().to_string(), "gone");
    }
}
