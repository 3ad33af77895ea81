//! The io_uring backend: one dedicated thread owns the ring.
//!
//! Callers push requests on a channel and signal an eventfd; the ring keeps a poll on that
//! eventfd armed, so `submit_and_wait` wakes for new requests as well as completions. Each
//! in-flight request lives in a slab slot (its index is the SQE's `user_data`) until its
//! CQE arrives; only then are its buffer, descriptor and keepalive released. When the
//! handle is dropped the thread finishes every queued and in-flight request, then exits.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Backend, BufPool, Op, OpKind};
use crate::sys;

const RING_ENTRIES: u32 = 128;
const POLL_TAG: u64 = u64::MAX;

pub(super) struct UringBackend {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<OwnedFd>,
}

impl UringBackend {
    pub(super) fn start(pools: Vec<Arc<BufPool>>) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let iovecs: Vec<_> = pools.iter().flat_map(|p| p.iovecs()).collect();
        // SAFETY: the iovecs point into the pools' allocations, which the thread keeps
        // alive (it owns Arcs of the pools) for as long as the ring exists.
        let registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        if !registered {
            tracing::info!("io_uring buffer registration refused; using unregistered buffers");
        }
        let wake = Arc::new(sys::eventfd()?);
        let (tx, rx) = mpsc::channel();
        let thread_wake = Arc::clone(&wake);
        std::thread::Builder::new()
            .name("ferry-uring".into())
            .spawn(move || RingThread::new(ring, registered, pools, thread_wake).run(rx))?;
        Ok(UringBackend { tx: Some(tx), wake })
    }
}

impl Backend for UringBackend {
    fn submit(&self, op: Op) {
        if let Some(tx) = &self.tx {
            // A send error means the thread is gone; dropping the op drops its reply
            // sender, which the caller sees as "engine stopped".
            let _ = tx.send(op);
            sys::eventfd_signal(self.wake.as_fd());
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
    poll_armed: bool,
}

impl RingThread {
    fn new(ring: IoUring, registered: bool, pools: Vec<Arc<BufPool>>, wake: Arc<OwnedFd>) -> Self {
        RingThread {
            ring,
            registered,
            _pools: pools,
            wake,
            slots: Vec::new(),
            free_slots: Vec::new(),
            backlog: VecDeque::new(),
            inflight: 0,
            poll_armed: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut disconnected = false;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(op) => self.backlog.push_back(op),
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
            self.push_backlog();
            if disconnected && self.inflight == 0 && self.backlog.is_empty() {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) => {}
                Err(e) => {
                    tracing::error!("io_uring submit failed: {e}");
                    self.fail_backlog(&e);
                }
            }
            self.reap();
        }
    }

    /// Moves queued requests into the submission queue while it has room.
    fn push_backlog(&mut self) {
        while let Some(op) = self.backlog.pop_front() {
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
                return;
            }
            self.inflight += 1;
        }
    }

    /// A fatal submit error: fail what never reached the kernel.
    fn fail_backlog(&mut self, e: &io::Error) {
        for op in self.backlog.drain(..) {
            op.complete(Err(io::Error::new(e.kind(), e.to_string())));
        }
    }

    fn reap(&mut self) {
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
            let slot = tag as usize;
            let op = self.slots[slot]
                .take()
                .expect("completion for an empty slot");
            self.free_slots.push(slot);
            self.inflight -= 1;
            let res = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            op.complete(res);
        }
    }
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
