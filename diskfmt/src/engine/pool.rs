//! A fixed pool of page-aligned I/O buffers, one contiguous allocation per engine.
//!
//! Ownership of a buffer moves pool → caller → engine thread (while the kernel uses it) →
//! caller → pool, always inside one [`IoBuf`] value, so the kernel can only ever see a
//! buffer no Rust reference points to. A buffer returns to the pool when its `IoBuf` is
//! dropped, which happens only after the engine saw the request complete: a caller that
//! gives up on a request (a dropped future) never frees memory the kernel still writes.
//! Waiting for a free buffer is async (a semaphore), which bounds the engine's memory.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Alignment of every buffer: a page, enough for `O_DIRECT` on any device.
pub const BUF_ALIGN: usize = 4096;

/// The pool's memory and its free list.
#[derive(Debug)]
pub struct BufPool {
    base: NonNull<u8>,
    layout: Layout,
    buf_size: usize,
    count: usize,
    /// Registered-buffer index of this pool's first buffer.
    index_base: usize,
    free: Mutex<Vec<usize>>,
    sem: Arc<Semaphore>,
}

// SAFETY: the pool hands out disjoint regions of its allocation, each to exactly one `IoBuf`
// at a time (guarded by the free list's mutex); the pointer itself is never dereferenced by
// the pool, so sharing it between threads is sound.
unsafe impl Send for BufPool {}
// SAFETY: see `Send`; all shared mutable state is behind the mutex and the semaphore.
unsafe impl Sync for BufPool {}

impl BufPool {
    /// Allocates `count` buffers of `buf_size` bytes (a multiple of [`BUF_ALIGN`]), to be
    /// registered at indexes `index_base..index_base + count` (io_uring's indexes are 16
    /// bits). Sizes that overflow, or memory the system refuses, are an error.
    pub fn new(buf_size: usize, count: usize, index_base: usize) -> io::Result<Arc<Self>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if buf_size == 0 || !buf_size.is_multiple_of(BUF_ALIGN) || count == 0 {
            return Err(invalid(format!(
                "I/O buffer pool of {count} buffers of {buf_size} bytes: both must be non-zero \
                 and the size a multiple of {BUF_ALIGN}"
            )));
        }
        if index_base
            .checked_add(count)
            .is_none_or(|end| end > 1 << 16)
        {
            return Err(invalid(format!(
                "I/O buffer pool: indexes {index_base}..+{count} do not fit in 16 bits"
            )));
        }
        let layout = buf_size
            .checked_mul(count)
            .and_then(|total| Layout::from_size_align(total, BUF_ALIGN).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "I/O buffer pool of {count} buffers of {buf_size} bytes is too large"
                ))
            })?;
        // SAFETY: the layout has a non-zero size (both factors are non-zero, no overflow).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {} bytes of I/O buffers", layout.size()),
            )
        })?;
        Ok(Arc::new(BufPool {
            base,
            layout,
            buf_size,
            count,
            index_base,
            free: Mutex::new((0..count).rev().collect()),
            sem: Arc::new(Semaphore::new(count)),
        }))
    }

    /// Buffers free now (tests only).
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.sem.available_permits()
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// The buffers as iovecs, for `io_uring_register_buffers`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                iov_base: self.buf_ptr(i).cast(),
                iov_len: self.buf_size,
            })
            .collect()
    }

    fn buf_ptr(&self, idx: usize) -> *mut u8 {
        debug_assert!(idx < self.count);
        // SAFETY: idx < count, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(idx * self.buf_size) }
    }

    /// Waits for a free buffer.
    pub async fn get(self: &Arc<Self>) -> IoBuf {
        let permit = Arc::clone(&self.sem)
            .acquire_owned()
            .await
            .expect("buffer pool semaphore is never closed");
        let idx = self
            .free
            .lock()
            .expect("free list lock")
            .pop()
            .expect("a permit guarantees a free buffer");
        IoBuf {
            pool: Arc::clone(self),
            idx,
            _permit: permit,
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; every IoBuf holds an Arc to the pool,
        // so none is alive here.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// One buffer of a [`BufPool`], owned by whoever holds this value.
#[derive(Debug)]
pub struct IoBuf {
    pool: Arc<BufPool>,
    idx: usize,
    _permit: OwnedSemaphorePermit,
}

impl IoBuf {
    /// The registered-buffer index for io_uring.
    pub fn index(&self) -> usize {
        self.pool.index_base + self.idx
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.buf_size
    }

    /// Raw pointer for the kernel; valid while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pool.buf_ptr(self.idx)
    }

    /// The pool this buffer belongs to.
    pub fn pool(&self) -> &Arc<BufPool> {
        &self.pool
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: this IoBuf is the only owner of region `idx`; while the kernel uses it
        // the IoBuf sits inside an engine request and no reference to it is handed out.
        unsafe { std::slice::from_raw_parts(self.pool.buf_ptr(self.idx), self.pool.buf_size) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.pool.buf_ptr(self.idx), self.pool.buf_size) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // The permit is released after this body runs (fields drop after `drop`), so the
        // index is back on the free list before a waiter can take the permit.
        self.pool
            .free
            .lock()
            .expect("free list lock")
            .push(self.idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 buffers of 2^62 + 4096 bytes: the total wraps to 16 KiB in 64 bits. The pool must
    /// refuse, not hand out buffers far outside a 16 KiB allocation.
    #[test]
    fn huge_sizes_are_refused_not_wrapped() {
        let e = BufPool::new((1 << 62) + BUF_ALIGN, 4, 0).expect_err("made from a wrapped size");
        assert!(e.to_string().contains("too large"), "{e}");
        assert!(BufPool::new(usize::MAX & !(BUF_ALIGN - 1), 1, 0).is_err());
        assert!(BufPool::new(BUF_ALIGN, 16, usize::MAX - 4).is_err());
        assert!(BufPool::new(BUF_ALIGN + 1, 1, 0).is_err());
        assert!(BufPool::new(BUF_ALIGN, 4, 0).is_ok());
    }
}
