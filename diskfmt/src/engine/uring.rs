//! The io_uring backend: one dedicated thread owns the ring.
//!
//! Callers push requests on a channel and signal an eventfd; the ring keeps a poll on that
//! eventfd armed, so `submit_and_wait` wakes for new requests as well as completions. Each
//! in-flight request lives in a slab slot (its index is the SQE's `user_data`) until its
//! CQE arrives; only then are its buffer, descriptor and keepalive released. A request
//! that completes with -EAGAIN or -EINTR transferred nothing and is submitted again. No
//! more requests are in flight than the completion queue holds, so it cannot overflow
//! (older kernels drop overflowed completions, newer ones when out of memory). When
//! the handle is dropped the thread finishes every queued and in-flight request, then exits.
//!
//! If the ring cannot go on (a fatal `io_uring_enter` error, or a panic on its thread) the
//! engine stops for good: every waiting caller gets an error saying so, and so does every
//! later request. Buffers of requests that may still be in the kernel are leaked, never
//! returned to the pool, so no other request can be handed memory the kernel still
//! reads or writes.

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Backend, BufPool, Op, OpKind};
use crate::sys;

const RING_ENTRIES: u32 = 128;
/// How many times in a row a request completing with -EAGAIN or -EINTR (nothing
/// transferred) is submitted again before that error is its result.
const MAX_RESUBMITS: u32 = 16;
const POLL_TAG: u64 = u64::MAX;

/// Why the engine stopped, once it has.
type Stopped = Arc<Mutex<Option<String>>>;

pub(super) struct UringBackend {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
    stopped: Stopped,
}

/// The error every request gets once the engine stopped.
fn stopped_error(why: &str) -> io::Error {
    io::Error::other(format!(
        "the io_uring engine stopped ({why}): restart the process \
         (FERRY_IO_ENGINE=pread avoids io_uring)"
    ))
}

impl UringBackend {
    pub(super) fn start(pools: Vec<Arc<BufPool>>, _seams: &mut super::Seams) -> io::Result<Self> {
        #[allow(unused_mut)]
        let mut entries = RING_ENTRIES;
        #[cfg(test)]
        if let Some(f) = &_seams.ring {
            match f.ring_entries.load(std::sync::atomic::Ordering::SeqCst) {
                0 => {}
                n => entries = n,
            }
        }
        let ring = IoUring::new(entries)?;
        let iovecs: Vec<_> = pools.iter().flat_map(|p| p.iovecs()).collect();
        // SAFETY: the iovecs point into the pools' allocations, which the thread keeps
        // alive (it owns Arcs of the pools) for as long as the ring exists.
        let registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        if !registered {
            tracing::info!("io_uring buffer registration refused; using unregistered buffers");
        }
        let wake = Arc::new(sys::eventfd()?);
        let (tx, rx) = mpsc::channel();
        let stopped = Stopped::default();
        #[allow(unused_mut)]
        let mut thread = RingThread::new(ring, registered, pools, Arc::clone(&wake));
        thread.stopped = Arc::clone(&stopped);
        #[cfg(test)]
        {
            thread.faults = _seams.ring.take();
        }
        std::thread::Builder::new()
            .name("ferry-uring".into())
            .spawn(move || thread.run(rx))?;
        Ok(UringBackend {
            tx: Some(tx),
            wake,
            stopped,
        })
    }
}

impl Backend for UringBackend {
    fn submit(&self, op: Op) {
        let why = self.stopped.lock().expect("engine state lock").clone();
        if let Some(why) = why {
            return op.complete(Err(stopped_error(&why)));
        }
        if let Some(tx) = &self.tx {
            match tx.send(op) {
                Ok(()) => sys::eventfd_signal(self.wake.as_fd()),
                // The thread stopped between the check and the send.
                Err(mpsc::SendError(op)) => {
                    let why = self.stopped.lock().expect("engine state lock").clone();
                    op.complete(Err(stopped_error(
                        why.as_deref().unwrap_or("its thread exited"),
                    )));
                }
            }
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.tx.take();
        sys::eventfd_signal(self.wake.as_fd());
    }
}

struct RingThread {
    ring: IoUring,
    registered: bool,
    _pools: Vec<Arc<BufPool>>,
    wake: Arc<OwnedFd>,
    slots: Vec<Option<Op>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Op>,
    inflight: usize,
    /// Most requests in flight: the completion queue's size, less one for the poll.
    max_inflight: usize,
    poll_armed: bool,
    stopped: Stopped,
    #[cfg(test)]
    faults: Option<Arc<super::faults::RingFaults>>,
    #[cfg(test)]
    received: usize,
}

impl RingThread {
    fn new(ring: IoUring, registered: bool, pools: Vec<Arc<BufPool>>, wake: Arc<OwnedFd>) -> Self {
        let max_inflight = (ring.params().cq_entries() as usize)
            .saturating_sub(1)
            .max(1);
        RingThread {
            ring,
            registered,
            _pools: pools,
            wake,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            inflight: 0,
            max_inflight,
            poll_armed: false,
            stopped: Stopped::default(),
            #[cfg(test)]
            faults: None,
            #[cfg(test)]
            received: 0,
        }
    }

