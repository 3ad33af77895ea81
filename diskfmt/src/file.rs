//! [`DirectFile`]: byte-granular async I/O on a regular file or block device opened with
//! `O_DIRECT`, executed by an [`Engine`].
//!
//! This is where alignment is handled. Requests are widened to the device's direct-I/O
//! alignment and split into engine-buffer-sized chunks that run concurrently. A write
//! that does not cover whole aligned blocks reads the partial head and tail blocks first
//! (read-modify-write) while holding an exclusive [`RangeLock`] on its aligned span, so an
//! overlapping write can never be undone by a stale block; aligned writes hold the span
//! shared. The lock guard travels with each engine request and is released only after the
//! kernel completed it.
//!
//! The file length is not a virtual disk size: writes past the end extend a regular file
//! (the qcow2 driver relies on that); [`crate::raw::RawImage`] bounds requests itself.
//!
//! Flush errors are sticky: after a failed `fdatasync` the kernel may have dropped the
//! data it could not write and cleared the error, so every later flush of the same
//! `DirectFile` fails too, until the file is reopened.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::engine::{Engine, OpKind, BUF_SIZE};
use crate::rangelock::{RangeGuard, RangeLock};
use crate::{sys, Error, Result};

/// How many chunk requests one call keeps in flight at most.
const CHUNKS_IN_FLIGHT: usize = 16;
/// How many short reads in a row that bring not one whole block a read retries.
const SHORT_READ_RETRIES: u32 = 3;

/// A file or block device doing direct I/O through an engine.
#[derive(Debug)]
pub struct DirectFile {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    engine: Engine,
    align: u64,
    physical: u32,
    blockdev: bool,
    writable: bool,
    len: AtomicU64,
    locks: Arc<RangeLock>,
    /// The first flush error, if a flush failed: every later flush fails with it.
    flush_failed: std::sync::Mutex<Option<String>>,
}

/// How to open a [`DirectFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Existing object, read-only.
    ReadOnly,
    /// Existing object, read-write.
    ReadWrite,
    /// New regular file; fails if it exists.
    CreateNew,
    /// Regular file, created or truncated to zero.
    CreateTruncate,
}

