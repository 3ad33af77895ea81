//! Test-only fault injection between [`super::Engine`] and its backend.
//!
//! A hook sees every request before the backend does and decides its fate: run it
//! normally, fail it without running it, run it and report fewer bytes than it moved (what
//! NFS or FUSE do on a failed read), or run it and hold its completion (with its
//! keepalive, such as a range lock) until the test opens a [`Gate`], which reproduces a
//! completion that the kernel finished but the caller has not seen yet.
//!
//! [`RingFaults`] reach inside the io_uring thread: a panic, or a failing
//! `io_uring_enter`.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Backend, Completion, Op, OpKind};

/// What the hook sees of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpDesc {
    pub what: &'static str,
    pub offset: u64,
    pub len: usize,
}

/// The fate of one request.
#[derive(Debug)]
pub(crate) enum Fault {
    /// Run it normally.
    Pass,
    /// Do not run it; complete it with this errno.
    Fail(i32),
    /// Run it, then report at most this many bytes transferred.
    Short(usize),
    /// Run it, then hold its completion and keepalive until the gate opens.
    Hold(Arc<Gate>),
}

/// Decides each request's [`Fault`].
pub(crate) type Hook = Box<dyn Fn(OpDesc) -> Fault + Send + Sync>;

/// A one-shot gate: the engine side marks it reached when the held request finished in
/// the kernel, and waits until the test opens it.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Gate {
    pub(crate) fn new() -> Arc<Gate> {
        Arc::default()
    }

    /// Blocks until a held request finished in the kernel (panics after 10 s).
    pub(crate) fn wait_reached(&self) {
        let st = self.state.lock().unwrap();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, Duration::from_secs(10), |s| !s.0)
            .unwrap();
        assert!(st.0, "the held request never completed");
    }

    /// Lets the held completion through.
    pub(crate) fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    /// Whether [`Gate::open`] was called.
    pub(crate) fn is_open(&self) -> bool {
        self.state.lock().unwrap().1
    }

    fn reach_and_wait_open(&self) {
        let mut st = self.state.lock().unwrap();
        st.0 = true;
        self.cv.notify_all();
        while !st.1 {
            st = self.cv.wait(st).unwrap();
        }
    }
}

pub(super) struct FaultBackend {
    inner: Box<dyn Backend>,
    hook: Hook,
}

impl FaultBackend {
    pub(super) fn new(inner: Box<dyn Backend>, hook: Hook) -> Self {
        FaultBackend { inner, hook }
    }

    /// Runs `op` on the real backend, then hands its completion to `after` on a helper
    /// thread, which forwards it to the caller.
    fn intercept(&self, mut op: Op, after: impl FnOnce(&mut Completion) + Send + 'static) {
        let (tx, rx) = oneshot::channel();
        let reply = std::mem::replace(&mut op.reply, tx);
        let keepalive = op.keepalive.take();
        self.inner.submit(op);
        std::thread::spawn(move || {
            let mut done = rx.blocking_recv().unwrap_or_else(|_| Completion {
                res: Err(io::Error::other("the I/O engine thread stopped")),
                buf: None,
            });
            after(&mut done);
            let _ = reply.send(done);
            drop(keepalive);
        });
    }
}

impl Backend for FaultBackend {
    fn submit(&self, op: Op) {
        let (what, len) = match &op.kind {
            OpKind::Read { len, .. } => ("read", *len),
            OpKind::Write { len, .. } => ("write", *len),
            OpKind::Fsync { .. } => ("fsync", 0),
            OpKind::Fallocate { len, .. } => ("fallocate", *len as usize),
        };
        let desc = OpDesc {
            what,
            offset: op.offset,
            len,
        };
        match (self.hook)(desc) {
            Fault::Pass => self.inner.submit(op),
            Fault::Fail(errno) => op.complete(Err(io::Error::from_raw_os_error(errno))),
            Fault::Short(n) => self.intercept(op, move |done| {
                if let Ok(m) = &mut done.res {
                    *m = (*m).min(n);
                }
            }),
            Fault::Hold(gate) => self.intercept(op, move |_| gate.reach_and_wait_open()),
        }
    }
}

/// Faults inside the io_uring thread.
#[derive(Debug, Default)]
pub(crate) struct RingFaults {
    /// When non-zero, `io_uring_enter` submits what is queued, then fails with this errno
    /// instead of waiting.
    pub enter_errno: AtomicI32,
    /// When set, the ring thread panics at its next reap.
    pub panic: AtomicBool,
    /// Requests in flight when the thread last went to the kernel, and the most ever.
    pub inflight: AtomicUsize,
    pub peak_inflight: AtomicUsize,
    /// How many of the next request completions report `-cqe_errno` instead of their
    /// result.
    pub cqe_faults: AtomicUsize,
    pub cqe_errno: AtomicI32,
    /// Submission queue size of the ring (0: the default).
    pub ring_entries: AtomicU32,
    /// While set, the ring thread does not reap completions: they pile up in the
    /// completion queue.
    pub hold_reap: AtomicBool,
    /// Whether the kernel ever flagged the completion queue as overflowed.
    pub saw_overflow: AtomicBool,
    /// Requests the thread had taken from its channel when it last went to the kernel.
    pub received: AtomicUsize,
}

impl RingFaults {
    /// Blocks until the thread took `n` requests in and went back to the kernel.
    pub(crate) fn wait_received(&self, n: usize) {
        let t0 = std::time::Instant::now();
        while self.received.load(Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "requests never reached the ring"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Blocks until at least `n` requests were in flight (panics after 10 s).
    pub(crate) fn wait_inflight(&self, n: usize) {
        let t0 = std::time::Instant::now();
        while self.inflight.load(Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "requests never reached the ring"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the thread get from recording the count into io_uring_enter.
        std::thread::sleep(Duration::from_millis(20));
    }
}
