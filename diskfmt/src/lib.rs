//! `diskfmt` owns ferry's block I/O seam and the disk formats users bring.
//!
//! - [`BlockDev`]: the async trait every virtual block device implements (images here;
//!   datastore files, NBD clients and the mirror in other crates).
//! - [`engine`]: dedicated I/O threads, io_uring with registered aligned buffers, or
//!   pread/pwrite when io_uring is unavailable (`FERRY_IO_ENGINE=uring|pread`).
//! - [`file::DirectFile`]: byte-granular `O_DIRECT` I/O on files and block devices
//!   (alignment and serialised read-modify-write live here).
//! - [`raw`] and [`qcow2`]: the image formats, thin / lazy-thick / eager-thick.
//! - [`image`]: format detection, create/open of either format, `info`.
//! - [`convert`] and [`ops`]: conversion with a provisioning choice, compare, hash, map.
//!
//! This crate never decides cluster ownership and knows nothing of datastores or VMs.

pub mod blockdev;
pub mod convert;
pub mod engine;
mod error;
pub mod file;
pub mod image;
pub mod ops;
pub mod qcow2;
mod rangelock;
pub mod raw;
mod sys;
#[cfg(test)]
mod testutil;
pub mod zero;

pub use blockdev::{BlockDev, Extent, ExtentKind, IoFuture, Provisioning, WriteFlags};
pub use engine::{Engine, EngineKind};
pub use error::{Error, ErrorKind, Result};
pub use image::{Format, Image};