impl DirectFile {
    /// Opens `path` with `O_DIRECT` (falling back to buffered I/O on file systems that
    /// refuse it, such as tmpfs).
    pub fn open(path: &Path, mode: OpenMode, engine: Engine) -> Result<Self> {
        let mut direct = true;
        let opened = match open_options(mode, true).open(path) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The file system refuses O_DIRECT (tmpfs). A create may already have made
                // the file, so the retry must not insist on creating it.
                direct = false;
                let retry = if mode == OpenMode::CreateNew {
                    OpenMode::ReadWrite
                } else {
                    mode
                };
                open_options(retry, false).open(path)
            }
            r => r,
        };
        let file = opened.map_err(|e| match (mode, e.kind()) {
            (OpenMode::CreateNew, std::io::ErrorKind::AlreadyExists) => Error::Exists {
                object: path.to_path_buf(),
            },
            _ => Error::open(path, "open", e),
        })?;
        if !direct {
            tracing::debug!("{}: O_DIRECT refused, using buffered I/O", path.display());
        }
        let meta = file.metadata().map_err(|e| Error::open(path, "stat", e))?;
        let fd: OwnedFd = file.into();
        let blockdev = meta.file_type().is_block_device();
        let (len, align, physical) = if blockdev {
            let (size, l, p) = block_device_geometry(path, fd.as_fd())?;
            (size, l as u64, p)
        } else if meta.file_type().is_file() {
            let statx = sys::dio_offset_align(fd.as_fd());
            #[cfg(test)]
            let statx = statx.filter(|_| !tests::NO_STATX_DIOALIGN.get());
            // Without statx's answer, the logical block size of the device under the
            // file; 512 only where there is no such device (NFS, FUSE, tmpfs).
            let align = statx
                .or_else(|| sys::dev_logical_block_size(meta.dev()))
                .unwrap_or(512)
                .max(512);
            (meta.len(), align as u64, 4096)
        } else {
            return Err(Error::invalid(
                path,
                "is neither a regular file nor a block device",
            ));
        };
        Ok(DirectFile {
            path: path.to_path_buf(),
            fd: Arc::new(fd),
            engine,
            align,
            physical,
            blockdev,
            writable: mode != OpenMode::ReadOnly,
            len: AtomicU64::new(len),
            locks: Arc::default(),
            flush_failed: Default::default(),
        })
    }

    /// The path this was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine executing this file's I/O.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Current length (file size, or device size).
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is a block device.
    pub fn is_blockdev(&self) -> bool {
        self.blockdev
    }

    /// Whether opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Direct-I/O alignment (the logical block size).
    pub fn align(&self) -> u32 {
        self.align as u32
    }

    /// Physical block size.
    pub fn physical_block_size(&self) -> u32 {
        self.physical
    }

    /// The descriptor, for metadata calls (seek data/hole, stat).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes allocated on the host (device size for block devices).
    pub fn allocated_bytes(&self) -> Result<u64> {
        if self.blockdev {
            return Ok(self.len());
        }
        let file = std::fs::File::from(
            self.fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::open(&self.path, "stat", e))?,
        );
        let meta = file
            .metadata()
            .map_err(|e| Error::open(&self.path, "stat", e))?;
        Ok(meta.blocks() * 512)
    }

    /// The length as the kernel sees it now (`fstat`, or the device size): unlike
    /// [`DirectFile::len`], it includes writes that finished but whose callers have not
    /// yet seen their completion.
    pub fn real_len(&self) -> Result<u64> {
        if self.blockdev {
            return sys::blkdev_size(self.fd.as_fd())
                .map_err(|e| Error::open(&self.path, "size", e));
        }
        let file = std::fs::File::from(
            self.fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::open(&self.path, "stat", e))?,
        );
        let meta = file
            .metadata()
            .map_err(|e| Error::open(&self.path, "stat", e))?;
        Ok(meta.len())
    }

    /// Grows a regular file to at least `len` bytes, never shrinking it, and returns the
    /// length it had. Safe against concurrent writes: it first waits for, and blocks,
    /// every write or allocation that reaches past `len` (they hold their range until the
    /// kernel completed them), so no write that grew the file further can be cut off
    /// between reading the length and extending it.
    pub async fn extend_to(&self, len: u64) -> Result<u64> {
        self.check_writable(len)?;
        let _guard = self.locks.lock(self.align_down(len), u64::MAX, true).await;
        let before = self.real_len()?;
        if before < len && !self.blockdev {
            let file = std::fs::File::from(
                self.fd
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| Error::io(&self.path, "resize", len, e))?,
            );
            file.set_len(len)
                .map_err(|e| Error::io(&self.path, "resize", len, e))?;
        }
        if !self.blockdev {
            self.len.fetch_max(before.max(len), Ordering::AcqRel);
        }
        Ok(before)
    }

    /// Sets the length of a regular file, shrinking it if `len` is smaller: only for an
    /// explicit resize, with no I/O past `len` in flight (use [`DirectFile::extend_to`]
    /// to grow a file that is in use).
    pub fn set_len(&self, len: u64) -> Result<()> {
        let file = std::fs::File::from(
            self.fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(&self.path, "resize", len, e))?,
        );
        file.set_len(len)
            .map_err(|e| Error::io(&self.path, "resize", len, e))?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn align_down(&self, v: u64) -> u64 {
        v & !(self.align - 1)
    }

    fn align_up(&self, v: u64) -> u64 {
        (v + self.align - 1) & !(self.align - 1)
    }

    /// Reads `dst.len()` bytes at `offset`; bytes past the end of a file read as zeros.
    pub async fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let end = offset + dst.len() as u64;
        let (astart, aend) = (self.align_down(offset), self.align_up(end));
        let mut pieces = Vec::new();
        let mut rest = dst;
        let mut cs = astart;
        while cs < aend {
            let ce = (cs + BUF_SIZE as u64).min(aend);
            let lo = cs.max(offset);
            let hi = ce.min(end);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut((hi - lo) as usize);
            rest = tail;
            pieces.push((cs, ce, lo, mine));
            cs = ce;
        }
        let reads: Vec<_> = pieces
            .into_iter()
            .map(|(cs, ce, lo, mine)| self.read_chunk(cs, ce, lo, mine))
            .collect();
        run_bounded(reads).await
    }

    /// Reads aligned `cs..ce` (at most one buffer) and copies the part from `lo` to `dst`.
    ///
    /// A short read is end of file only if it reached the real end (read again now: the
    /// file may have grown); then the rest reads as zeros. Anywhere else it is a failed
    /// read (NFS and FUSE report some errors as a short count): the whole blocks that did
    /// arrive are kept and the rest is read again, and a read that keeps making no
    /// progress is an error, never zeros (inside a read-modify-write, zeros would be
    /// written back over the neighbouring sectors).
    async fn read_chunk(&self, cs: u64, ce: u64, lo: u64, dst: &mut [u8]) -> Result<()> {
        let len = (ce - cs) as usize;
        let mut buf = self.engine.buffer(len).await;
        let mut got = 0;
        let mut stalled = 0;
        while got < len {
            let pos = cs + got as u64;
            let want = len - got;
            let kind = OpKind::Read {
                buf,
                at: got,
                len: want,
            };
            let done = self.engine.run(&self.fd, pos, kind, None).await;
            let n = done
                .res
                .map_err(|e| Error::io(&self.path, "read", pos, e))?;
            buf = done.buf.expect("reads return their buffer");
            if n >= want {
                break;
            }
            let end = self.real_len()?;
            if pos + n as u64 >= end {
                buf.as_mut_slice()[got + n..len].fill(0);
                break;
            }
            let whole = self.align_down(n as u64) as usize;
            stalled = if whole == 0 { stalled + 1 } else { 0 };
            if stalled > SHORT_READ_RETRIES {
                return Err(Error::io(
                    &self.path,
                    "read",
                    pos,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "short read ({n} of {want} bytes) before the end of the file \
                             ({end} bytes), {stalled} times in a row: the storage is failing \
                             reads (check the device, or the NFS or FUSE server)"
                        ),
                    ),
                ));
            }
            got += whole;
        }
        let from = (lo - cs) as usize;
        dst.copy_from_slice(&buf.as_slice()[from..from + dst.len()]);
        Ok(())
    }

    /// Writes `src` at `offset` (durably if `fua`).
    pub async fn write_at(&self, offset: u64, src: &[u8], fua: bool) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.check_writable(offset)?;
        let end = offset + src.len() as u64;
        let (astart, aend) = (self.align_down(offset), self.align_up(end));
        let aligned = astart == offset && aend == end;
        let guard = self.locks.lock(astart, aend, !aligned).await;
        let a = self.align as usize;
        let mut head = Vec::new();
        let mut tail = Vec::new();
        if offset > astart {
            head = vec![0u8; a];
            self.read_at(astart, &mut head).await?;
        }
        if end < aend {
            if aend - a as u64 == astart && !head.is_empty() {
                tail = head.clone();
            } else {
                tail = vec![0u8; a];
                self.read_at(aend - a as u64, &mut tail).await?;
            }
        }
        let (head, tail) = (&head, &tail);
        let writes: Vec<_> = chunk_ranges(astart, aend)
            .into_iter()
            .map(|(cs, ce)| {
                let guard = Arc::clone(&guard);
                async move {
                    let mut buf = self.engine.buffer((ce - cs) as usize).await;
                    let b = buf.as_mut_slice();
                    if cs < offset {
                        b[..a].copy_from_slice(head);
                    }
                    if ce > end {
                        let t0 = (aend - a as u64 - cs) as usize;
                        b[t0..t0 + a].copy_from_slice(tail);
                    }
                    let lo = cs.max(offset);
                    let hi = ce.min(end);
                    b[(lo - cs) as usize..(hi - cs) as usize]
                        .copy_from_slice(&src[(lo - offset) as usize..(hi - offset) as usize]);
                    self.submit_write(cs, buf, (ce - cs) as usize, fua, guard)
                        .await
                }
            })
            .collect();
        run_bounded(writes).await?;
        if !self.blockdev {
            self.len.fetch_max(aend, Ordering::AcqRel);
        }
        Ok(())
    }

    async fn submit_write(
        &self,
        cs: u64,
        buf: crate::engine::IoBuf,
        len: usize,
        fua: bool,
        guard: Arc<RangeGuard>,
    ) -> Result<()> {
        let done = self
            .engine
            .run(
                &self.fd,
                cs,
                OpKind::Write {
                    buf,
                    len,
                    dsync: fua,
                },
                Some(guard),
            )
            .await;
        let n = done
            .res
            .map_err(|e| Error::io(&self.path, "write", cs, e))?;
        if n != len {
            return Err(Error::io(
                &self.path,
                "write",
                cs,
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short write ({n} of {len} bytes)"),
                ),
            ));
        }
        Ok(())
    }

    /// Writes real zeros (allocating space) to `offset..offset+len`.
    pub async fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_writable(offset)?;
        let end = offset + len;
        let (mstart, mend) = (self.align_up(offset), self.align_down(end));
        if mstart >= mend {
            return self.write_at(offset, &vec![0u8; len as usize], false).await;
        }
        if offset < mstart {
            self.write_at(offset, &vec![0u8; (mstart - offset) as usize], false)
                .await?;
        }
        if mend < end {
            self.write_at(mend, &vec![0u8; (end - mend) as usize], false)
                .await?;
        }
        let guard = self.locks.lock(mstart, mend, false).await;
        let writes: Vec<_> = chunk_ranges(mstart, mend)
            .into_iter()
            .map(|(cs, ce)| {
                let guard = Arc::clone(&guard);
                async move {
                    let mut buf = self.engine.buffer((ce - cs) as usize).await;
                    buf.as_mut_slice()[..(ce - cs) as usize].fill(0);
                    self.submit_write(cs, buf, (ce - cs) as usize, false, guard)
                        .await
                }
            })
            .collect();
        run_bounded(writes).await?;
        if !self.blockdev {
            self.len.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    /// `fallocate(mode)` on `offset..offset+len`, exclusive against overlapping writes.
    pub async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_writable(offset)?;
        let guard = self
            .locks
            .lock(self.align_down(offset), self.align_up(offset + len), true)
            .await;
        let done = self
            .engine
            .run(
                &self.fd,
                offset,
                OpKind::Fallocate { mode, len },
                Some(guard),
            )
            .await;
        done.res
            .map_err(|e| Error::io(&self.path, "allocate", offset, e))?;
        if !self.blockdev && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            self.len.fetch_max(offset + len, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Makes completed writes durable (`fdatasync`). Fails for good once a flush failed.
    pub async fn sync(&self) -> Result<()> {
        self.check_flushes()?;
        let done = self
            .engine
            .run(&self.fd, 0, OpKind::Fsync { datasync: true }, None)
            .await;
        match done.res {
            // A flush that failed meanwhile may have taken the error this one should see.
            Ok(_) => self.check_flushes(),
            Err(e) => {
                let mut first = self.flush_failed.lock().expect("flush state lock");
                first.get_or_insert_with(|| e.to_string());
                Err(Error::io(&self.path, "flush", 0, e))
            }
        }
    }

    fn check_flushes(&self) -> Result<()> {
        match &*self.flush_failed.lock().expect("flush state lock") {
            None => Ok(()),
            Some(first) => Err(Error::io(
                &self.path,
                "flush",
                0,
                std::io::Error::other(format!(
                    "an earlier flush failed ({first}), so data written before it may be \
                     lost; reopen the file, and check its content, before trusting a flush"
                )),
            )),
        }
    }

    fn check_writable(&self, offset: u64) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::io(
                &self.path,
                "write",
                offset,
                std::io::Error::from_raw_os_error(libc::EBADF),
            ))
        }
    }
}

