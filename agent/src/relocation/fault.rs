//! A test hook of the storage move: the setting `pivot-flush-fails=N`
//! ([`datastore::failpoint`]) makes the new file of the move's N-th disk (counted from 1)
//! fail every flush from the moment the pivot begins — a target that dies while the pivot
//! holds guest I/O. Without the setting (always, in the shipped binary) nothing is
//! wrapped and this module does nothing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use diskfmt::{BlockDev, Extent, IoFuture, Provisioning, WriteFlags};

/// The switch of one disk's fault, if the test asked for one on disk `index` (from 0).
pub(super) fn for_disk(index: usize) -> Option<Arc<AtomicBool>> {
    let n = datastore::failpoint::setting("pivot-flush-fails")?;
    (n == index as u64 + 1).then(|| Arc::new(AtomicBool::new(false)))
}

/// `dev`, with flushes failing once `armed` is set.
pub(super) fn wrap(dev: Arc<dyn BlockDev>, armed: Arc<AtomicBool>) -> Arc<dyn BlockDev> {
    Arc::new(FlushFault { inner: dev, armed })
}

#[derive(Debug)]
struct FlushFault {
    inner: Arc<dyn BlockDev>,
    armed: Arc<AtomicBool>,
}

impl BlockDev for FlushFault {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn physical_block_size(&self) -> u32 {
        self.inner.physical_block_size()
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn provisioning(&self) -> Provisioning {
        self.inner.provisioning()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.inner.read(offset, buf)
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        self.inner.write(offset, buf, flags)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        if !self.armed.load(Ordering::SeqCst) {
            return self.inner.flush();
        }
        Box::pin(async move {
            tracing::warn!(
                "failpoint pivot-flush-fails: failing a flush of {}",
                self.inner.name().display()
            );
            Err(diskfmt::Error::Io {
                object: self.inner.name().to_path_buf(),
                op: "flush",
                offset: 0,
                err: std::io::Error::from_raw_os_error(libc::EIO),
            })
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, length, may_unmap)
    }
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, length)
    }
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        self.inner.block_status(offset, length)
    }
}