    /// The thread's body: serves until the handle is dropped and every request finished,
    /// or until the ring cannot go on, when it fails every waiter and stops the engine.
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let served = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve(&rx)));
        let why = match served {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("its thread panicked: {}", panic_message(&*panic)),
        };
        tracing::error!("the io_uring engine stopped ({why}); all its requests fail");
        *self.stopped.lock().expect("engine state lock") = Some(why.clone());
        for op in self.slots.iter_mut().filter_map(Option::take) {
            op.abandon(stopped_error(&why));
        }
        self.inflight = 0;
        for op in self.backlog.drain(..) {
            op.complete(Err(stopped_error(&why)));
        }
        while let Ok(op) = rx.try_recv() {
            op.complete(Err(stopped_error(&why)));
        }
        // Dropping `rx` makes later sends fail; the handle then fails those requests.
    }

    fn serve(&mut self, rx: &mpsc::Receiver<Op>) -> io::Result<()> {
        let mut disconnected = false;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(op) => {
                        #[cfg(test)]
                        {
                            self.received += 1;
                        }
                        self.backlog.push_back(op)
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !self.poll_armed && !disconnected {
                let sqe = opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as _)
                    .build()
                    .user_data(POLL_TAG);
                // SAFETY: the eventfd outlives the ring (both owned by this thread).
                if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                    self.poll_armed = true;
                }
            }
            self.push_backlog()?;
            if disconnected && self.inflight == 0 && self.backlog.is_empty() {
                return Ok(());
            }
            match self.enter() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Out of kernel resources for now: reap, and do not spin.
                Err(e) if is_transient(&e) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(enter_failed(e)),
            }
            self.reap();
            // Only possible if the in-flight bound is broken, or the kernel could not
            // keep an overflowed completion: the waiters of lost completions would hang.
            let lost = self.ring.completion().overflow();
            if lost > 0 {
                return Err(io::Error::other(format!(
                    "the kernel dropped {lost} completions (completion queue overflow)"
                )));
            }
        }
    }

    /// Submits what is queued and waits for at least one completion.
    fn enter(&mut self) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(f) = &self.faults {
            use std::sync::atomic::Ordering::SeqCst;
            f.inflight.store(self.inflight, SeqCst);
            f.peak_inflight.fetch_max(self.inflight, SeqCst);
            f.received.store(self.received, SeqCst);
            let errno = f.enter_errno.load(SeqCst);
            if errno != 0 {
                self.ring.submit()?;
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        self.ring.submit_and_wait(1)
    }

    /// Moves queued requests into the submission queue, submitting it when full. Never
    /// more are in flight than the completion queue holds (less one place for the eventfd
    /// poll), so completions cannot overflow it: the rest wait for completions.
    fn push_backlog(&mut self) -> io::Result<()> {
        while self.inflight < self.max_inflight {
            let Some(op) = self.backlog.pop_front() else {
                break;
            };
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            self.slots[slot] = Some(op);
            let op = self.slots[slot].as_mut().expect("just stored");
            let sqe = build_sqe(op, self.registered).user_data(slot as u64);
            // SAFETY: every pointer in the SQE (buffer, fd) belongs to `op`, which stays in
            // `self.slots[slot]` until its completion is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                let op = self.slots[slot].take().expect("just stored");
                self.free_slots.push(slot);
                self.backlog.push_front(op);
                // The submission queue is full: hand it to the kernel to make room.
                match self.ring.submit() {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => return Ok(()),
                    Err(e) if is_transient(&e) => return Ok(()),
                    Err(e) => return Err(enter_failed(e)),
                }
            }
            self.inflight += 1;
        }
        Ok(())
    }

    fn reap(&mut self) {
        #[cfg(test)]
        use std::sync::atomic::Ordering::SeqCst;
        #[cfg(test)]
        if let Some(f) = &self.faults {
            if f.panic.load(SeqCst) {
                panic!("injected panic on the ring thread");
            }
            while f.hold_reap.load(SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if self.ring.submission().cq_overflow() {
                f.saw_overflow.store(true, SeqCst);
            }
        }
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (tag, res) in done {
            if tag == POLL_TAG {
                self.poll_armed = false;
                sys::eventfd_drain(self.wake.as_fd());
                continue;
            }
            #[cfg(test)]
            let res = match &self.faults {
                Some(f) if f.cqe_faults.load(SeqCst) > 0 => {
                    f.cqe_faults.fetch_sub(1, SeqCst);
                    -f.cqe_errno.load(SeqCst)
                }
                _ => res,
            };
            let slot = tag as usize;
            let mut op = self.slots[slot]
                .take()
                .expect("completion for an empty slot");
            self.free_slots.push(slot);
            self.inflight -= 1;
            if (res == -libc::EAGAIN || res == -libc::EINTR) && op.resubmits < MAX_RESUBMITS {
                op.resubmits += 1;
                self.backlog.push_front(op);
                continue;
            }
            let res = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            op.complete(res);
        }
    }
}