/// Size, logical and physical sector size of a block device (no engine needed).
pub fn block_device_geometry(path: &Path, fd: BorrowedFd<'_>) -> Result<(u64, u32, u32)> {
    let size = sys::blkdev_size(fd).map_err(|e| Error::open(path, "size", e))?;
    let (l, p) = sys::blkdev_sector_sizes(fd).map_err(|e| Error::open(path, "probe", e))?;
    let l = l.max(512);
    Ok((size, l, p.max(l)))
}

/// Runs already-built futures with at most [`CHUNKS_IN_FLIGHT`] polled at once. After
/// the first error no new one starts, but every one already started is driven to its end
/// before that error is returned: a failed request never returns while a sibling chunk is
/// still in the kernel, where it could overtake the caller's retry. (Building the futures
/// first keeps this free of closures over borrowed data, which the `Send` bound on trait
/// futures cannot see through.)
async fn run_bounded<F>(futs: Vec<F>) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let mut queued = futs.into_iter();
    let mut running = FuturesUnordered::new();
    let mut first_err = None;
    loop {
        while first_err.is_none() && running.len() < CHUNKS_IN_FLIGHT {
            match queued.next() {
                Some(f) => running.push(f),
                None => break,
            }
        }
        match running.next().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None => break,
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Splits `start..end` into engine-buffer-sized pieces.
fn chunk_ranges(start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::with_capacity(((end - start) / BUF_SIZE as u64 + 1) as usize);
    let mut cs = start;
    while cs < end {
        let ce = (cs + BUF_SIZE as u64).min(end);
        v.push((cs, ce));
        cs = ce;
    }
    v
}

fn open_options(mode: OpenMode, direct: bool) -> OpenOptions {
    let mut o = OpenOptions::new();
    o.read(true);
    match mode {
        OpenMode::ReadOnly => {}
        OpenMode::ReadWrite => {
            o.write(true);
        }
        OpenMode::CreateNew => {
            o.write(true).create_new(true);
        }
        OpenMode::CreateTruncate => {
            o.write(true).create(true).truncate(true);
        }
    }
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o
}

#[cfg(test)]
mod tests;
