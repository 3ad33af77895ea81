//! The block I/O seam: [`BlockDev`], the one trait every virtual block device in ferry
//! implements (raw and qcow2 images here; datastore files, NBD clients and the mirror later).
//!
//! Futures are `Send` and borrow the caller's buffer only until they complete or are
//! dropped: implementations never let the kernel see caller memory (they bounce through
//! buffers they own), so dropping a future mid-flight is always memory-safe.
//!
//! Semantics every implementation keeps, and the property tests check:
//! - `read` of a range never written, zeroed or discarded returns zeros;
//! - `write_zeroes` and `discard` leave the range reading as zeros (`discard` may also
//!   deallocate; `write_zeroes` deallocates only when `may_unmap` and the image is thin);
//! - `block_status` never reports a range as `Zero` or `Hole` unless it reads as zeros;
//! - a `write` with `fua` is durable when it completes; other writes after `flush`.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::Result;

/// A boxed `Send` future returned by [`BlockDev`] methods.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the write completes.
    pub fua: bool,
}

impl WriteFlags {
    /// A plain write.
    pub const NONE: WriteFlags = WriteFlags { fua: false };
    /// A write that is durable on completion.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// What a range of a device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Allocated, and may hold non-zero data.
    Data,
    /// Allocated (or explicitly marked zero), reads as zeros.
    Zero,
    /// Not allocated, reads as zeros.
    Hole,
}

impl ExtentKind {
    /// Whether the range is known to read as zeros.
    pub fn reads_zero(self) -> bool {
        !matches!(self, ExtentKind::Data)
    }
}

/// A contiguous range with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// How an image's space is provisioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provisioning {
    /// Space is allocated on first write.
    Thin,
    /// Space is allocated at create and reads as zeros until written.
    LazyThick,
    /// Space is allocated and zeroed at create.
    EagerThick,
}

impl Provisioning {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Provisioning::Thin => "thin",
            Provisioning::LazyThick => "lazy-thick",
            Provisioning::EagerThick => "eager-thick",
        }
    }
}

impl std::fmt::Display for Provisioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Provisioning {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "thin" => Ok(Provisioning::Thin),
            "lazy-thick" | "lazy" => Ok(Provisioning::LazyThick),
            "eager-thick" | "eager" => Ok(Provisioning::EagerThick),
            _ => Err(format!(
                "unknown provisioning {s:?}: use thin, lazy-thick or eager-thick"
            )),
        }
    }
}

/// A virtual block device.
///
/// Offsets and lengths are in bytes and need no alignment: implementations align
/// internally. Every request must lie inside `0..size()`.
pub trait BlockDev: Send + Sync + std::fmt::Debug {
    /// A human-readable name for errors and logs (usually the path).
    fn name(&self) -> &std::path::Path;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// The smallest I/O unit the device accepts without read-modify-write.
    fn logical_block_size(&self) -> u32;

    /// The device's preferred I/O unit (e.g. 4096 on 512e disks).
    fn physical_block_size(&self) -> u32;

    /// Whether writes are allowed.
    fn writable(&self) -> bool;

    /// The provisioning of the device's backing storage.
    fn provisioning(&self) -> Provisioning;

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()>;

    /// Writes `buf` at `offset`.
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()>;

    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Makes `length` bytes at `offset` read as zeros, deallocating them if `may_unmap`
    /// and the device is thin.
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()>;

    /// Tells the device `length` bytes at `offset` are unused: they read as zeros
    /// afterwards and thin devices free their space.
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()>;

    /// Describes `offset..offset + length` as a sorted, contiguous list of extents
    /// starting at `offset`. It may stop early (at least one extent is returned); callers
    /// ask again from the end of the last extent.
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>>;
}

/// Checks that `offset..offset+len` lies inside a device of `size` bytes.
pub(crate) fn check_range(
    name: &std::path::Path,
    size: u64,
    offset: u64,
    len: u64,
) -> crate::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::invalid(
            name,
            format!("request at offset {offset} of {len} bytes is beyond the end ({size} bytes)"),
        )),
    }
}
