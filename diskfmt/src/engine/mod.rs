//! The I/O engine: dedicated threads that execute aligned block requests on file
//! descriptors, completing them to async callers through oneshot channels.
//!
//! Two backends sit behind one [`Engine`] handle:
//! - `uring` (default): one thread owning an io_uring with the pool's buffers registered
//!   (`READ_FIXED`/`WRITE_FIXED`), many requests in flight;
//! - `pread`: a few threads doing `pread`/`pwritev2`, used when io_uring is unavailable,
//!   or when forced with `FERRY_IO_ENGINE=pread` (or [`Engine::new`]).
//!
//! The engine only sees aligned requests of at most one buffer; alignment, splitting and
//! read-modify-write live in [`crate::file::DirectFile`]. Requests carry their buffer and
//! an `Arc` of their file descriptor, and are dropped by the engine thread only after the
//! kernel completed them, so neither memory nor descriptor can be released early.

#[cfg(test)]
pub(crate) mod faults;
mod pool;
mod pread;
mod uring;

pub use pool::{BufPool, IoBuf, BUF_ALIGN};

use std::any::Any;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use tokio::sync::oneshot;

/// Size of one large engine buffer: the largest single request the engine issues.
pub const BUF_SIZE: usize = 1 << 20;
/// The engine's buffer pools: (size, count). Small requests (qcow2 clusters, metadata,
/// read-modify-write blocks) take small buffers so they do not exhaust the large ones.
/// 48 MiB in all, registered with io_uring.
const POOLS: [(usize, usize); 2] = [(64 << 10, 256), (BUF_SIZE, 32)];

/// Fault injection an engine is built with: empty outside the crate's tests.
#[derive(Default)]
struct Seams {
    #[cfg(test)]
    hook: Option<faults::Hook>,
    #[cfg(test)]
    ring: Option<Arc<faults::RingFaults>>,
}

/// Which backend executes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring with registered buffers.
    Uring,
    /// pread/pwrite worker threads.
    Pread,
}

impl EngineKind {
    /// Name as used in `FERRY_IO_ENGINE`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Pread => "pread",
        }
    }
}

/// What one request does.
#[derive(Debug)]
pub(crate) enum OpKind {
    /// Read `len` bytes into the buffer, starting `at` bytes into it.
    Read { buf: IoBuf, at: usize, len: usize },
    /// Write the first `len` bytes of the buffer; `dsync` makes it durable on completion.
    Write { buf: IoBuf, len: usize, dsync: bool },
    /// fsync or fdatasync.
    Fsync { datasync: bool },
    /// fallocate(mode) of `len` bytes at the request's offset.
    Fallocate { mode: i32, len: u64 },
}

/// One request for an engine thread.
pub(crate) struct Op {
    pub fd: Arc<OwnedFd>,
    pub offset: u64,
    pub kind: OpKind,
    /// Dropped by the engine thread after completion (e.g. a range lock that must stay
    /// held while the kernel writes, even if the caller has given up). Held, never read.
    #[allow(dead_code)]
    pub keepalive: Option<Arc<dyn Any + Send + Sync>>,
    pub reply: oneshot::Sender<Completion>,
    /// Times the io_uring backend submitted it again after -EAGAIN or -EINTR.
    pub resubmits: u32,
}

/// The outcome of an [`Op`]: bytes transferred, and the buffer handed back.
#[derive(Debug)]
pub(crate) struct Completion {
    pub res: io::Result<usize>,
    pub buf: Option<IoBuf>,
}

impl Op {
    /// Hands the result back to the caller (who may have gone away; that is fine).
    fn complete(self, res: io::Result<usize>) {
        let buf = match self.kind {
            OpKind::Read { buf, .. } | OpKind::Write { buf, .. } => Some(buf),
            _ => None,
        };
        let _ = self.reply.send(Completion { res, buf });
        // `self.keepalive` and `self.fd` drop here, after the kernel is done.
    }

    /// Fails a request the kernel may still be working on (its engine stopped): the
    /// buffer is leaked, never returned to the pool, so no other request can be given
    /// memory the kernel still reads or writes.
    fn abandon(self, err: io::Error) {
        if let OpKind::Read { buf, .. } | OpKind::Write { buf, .. } = self.kind {
            std::mem::forget(buf);
        }
        let _ = self.reply.send(Completion {
            res: Err(err),
            buf: None,
        });
    }
}

trait Backend: Send + Sync {
    fn submit(&self, op: Op);
}

