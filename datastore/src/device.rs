//! Synchronous record I/O on the shared device: one 4 KiB record per `pread`/`pwrite`,
//! `O_DIRECT | O_DSYNC`, on a descriptor of its own (never queued behind data I/O).
//!
//! [`RecordIo`] is the seam tests use to inject faults: [`Faults`] delays renewals (the
//! test setting `renew-delay-ms`, see [`crate::failpoint`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::format::{Block, RECORD};
use crate::{Error, Result};

/// Reads and writes whole records.
pub trait RecordIo: Send + Sync + std::fmt::Debug {
    /// Reads record `idx`.
    fn read(&self, idx: u64, buf: &mut Block) -> io::Result<()>;
    /// Writes record `idx` (atomically, durably).
    fn write(&self, idx: u64, buf: &Block) -> io::Result<()>;
    /// Reads `n` consecutive records from `start`.
    fn read_many(&self, start: u64, n: u64) -> io::Result<Vec<Box<Block>>> {
        (start..start + n)
            .map(|i| {
                let mut b = Block::zeroed();
                self.read(i, &mut b).map(|_| b)
            })
            .collect()
    }
    /// Writes `n` consecutive all-zero records from `start` (durably; not atomic as a
    /// whole).
    fn write_zeros(&self, start: u64, n: u64) -> io::Result<()> {
        let z = Block::zeroed();
        (start..start + n).try_for_each(|i| self.write(i, &z))
    }
    /// Writes `blocks` to consecutive records from `start` (durably; not atomic as a
    /// whole).
    fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> io::Result<()> {
        (start..)
            .zip(blocks)
            .try_for_each(|(i, b)| self.write(i, b))
    }
    /// The device path (for messages).
    fn path(&self) -> &Path;
    /// Turns injected faults on (a no-op without a fault seam).
    fn arm_faults(&self) {}
}

/// A shared block device or image file, opened for record I/O.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    size: u64,
    logical: u32,
    physical: u32,
}

impl Device {
    /// Opens a device or image for record I/O.
    pub fn open(path: &Path) -> Result<Device> {
        let err = |e: io::Error| Error::Io {
            object: path.to_path_buf(),
            detail: format!("cannot open: {e}"),
        };
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC);
        let file = o.open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let (size, logical, physical) = if meta.file_type().is_block_device() {
            use std::os::fd::AsFd;
            diskfmt::file::block_device_geometry(path, file.as_fd()).map_err(|e| Error::Io {
                object: path.to_path_buf(),
                detail: e.to_string(),
            })?
        } else {
            (meta.len(), 512, 4096)
        };
        // Records are 4 KiB and must be written atomically: no larger sectors.
        if logical as usize > RECORD || physical as usize > RECORD {
            return Err(Error::Invalid {
                object: path.to_path_buf(),
                detail: format!(
                    "sector size {logical}/{physical} is not supported (records are {RECORD} bytes)"
                ),
            });
        }
        Ok(Device {
            file,
            path: path.to_path_buf(),
            size,
            logical,
            physical,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn logical_sector(&self) -> u32 {
        self.logical
    }

    pub fn physical_sector(&self) -> u32 {
        self.physical
    }
}

impl RecordIo for Device {
    fn read(&self, idx: u64, buf: &mut Block) -> io::Result<()> {
        self.file.read_exact_at(&mut buf.0, idx * RECORD as u64)
    }

    fn write(&self, idx: u64, buf: &Block) -> io::Result<()> {
        self.file.write_all_at(&buf.0, idx * RECORD as u64)
    }

    fn read_many(&self, start: u64, n: u64) -> io::Result<Vec<Box<Block>>> {
        let mut out = Vec::with_capacity(n as usize);
        let mut buf = AlignedBuf::new(BULK);
        let mut i = start;
        while i < start + n {
            let k = (start + n - i).min(BULK as u64 / RECORD as u64);
            let bytes = &mut buf.slice()[..k as usize * RECORD];
            self.file.read_exact_at(bytes, i * RECORD as u64)?;
            for r in bytes.chunks_exact(RECORD) {
                let mut b = Block::zeroed();
                b.0.copy_from_slice(r);
                out.push(b);
            }
            i += k;
        }
        Ok(out)
    }

    fn write_zeros(&self, start: u64, n: u64) -> io::Result<()> {
        let mut buf = AlignedBuf::new(BULK);
        let mut i = start;
        while i < start + n {
            let k = (start + n - i).min(BULK as u64 / RECORD as u64);
            self.file
                .write_all_at(&buf.slice()[..k as usize * RECORD], i * RECORD as u64)?;
            i += k;
        }
        Ok(())
    }

    fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> io::Result<()> {
        let per = BULK / RECORD;
        let mut buf = AlignedBuf::new(BULK);
        for (n, chunk) in blocks.chunks(per).enumerate() {
            let bytes = &mut buf.slice()[..chunk.len() * RECORD];
            for (dst, b) in bytes.chunks_exact_mut(RECORD).zip(chunk) {
                dst.copy_from_slice(&b.0);
            }
            self.file
                .write_all_at(bytes, (start + (n * per) as u64) * RECORD as u64)?;
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Bulk record I/O moves up to this many bytes per system call.
const BULK: usize = 1 << 20;

/// A zeroed, 4 KiB-aligned byte buffer (an over-allocated `Vec`, sliced at the first
/// aligned address: no unsafe code needed).
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + RECORD];
        let off = v.as_ptr().align_offset(RECORD);
        AlignedBuf { v, off, len }
    }
    fn slice(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Fault injection around a [`RecordIo`]: delays writes to a range of records.
#[derive(Debug)]
pub struct Faults<T> {
    inner: T,
    /// Delay added to every write of a record in `delayed`, once armed.
    pub write_delay: Duration,
    pub delayed: std::ops::Range<u64>,
    armed: std::sync::atomic::AtomicBool,
}

impl<T: RecordIo> Faults<T> {
    pub fn new(inner: T, write_delay: Duration, delayed: std::ops::Range<u64>) -> Self {
        Faults {
            inner,
            write_delay,
            delayed,
            armed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl<T: RecordIo> RecordIo for Faults<T> {
    fn read(&self, idx: u64, buf: &mut Block) -> io::Result<()> {
        self.inner.read(idx, buf)
    }

    fn write(&self, idx: u64, buf: &Block) -> io::Result<()> {
        if self.armed.load(std::sync::atomic::Ordering::SeqCst) && self.delayed.contains(&idx) {
            std::thread::sleep(self.write_delay);
        }
        self.inner.write(idx, buf)
    }

    fn read_many(&self, start: u64, n: u64) -> io::Result<Vec<Box<Block>>> {
        self.inner.read_many(start, n)
    }

    fn write_zeros(&self, start: u64, n: u64) -> io::Result<()> {
        self.inner.write_zeros(start, n)
    }

    fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> io::Result<()> {
        self.inner.write_many(start, blocks)
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn arm_faults(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
