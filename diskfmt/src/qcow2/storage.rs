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
            // Past the end: growing the file is enough, the new range reads as zeros.
            if end > self.file.len() {
                self.file.set_len(end).map_err(to_io)?;
            }
            return Ok(());
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
        let cur = self.file.len();
        if new_size <= cur {
            return self.file.set_len(new_size).map_err(to_io);
        }
        self.file.set_len(new_size).map_err(to_io)?;
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
