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
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::engine::faults::{Fault, Gate, Hook, OpDesc};
    use crate::engine::EngineKind;
    use crate::testutil::{pattern, runtime};

    const LEN: usize = 256 << 10;

    thread_local! {
        /// Makes `open` act as if `statx` reported no direct-I/O alignment.
        pub(super) static NO_STATX_DIOALIGN: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// A file of `LEN` patterned bytes, opened through an engine with `hook`.
    fn patterned(dir: &Path, hook: Hook) -> (DirectFile, Vec<u8>) {
        let path = dir.join("f");
        let data = pattern(9, 0, LEN);
        std::fs::write(&path, &data).unwrap();
        let engine = Engine::with_faults(EngineKind::Uring, hook).unwrap();
        (
            DirectFile::open(&path, OpenMode::ReadWrite, engine).unwrap(),
            data,
        )
    }

    /// A hook making the first `n` reads short (`bytes` transferred), the rest normal.
    fn first_reads_short(n: usize, bytes: usize) -> Hook {
        let count = AtomicUsize::new(0);
        Box::new(move |d: OpDesc| {
            if d.what == "read" && count.fetch_add(1, Ordering::SeqCst) < n {
                Fault::Short(bytes)
            } else {
                Fault::Pass
            }
        })
    }

    /// NFS and FUSE report a failed read as a short count. Before the end of the file that
    /// is not end of file: the rest must be read again, not returned as zeros.
    #[test]
    fn short_read_before_the_end_is_retried_not_zero_filled() {
        let dir = tempfile::tempdir().unwrap();
        for short in [0, 4096, 4096 + 100] {
            let (f, data) = patterned(dir.path(), first_reads_short(1, short));
            let mut back = vec![0u8; LEN];
            runtime().block_on(f.read_at(0, &mut back)).unwrap();
            let bad = back.iter().zip(&data).position(|(a, b)| a != b);
            assert_eq!(
                bad, None,
                "short read of {short} bytes: wrong data from byte {bad:?}"
            );
        }
    }

    /// Inside a read-modify-write a zero-filled head block would be written back over the
    /// sectors around the write.
    #[test]
    fn short_read_inside_read_modify_write_keeps_the_neighbouring_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut data) = patterned(dir.path(), first_reads_short(1, 0));
        let off = 8192 + 100;
        runtime()
            .block_on(f.write_at(off as u64, &[0xAA; 10], false))
            .unwrap();
        data[off..off + 10].fill(0xAA);
        let disk = std::fs::read(dir.path().join("f")).unwrap();
        let bad = disk.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(bad, None, "the write clobbered its block from byte {bad:?}");
    }

    /// A read that keeps coming back short before the end of the file is an error naming
    /// the file, never zeros.
    #[test]
    fn persistently_short_read_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (f, _) = patterned(dir.path(), first_reads_short(usize::MAX, 100));
        let mut back = vec![0u8; 4096];
        let r = runtime().block_on(f.read_at(65536, &mut back));
        let e = r.expect_err("a failing read returned data");
        assert!(e.to_string().contains("short read"), "{e}");
        assert!(
            e.to_string()
                .contains(&dir.path().join("f").display().to_string()),
            "{e}"
        );
    }

    /// A write of several chunks, one of which fails, must not return while a sibling
    /// chunk is still in the kernel: the caller's retry could be overtaken by it.
    #[test]
    fn failed_multi_chunk_write_returns_only_when_no_chunk_is_in_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Gate::new();
        let held = Arc::clone(&gate);
        let hook = move |d: OpDesc| match (d.what, d.offset) {
            ("write", 0) => Fault::Hold(Arc::clone(&held)),
            ("write", o) if o == BUF_SIZE as u64 => Fault::Fail(libc::EIO),
            _ => Fault::Pass,
        };
        let (f, _) = patterned(dir.path(), Box::new(hook));
        let opener = Arc::clone(&gate);
        let opener = std::thread::spawn(move || {
            opener.wait_reached();
            std::thread::sleep(std::time::Duration::from_millis(100));
            opener.open();
        });
        let data = pattern(1, 0, 3 * BUF_SIZE);
        let r = runtime().block_on(f.write_at(0, &data, false));
        let returned_while_held = !gate.is_open();
        opener.join().unwrap();
        let e = r.expect_err("the failed chunk was not reported");
        assert!(
            e.to_string()
                .contains(&format!("write at offset {BUF_SIZE}")),
            "{e}"
        );
        assert!(
            !returned_while_held,
            "the write returned its error while a sibling chunk was still in the kernel"
        );
    }

    /// Runs a command, `None` if it cannot run or fails.
    fn run(cmd: &str, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new(cmd).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A 4096-byte-sector loop device with an ext4 file system mounted; torn down on drop.
    struct Mounted4k {
        dir: tempfile::TempDir,
        dev: String,
    }

    impl Mounted4k {
        fn new() -> Option<Mounted4k> {
            let dir = tempfile::tempdir().ok()?;
            let backing = dir.path().join("backing");
            std::fs::File::create(&backing)
                .ok()?
                .set_len(64 << 20)
                .ok()?;
            let b = backing.to_str()?;
            let dev = run("losetup", &["--find", "--show", "--sector-size", "4096", b])?;
            let m = Mounted4k { dir, dev };
            let mnt = m.mnt();
            std::fs::create_dir(&mnt).ok()?;
            run("mkfs.ext4", &["-q", "-F", &m.dev])?;
            run("mount", &[&m.dev, mnt.to_str()?])?;
            Some(m)
        }

        fn mnt(&self) -> PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for Mounted4k {
        fn drop(&mut self) {
            let _ = run("umount", &[self.mnt().to_str().unwrap_or("")]);
            let _ = run("losetup", &["-d", &self.dev]);
        }
    }

    /// Where the kernel reports no direct-I/O alignment for a file (older kernels, some
    /// file systems), the alignment is the logical block size of the device under it, not
    /// 512: on a 4096-byte-sector disk, 512-aligned `O_DIRECT` I/O fails with EINVAL.
    #[test]
    fn file_alignment_without_statx_is_the_devices_logical_block_size() {
        let Some(m) = Mounted4k::new() else {
            eprintln!("skipped: needs root, losetup, mkfs.ext4 and mount");
            return;
        };
        let path = m.mnt().join("f");
        std::fs::write(&path, pattern(5, 0, 16384)).unwrap();
        let engine = Engine::new(EngineKind::Uring).unwrap();
        let dev = DirectFile::open(Path::new(&m.dev), OpenMode::ReadOnly, engine.clone());
        assert_eq!(dev.unwrap().align(), 4096, "the loop device's BLKSSZGET");
        NO_STATX_DIOALIGN.set(true);
        let f = DirectFile::open(&path, OpenMode::ReadWrite, engine);
        NO_STATX_DIOALIGN.set(false);
        let f = f.unwrap();
        assert_eq!(f.align(), 4096);
        runtime().block_on(async {
            f.write_at(512, &[0xAB; 512], false).await.unwrap();
            let mut back = vec![0u8; 1024];
            f.read_at(512, &mut back).await.unwrap();
            assert!(back[..512].iter().all(|&b| b == 0xAB));
            assert_eq!(back[512..], pattern(5, 0, 16384)[1024..1536]);
        });
    }

    /// Once a flush failed, the kernel may have dropped the dirty data it could not write
    /// and cleared the error: a later fdatasync succeeds without that data on disk. Every
    /// later flush of the file must fail until it is reopened.
    #[test]
    fn a_failed_flush_makes_every_later_flush_fail() {
        let dir = tempfile::tempdir().unwrap();
        let fsyncs = AtomicUsize::new(0);
        let hook = move |d: OpDesc| {
            if d.what == "fsync" && fsyncs.fetch_add(1, Ordering::SeqCst) == 0 {
                Fault::Fail(libc::EIO)
            } else {
                Fault::Pass
            }
        };
        let (f, _) = patterned(dir.path(), Box::new(hook));
        runtime().block_on(async {
            f.write_at(0, &[1; 4096], false).await.unwrap();
            f.sync()
                .await
                .expect_err("the injected flush error was lost");
            let e = f
                .sync()
                .await
                .expect_err("a flush after a failed one succeeded");
            assert!(e.to_string().contains("reopen"), "{e}");
            assert!(e.to_string().contains("os error 5"), "{e}");
            f.write_at(0, &[2; 4096], false).await.unwrap();
            f.sync()
                .await
                .expect_err("a flush after a failed one succeeded");
        });
        let (f, _) = patterned(dir.path(), Box::new(|_| Fault::Pass));
        runtime().block_on(f.sync()).unwrap();
    }
}
