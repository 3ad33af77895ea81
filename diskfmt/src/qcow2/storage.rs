//! The qcow2 driver's storage: imago's `Storage` trait over a [`DirectFile`], so qcow2
//! metadata and data go through ferry's engine (io_uring, `O_DIRECT`) like everything else.
//! The file has no cache of its own: `flush` is a no-op and `sync` is `fdatasync`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageOpenOptions};

use crate::engine::{Engine, BUF_ALIGN};
use crate::file::{DirectFile, OpenMode};

/// A [`DirectFile`] as imago storage.
#[derive(Debug)]
pub struct EngineStorage {
    file: Arc<DirectFile>,
    helper: CommonStorageHelper,
}

impl EngineStorage {
    pub fn new(file: Arc<DirectFile>) -> Self {
        EngineStorage {
            file,
            helper: CommonStorageHelper::default(),
        }
    }
}

impl fmt::Display for EngineStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.path().display())
    }
}

fn to_io(e: crate::Error) -> io::Error {
    match &e {
        crate::Error::Io { err, .. } | crate::Error::Open { err, .. } => {
            io::Error::new(err.kind(), e.to_string())
        }
        _ => io::Error::other(e.to_string()),
    }
}

impl Storage for EngineStorage {
    /// Opens a backing file named by an image (always read-only).
    async fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        let path = opts
            .get_filename()
            .ok_or_else(|| io::Error::other("backing file without a name"))?
            .to_path_buf();
        let mode = if opts.get_writable() {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        let file = DirectFile::open(&path, mode, Engine::global()?).map_err(to_io)?;
        Ok(EngineStorage::new(Arc::new(file)))
    }

    fn mem_align(&self) -> usize {
        BUF_ALIGN
    }

    fn req_align(&self) -> usize {
        self.file.align() as usize
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.len())
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        let rel = relative.as_ref();
        if rel.is_absolute() {
            return Ok(rel.to_path_buf());
        }
        Ok(self
            .file
            .path()
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(rel))
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.file.path().to_path_buf())
    }

    async unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, mut offset: u64) -> io::Result<()> {
        for mut slice in bufv.into_inner() {
            let b: &mut [u8] = &mut slice;
            self.file.read_at(offset, b).await.map_err(to_io)?;
            offset += b.len() as u64;
        }
        Ok(())
    }

    async unsafe fn pure_writev(&self, bufv: IoVector<'_>, mut offset: u64) -> io::Result<()> {
        for slice in bufv.into_inner() {
            let b: &[u8] = &slice;
            self.file.write_at(offset, b, false).await.map_err(to_io)?;
            offset += b.len() as u64;
        }
        Ok(())
    }

    async unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset + length;
        if offset >= self.file.len() {
            // Past the end: growing the file is enough, the new range reads as zeros. The
            // cached length may lag a write into a later cluster that already finished,
            // so the file is only ever grown, never cut back to `end`.
            let before = self.file.extend_to(end).await.map_err(to_io)?;
            if before <= offset {
                return Ok(());
            }
            // The file had already grown past `offset`: zero what lies inside it.
        }
        self.zero_allocated(offset, length).await
    }

    async unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_allocated(offset, length).await
    }

    async unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.file.fallocate(mode, offset, length).await {
            Err(e) if e.kind() != crate::ErrorKind::Unsupported => Err(to_io(e)),
            _ => Ok(()),
        }
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.sync().await.map_err(to_io)
    }

    async unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    async fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        if new_size <= self.file.len() {
            return self.file.set_len(new_size).map_err(to_io);
        }
        let cur = self.file.extend_to(new_size).await.map_err(to_io)?;
        if cur >= new_size {
            return Ok(());
        }
        match prealloc_mode {
            PreallocateMode::Allocate => self
                .file
                .fallocate(0, cur, new_size - cur)
                .await
                .map_err(to_io),
            PreallocateMode::WriteData => self
                .file
                .write_zero_data(cur, new_size - cur)
                .await
                .map_err(to_io),
            _ => Ok(()),
        }
    }
}

impl EngineStorage {
    async fn zero_allocated(&self, offset: u64, length: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE;
        match self.file.fallocate(mode, offset, length).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == crate::ErrorKind::Unsupported => self
                .file
                .write_zero_data(offset, length)
                .await
                .map_err(to_io),
            Err(e) => Err(to_io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;
    use crate::engine::faults::{Fault, Gate, OpDesc};
    use crate::engine::EngineKind;
    use crate::testutil::{pattern, poll_once, runtime};

    const CS: u64 = 64 << 10;

    /// imago zeroes the rest of a fresh cluster past the end of the file. If a write into
    /// a later fresh cluster has finished in the kernel (the file already grew) but has
    /// not yet raised the cached length, that zeroing must not cut the file back and turn
    /// the completed write into zeros.
    #[test]
    fn zeroing_past_the_cached_end_never_shrinks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; CS as usize]).unwrap();
        let gate = Gate::new();
        let held = Arc::clone(&gate);
        let hook = move |d: OpDesc| {
            if d.what == "write" && d.offset == 3 * CS {
                Fault::Hold(Arc::clone(&held))
            } else {
                Fault::Pass
            }
        };
        let engine = Engine::with_faults(EngineKind::Uring, Box::new(hook)).unwrap();
        let file = Arc::new(DirectFile::open(&path, OpenMode::ReadWrite, engine).unwrap());
        let storage = EngineStorage::new(Arc::clone(&file));
        runtime().block_on(async {
            let data = pattern(3, 3 * CS, CS as usize);
            let mut write = pin!(file.write_at(3 * CS, &data, false));
            assert!(poll_once(write.as_mut()).is_none());
            // The write is on disk and the file is 4 clusters long; the caller has not
            // seen the completion, so the cached length is still 1 cluster.
            gate.wait_reached();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * CS);
            // SAFETY: aligned to the storage's alignment; nothing else touches cluster 1.
            let mut zero = pin!(unsafe { storage.pure_write_zeroes(CS, CS) });
            let early = poll_once(zero.as_mut());
            gate.open();
            write.await.unwrap();
            match early {
                Some(r) => r.unwrap(),
                None => zero.await.unwrap(),
            }
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * CS);
            let mut back = vec![0u8; CS as usize];
            file.read_at(3 * CS, &mut back).await.unwrap();
            assert!(
                back == data,
                "a completed write past the zeroed cluster was lost"
            );
            assert!(
                file.len() >= 4 * CS,
                "cached length {} too small",
                file.len()
            );
        });
    }
}