/// A handle to an I/O engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    kind: EngineKind,
    /// Ascending by buffer size.
    pools: Vec<Arc<BufPool>>,
    backend: Box<dyn Backend>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.inner.kind)
            .finish()
    }
}

impl Engine {
    /// Starts an engine of the given kind.
    pub fn new(kind: EngineKind) -> io::Result<Engine> {
        Self::build(kind, Seams::default())
    }

    /// An engine whose requests first pass a fault-injection hook (tests only).
    #[cfg(test)]
    pub(crate) fn with_faults(kind: EngineKind, hook: faults::Hook) -> io::Result<Engine> {
        let seams = Seams {
            hook: Some(hook),
            ..Seams::default()
        };
        Self::build(kind, seams)
    }

    /// An io_uring engine whose ring thread takes injected faults (tests only).
    #[cfg(test)]
    pub(crate) fn with_ring_faults(ring: Arc<faults::RingFaults>) -> io::Result<Engine> {
        let seams = Seams {
            ring: Some(ring),
            ..Seams::default()
        };
        Self::build(EngineKind::Uring, seams)
    }

    /// Free buffers in all pools (tests only).
    #[cfg(test)]
    pub(crate) fn free_buffers(&self) -> usize {
        self.inner.pools.iter().map(|p| p.available()).sum()
    }

    #[allow(unused_mut)]
    fn build(kind: EngineKind, mut seams: Seams) -> io::Result<Engine> {
        let mut base = 0;
        let pools = POOLS
            .iter()
            .map(|&(size, count)| {
                let p = BufPool::new(size, count, base);
                base += count;
                p
            })
            .collect::<io::Result<Vec<_>>>()?;
        let backend: Box<dyn Backend> = match kind {
            EngineKind::Uring => Box::new(uring::UringBackend::start(pools.clone(), &mut seams)?),
            EngineKind::Pread => Box::new(pread::PreadBackend::start(4)?),
        };
        #[cfg(test)]
        let backend = match seams.hook.take() {
            Some(hook) => Box::new(faults::FaultBackend::new(backend, hook)),
            None => backend,
        };
        Ok(Engine {
            inner: Arc::new(EngineInner {
                kind,
                pools,
                backend,
            }),
        })
    }

    /// The engine `FERRY_IO_ENGINE` asks for (`uring` or `pread`), else io_uring when
    /// the kernel allows it, else pread.
    pub fn from_env() -> io::Result<Engine> {
        match std::env::var("FERRY_IO_ENGINE").as_deref() {
            Ok("pread") => Engine::new(EngineKind::Pread),
            Ok("uring") | Ok("io_uring") => Engine::new(EngineKind::Uring),
            Ok("") | Ok("auto") | Err(_) => Engine::new(EngineKind::Uring).or_else(|e| {
                tracing::info!("io_uring unavailable ({e}); using the pread engine");
                Engine::new(EngineKind::Pread)
            }),
            Ok(other) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("FERRY_IO_ENGINE={other:?}: use uring, pread or auto"),
            )),
        }
    }

    /// The process-wide engine, started on first use by [`Engine::from_env`].
    pub fn global() -> io::Result<Engine> {
        static GLOBAL: OnceLock<Result<Engine, String>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Engine::from_env().map_err(|e| e.to_string()))
            .clone()
            .map_err(io::Error::other)
    }

    /// Which backend this engine runs.
    pub fn kind(&self) -> EngineKind {
        self.inner.kind
    }

    /// Waits for a free buffer of at least `len` (at most [`BUF_SIZE`]) bytes.
    pub(crate) async fn buffer(&self, len: usize) -> IoBuf {
        debug_assert!(len <= BUF_SIZE);
        let pools = &self.inner.pools;
        let pool = pools
            .iter()
            .find(|p| p.buf_size() >= len)
            .unwrap_or(&pools[pools.len() - 1]);
        pool.get().await
    }

    /// Runs one request and waits for its completion.
    pub(crate) async fn run(
        &self,
        fd: &Arc<OwnedFd>,
        offset: u64,
        kind: OpKind,
        keepalive: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Completion {
        let (reply, rx) = oneshot::channel();
        self.inner.backend.submit(Op {
            fd: Arc::clone(fd),
            offset,
            kind,
            keepalive,
            reply,
            resubmits: 0,
        });
        rx.await.unwrap_or_else(|_| Completion {
            res: Err(io::Error::other("the I/O engine thread stopped")),
            buf: None,
        })
    }
}