/// `io_uring_enter` errors that pass: out of resources for now, or a signal.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

fn enter_failed(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("io_uring_enter failed: {e}"))
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

fn build_sqe(op: &mut Op, registered: bool) -> squeue::Entry {
    let fd = types::Fd(op.fd.as_raw_fd());
    let offset = op.offset;
    match &mut op.kind {
        OpKind::Read { buf, at, len } => {
            assert!(*at + *len <= buf.capacity());
            let idx = buf.index() as u16;
            // SAFETY: `at + len` is inside the buffer (asserted above); a fixed read may
            // target any part of its registered buffer.
            let ptr = unsafe { buf.as_mut_ptr().add(*at) };
            if registered {
                opcode::ReadFixed::new(fd, ptr, *len as u32, idx)
                    .offset(offset)
                    .build()
            } else {
                opcode::Read::new(fd, ptr, *len as u32)
                    .offset(offset)
                    .build()
            }
        }
        OpKind::Write { buf, len, dsync } => {
            let idx = buf.index() as u16;
            let ptr = buf.as_mut_ptr();
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            if registered {
                opcode::WriteFixed::new(fd, ptr, *len as u32, idx)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            } else {
                opcode::Write::new(fd, ptr, *len as u32)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
        }
        OpKind::Fsync { datasync } => {
            let flags = if *datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(fd).flags(flags).build()
        }
        OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
            .offset(offset)
            .mode(*mode)
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Duration;

    use super::super::faults::RingFaults;
    use super::super::{Engine, OpKind};
    use super::*;
    use crate::testutil::{poll_once, runtime};

    /// A read the kernel keeps in flight until someone writes to the pipe.
    fn pipe() -> (Arc<OwnedFd>, std::io::PipeWriter) {
        let (r, w) = std::io::pipe().unwrap();
        (Arc::new(OwnedFd::from(r)), w)
    }

    /// Starts `engine`'s requests until the ring thread took an extra one in, waking it.
    async fn wake(engine: &Engine, fd: &Arc<OwnedFd>) -> std::io::Result<usize> {
        engine
            .run(fd, 0, OpKind::Fsync { datasync: true }, None)
            .await
            .res
    }

    /// A panic on the ring thread while a read is in the kernel: the reader gets an
    /// error (no hang), the read's buffer never goes back to the pool (the kernel may
    /// still write it), and later requests fail at once.
    #[test]
    fn a_panic_on_the_ring_thread_fails_waiters_and_keeps_kernel_buffers() {
        let faults = Arc::new(RingFaults::default());
        let engine = Engine::with_ring_faults(Arc::clone(&faults)).unwrap();
        let total = engine.free_buffers();
        let (r, _w) = pipe();
        let file = Arc::new(OwnedFd::from(tempfile::tempfile().unwrap()));
        runtime().block_on(async {
            let buf = engine.buffer(4096).await;
            let kind = OpKind::Read {
                buf,
                at: 0,
                len: 4096,
            };
            let mut read = pin!(engine.run(&r, 0, kind, None));
            assert!(poll_once(read.as_mut()).is_none());
            faults.wait_inflight(1);
            faults.panic.store(true, SeqCst);
            let woke = tokio::time::timeout(Duration::from_secs(5), wake(&engine, &file)).await;
            assert!(woke.expect("the waker hung").is_err());
            let done = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("the reader hung");
            let e = done.res.expect_err("a read on an empty pipe succeeded");
            assert!(done.buf.is_none());
            assert_eq!(
                engine.free_buffers(),
                total - 1,
                "a buffer the kernel may still write went back to the pool ({e})"
            );
            let later = tokio::time::timeout(Duration::from_secs(5), wake(&engine, &file)).await;
            assert!(later.expect("a later request hung").is_err());
        });
    }

    /// A fatal `io_uring_enter` error with a read in the kernel: the thread must not spin
    /// with its callers hung; every waiter gets the error, the read's buffer stays out of
    /// the pool, and later requests fail at once.
    #[test]
    fn a_fatal_enter_error_fails_every_waiter() {
        let faults = Arc::new(RingFaults::default());
        let engine = Engine::with_ring_faults(Arc::clone(&faults)).unwrap();
        let total = engine.free_buffers();
        let (r, _w) = pipe();
        let file = Arc::new(OwnedFd::from(tempfile::tempfile().unwrap()));
        runtime().block_on(async {
            let buf = engine.buffer(4096).await;
            let kind = OpKind::Read {
                buf,
                at: 0,
                len: 4096,
            };
            let mut read = pin!(engine.run(&r, 0, kind, None));
            assert!(poll_once(read.as_mut()).is_none());
            faults.wait_inflight(1);
            faults.enter_errno.store(libc::ENXIO, SeqCst);
            let _ = tokio::time::timeout(Duration::from_secs(5), wake(&engine, &file)).await;
            let done = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("the reader hung after a fatal io_uring_enter error");
            let e = done.res.expect_err("a read on an empty pipe succeeded");
            assert!(e.to_string().contains("io_uring"), "{e}");
            assert_eq!(engine.free_buffers(), total - 1);
            let later = tokio::time::timeout(Duration::from_secs(5), wake(&engine, &file)).await;
            assert!(later.expect("a later request hung").is_err());
        });
    }

    /// io_uring may complete a request with -EAGAIN or -EINTR (nothing was transferred):
    /// the request must be submitted again, not failed (up to `MAX_RESUBMITS` times).
    #[test]
    fn eagain_and_eintr_completions_are_resubmitted() {
        let faults = Arc::new(RingFaults::default());
        let engine = Engine::with_ring_faults(Arc::clone(&faults)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();
        let f =
            crate::file::DirectFile::open(&path, crate::file::OpenMode::ReadWrite, engine).unwrap();
        runtime().block_on(async {
            for (errno, n) in [(libc::EAGAIN, 1), (libc::EINTR, 1), (libc::EAGAIN, 5)] {
                faults.cqe_errno.store(errno, SeqCst);
                faults.cqe_faults.store(n, SeqCst);
                let data = vec![errno as u8; 4096];
                f.write_at(4096, &data, false)
                    .await
                    .unwrap_or_else(|e| panic!("errno {errno} x{n}: {e}"));
                faults.cqe_faults.store(n, SeqCst);
                let mut back = vec![0u8; 4096];
                f.read_at(4096, &mut back)
                    .await
                    .unwrap_or_else(|e| panic!("errno {errno} x{n}: {e}"));
                assert_eq!(back, data);
            }
            // Not forever: a request that keeps failing so gets the error.
            faults.cqe_errno.store(libc::EAGAIN, SeqCst);
            faults.cqe_faults.store(MAX_RESUBMITS as usize + 1, SeqCst);
            let e = f.write_at(0, &[1; 4096], false).await.unwrap_err();
            assert!(e.to_string().contains("os error 11"), "{e}");
            assert_eq!(faults.cqe_faults.load(SeqCst), 0);
        });
    }

    /// More requests in flight than the completion queue holds: when they all complete
    /// before the thread reaps, completions overflow (kept by kernels with
    /// IORING_FEAT_NODROP, lost by older ones, lost on any when the kernel cannot
    /// allocate). The engine must never have more in flight than the queue holds.
    #[test]
    fn completions_never_overflow_the_completion_queue() {
        let faults = Arc::new(RingFaults::default());
        faults.ring_entries.store(4, SeqCst);
        let engine = Engine::with_ring_faults(Arc::clone(&faults)).unwrap();
        let (r, mut w) = pipe();
        runtime().block_on(async {
            let mut reads = Vec::new();
            for i in 0..24 {
                let buf = engine.buffer(1).await;
                let kind = OpKind::Read { buf, at: 0, len: 1 };
                let mut read = Box::pin(engine.run(&r, 0, kind, None));
                assert!(poll_once(read.as_mut()).is_none());
                faults.wait_received(i + 1);
                reads.push(read);
            }
            faults.hold_reap.store(true, SeqCst);
            std::io::Write::write_all(&mut w, &[7u8; 24]).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            faults.hold_reap.store(false, SeqCst);
            for read in reads {
                let done = tokio::time::timeout(Duration::from_secs(5), read)
                    .await
                    .expect("a read never completed");
                assert_eq!(done.res.unwrap(), 1);
            }
            assert!(
                !faults.saw_overflow.load(SeqCst),
                "the completion queue overflowed with up to {} requests in flight",
                faults.peak_inflight.load(SeqCst)
            );
        });
    }
}
