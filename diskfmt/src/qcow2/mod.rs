//! qcow2 images through the `imago` driver.
//!
//! imago's futures are `!Send`, so each open image gets its own thread running a
//! current-thread tokio runtime and a `LocalSet`; [`Qcow2Image`] is the `Send` handle that
//! forwards requests over a channel, each served by its own local task (so many requests
//! are in flight at once). Data crosses the thread boundary in owned buffers. The driver's
//! storage is ferry's engine ([`storage::EngineStorage`]). Discards need exclusive access to
//! imago's mappings, so the image sits behind an async `RwLock`: every request reads,
//! a discard writes.
//!
//! Before imago sees a file, [`header::parse`] checks it and names any unsupported
//! feature (encryption, zstd compression, external data files, subclusters); images
//! with internal snapshots open read-only. ferry never writes compressed clusters.

pub mod header;
mod storage;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use imago::format::PreallocateMode;
use imago::qcow2::Qcow2;
use imago::{
    FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate,
};
use tokio::sync::{mpsc, oneshot, RwLock};

use crate::blockdev::{
    check_range, BlockDev, Extent, ExtentKind, IoFuture, Provisioning, WriteFlags,
};
use crate::engine::Engine;
use crate::file::{DirectFile, OpenMode};
use crate::{Error, Result};
use storage::EngineStorage;

pub use header::Header;

/// Bytes read to parse the header.
const HEADER_PROBE: usize = 64 * 1024;
/// Cluster-sized pieces of one request the driver keeps in flight.
const PIECES_IN_FLIGHT: usize = 8;
/// Most extents one `block_status` call returns.
const MAX_EXTENTS: usize = 4096;

/// Options for creating a qcow2 image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub cluster_size: usize,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// How a zeroing request is carried out, decided by the handle from its provisioning.
#[derive(Debug, Clone, Copy)]
enum ZeroHow {
    /// Deallocate the clusters (thin images).
    Discard,
    /// Mark clusters zero, keeping their allocation (lazy-thick).
    ZeroFlag,
    /// Write real zeros (eager-thick).
    Data,
}

enum Cmd {
    Read(u64, usize, oneshot::Sender<Result<Vec<u8>>>),
    Write(u64, Vec<u8>, bool, oneshot::Sender<Result<()>>),
    /// Map whole clusters for overwriting; reply (guest offset, host offset, length) runs.
    Map(u64, u64, oneshot::Sender<Result<Vec<(u64, u64, u64)>>>),
    Flush(oneshot::Sender<Result<()>>),
    Zero(u64, u64, ZeroHow, oneshot::Sender<Result<()>>),
    Status(u64, u64, oneshot::Sender<Result<Vec<Extent>>>),
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    path: PathBuf,
    header: Header,
    size: u64,
    writable: bool,
    align: u32,
    provisioning: Provisioning,
    tx: mpsc::UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
    unordered: std::sync::atomic::AtomicBool,
    /// The image file, shared with the driver's storage: unordered-allocation writes
    /// put their data here directly from the caller's thread.
    file: Arc<DirectFile>,
}

type Image = Rc<RwLock<FormatAccess<EngineStorage>>>;

impl Qcow2Image {
    /// Creates a qcow2 image of `size` bytes.
    ///
    /// With `prefill` false an eager-thick image is allocated but not yet zero-filled:
    /// the caller promises to write every byte (conversion does, zeros included).
    pub async fn create(
        path: &Path,
        size: u64,
        provisioning: Provisioning,
        prefill: bool,
        opts: &CreateOptions,
        overwrite: bool,
        engine: Engine,
    ) -> Result<Qcow2Image> {
        if !size.is_multiple_of(512) {
            return Err(Error::invalid(
                path,
                format!("size {size} is not a multiple of 512 bytes"),
            ));
        }
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::invalid(
                path,
                format!("cluster size {cs} must be a power of two from 512 to 2M"),
            ));
        }
        if opts.backing_file.is_some() && provisioning != Provisioning::Thin {
            return Err(Error::invalid(
                path,
                "an image with a backing file can only be thin",
            ));
        }
        let mode = if overwrite {
            OpenMode::CreateTruncate
        } else {
            OpenMode::CreateNew
        };
        let file = DirectFile::open(path, mode, engine.clone())?;
        let prealloc = match provisioning {
            Provisioning::Thin => PreallocateMode::None,
            Provisioning::LazyThick => PreallocateMode::FullAllocate,
            Provisioning::EagerThick if prefill => PreallocateMode::WriteData,
            Provisioning::EagerThick => PreallocateMode::FullAllocate,
        };
        let opts = opts.clone();
        let p = path.to_path_buf();
        run_local(move || async move {
            let mut b = Qcow2::<EngineStorage>::create_builder(EngineStorage::new(Arc::new(file)))
                .size(size)
                .cluster_size(cs)
                .preallocate(prealloc);
            if let Some(bf) = opts.backing_file {
                let fmt = opts.backing_format.unwrap_or_else(|| "raw".into());
                b = b.backing(bf, fmt);
            }
            b.create().await.map_err(|e| Error::io(&p, "create", 0, e))
        })
        .await?;
        let mut img = Self::open(path, true, engine).await?;
        img.provisioning = provisioning;
        Ok(img)
    }

    /// Opens an existing qcow2 image.
    pub async fn open(path: &Path, writable: bool, engine: Engine) -> Result<Qcow2Image> {
        let mode = if writable {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        let file = DirectFile::open(path, mode, engine)?;
        let probe_len = (file.len() as usize).min(HEADER_PROBE);
        let mut probe = vec![0u8; probe_len];
        file.read_at(0, &mut probe).await?;
        let header = header::parse(&probe, file.len()).map_err(|e| match e {
            header::HeaderError::NotQcow2 => Error::invalid(path, "is not a qcow2 image"),
            header::HeaderError::Unsupported(f, hint) => Error::unsupported(path, f, hint),
            header::HeaderError::Corrupt(m) => Error::corrupt(path, m),
        })?;
        if writable && header.nb_snapshots > 0 {
            return Err(Error::unsupported(
                path,
                format!(
                    "writing an image with {} internal snapshots",
                    header.nb_snapshots
                ),
                "delete them with `qemu-img snapshot -d`, or open the image read-only",
            ));
        }
        let provisioning = detect_provisioning(&file, header.size)?;
        let align = file.align();
        let file = Arc::new(file);
        let thread_file = Arc::clone(&file);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let p = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ferry-qcow2".into())
            .spawn(move || serve(p, thread_file, writable, rx, ready_tx))
            .map_err(|e| Error::open(path, "start the qcow2 thread", e))?;
        let size = ready_rx
            .await
            .map_err(|_| Error::invalid(path, "the qcow2 driver thread died"))??;
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            header,
            size,
            writable,
            align,
            provisioning,
            tx,
            thread: Some(thread),
            unordered: std::sync::atomic::AtomicBool::new(false),
            file,
        })
    }

    /// For a freshly created image that nobody reads until its writer flushes (the target
    /// of a conversion): writes of whole clusters map their clusters first and write the
    /// data afterwards, outside the driver's L2 table lock, so they run in parallel. Until
    /// such a write completes, the range may read as zeros, also after a crash before the
    /// next flush. Never use this on an image that holds data someone may read.
    pub fn enable_unordered_allocation(&self) {
        self.unordered
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Bytes allocated on the host by the image file.
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.file.allocated_bytes()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .map_err(|_| Error::invalid(&self.path, "the qcow2 driver thread stopped"))?;
        rx.await
            .map_err(|_| Error::invalid(&self.path, "the qcow2 driver thread stopped"))?
    }

    /// Flushes and closes the image, waiting for its thread to finish.
    /// Dropping the handle without `close` also lets the thread finish its requests,
    /// flush and exit, but nobody learns whether that flush worked.
    pub async fn close(self) -> Result<()> {
        let r = if self.writable {
            self.flush().await
        } else {
            Ok(())
        };
        let Qcow2Image { tx, thread, .. } = self;
        drop(tx);
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        r
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, len)?;
        if !self.writable {
            return Err(Error::invalid(&self.path, "is open read-only"));
        }
        Ok(())
    }
}

/// Runs a `!Send` future to completion on a fresh thread with its own runtime.
async fn run_local<F, Fut, T>(f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("current-thread runtime");
        let _ = tx.send(rt.block_on(f()));
    });
    rx.await.expect("qcow2 helper thread panicked")
}

fn detect_provisioning(file: &DirectFile, size: u64) -> Result<Provisioning> {
    if file.allocated_bytes()? < size {
        return Ok(Provisioning::Thin);
    }
    crate::raw::thick_kind(file)
}

/// The image thread: opens the image, then serves requests until the handle is dropped.
fn serve(
    path: PathBuf,
    file: Arc<DirectFile>,
    writable: bool,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ready: oneshot::Sender<Result<u64>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let opened = Qcow2::<EngineStorage>::builder(EngineStorage::new(file))
            .write(writable)
            .open(PermissiveImplicitOpenGate::default())
            .await;
        let img: Image = match opened {
            Ok(q) => {
                let mut fa = FormatAccess::new(q);
                // Let one request's cluster-sized pieces overlap, not only separate requests.
                fa.set_async_read_parallelization(PIECES_IN_FLIGHT);
                fa.set_async_write_parallelization(PIECES_IN_FLIGHT);
                Rc::new(RwLock::new(fa))
            }
            Err(e) => {
                let _ = ready.send(Err(Error::corrupt(&path, e.to_string())));
                return;
            }
        };
        let size = img.read().await.size();
        let _ = ready.send(Ok(size));
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(cmd) = rx.recv().await {
            let img = Rc::clone(&img);
            let path = path.clone();
            tasks.spawn_local(async move { handle(&path, &img, cmd).await });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        if writable {
            let img = img.read().await;
            if let Err(e) = img.flush().await {
                tracing::error!("{}: flush at close failed: {e}", path.display());
            }
        }
    });
}

async fn handle(path: &Path, img: &Image, cmd: Cmd) {
    let io = |op: &'static str, off: u64| move |e: std::io::Error| Error::io(path, op, off, e);
    match cmd {
        Cmd::Read(off, len, reply) => {
            let mut buf = vec![0u8; len];
            let r = img.read().await.read(&mut buf[..], off).await;
            let _ = reply.send(r.map(|_| buf).map_err(io("read", off)));
        }
        Cmd::Write(off, data, fua, reply) => {
            let g = img.read().await;
            let mut r = g.write(&data[..], off).await.map_err(io("write", off));
            if r.is_ok() && fua {
                r = flush(&g).await.map_err(io("flush", off));
            }
            let _ = reply.send(r);
        }
        Cmd::Map(off, len, reply) => {
            let g = img.read().await;
            let _ = reply.send(
                map_for_overwrite(&g, off, len)
                    .await
                    .map_err(io("allocate", off)),
            );
        }
        Cmd::Flush(reply) => {
            let g = img.read().await;
            let _ = reply.send(flush(&g).await.map_err(io("flush", 0)));
        }
        Cmd::Zero(off, len, how, reply) => {
            let r = match how {
                ZeroHow::Discard => img.write().await.discard_to_zero(off, len).await,
                ZeroHow::Data => write_zero_data(&*img.read().await, off, len).await,
                ZeroHow::ZeroFlag => img.read().await.write_zeroes(off, len).await,
            };
            let _ = reply.send(r.map_err(io("zero", off)));
        }
        Cmd::Status(off, len, reply) => {
            let g = img.read().await;
            let _ = reply.send(status(&g, off, len).await.map_err(io("map", off)));
        }
    }
}

/// Maps `off..off+len` (whole clusters) for overwriting, holding the L2 table lock only
/// for the metadata change; returns where the data goes in the image file. Only for fresh
/// images (see [`Qcow2Image::enable_unordered_allocation`]).
async fn map_for_overwrite(
    img: &FormatAccess<EngineStorage>,
    off: u64,
    len: u64,
) -> std::io::Result<Vec<(u64, u64, u64)>> {
    let end = off + len;
    let mut pos = off;
    let mut runs = Vec::new();
    while pos < end {
        let (_storage, host, n) = img.ensure_data_mapping(pos, end - pos, true).await?;
        runs.push((pos, host, n));
        pos += n;
    }
    Ok(runs)
}

async fn flush(img: &FormatAccess<EngineStorage>) -> std::io::Result<()> {
    img.flush().await?;
    img.sync().await
}

async fn write_zero_data(
    img: &FormatAccess<EngineStorage>,
    mut off: u64,
    len: u64,
) -> std::io::Result<()> {
    let end = off + len;
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    while off < end {
        let n = (end - off).min(zeros.len() as u64) as usize;
        img.write(&zeros[..n], off).await?;
        off += n as u64;
    }
    Ok(())
}

async fn status(
    img: &FormatAccess<EngineStorage>,
    offset: u64,
    len: u64,
) -> std::io::Result<Vec<Extent>> {
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end && out.len() < MAX_EXTENTS {
        let (mapping, n) = img.get_mapping(pos, end - pos).await?;
        let kind = match mapping {
            Mapping::Raw { .. } | Mapping::Special { .. } => ExtentKind::Data,
            Mapping::Zero { explicit: true, .. } => ExtentKind::Zero,
            Mapping::Zero { .. } => ExtentKind::Hole,
            Mapping::Eof { .. } => ExtentKind::Hole,
            _ => ExtentKind::Data,
        };
        let n = if n == 0 { end - pos } else { n.min(end - pos) };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.end() == pos => last.length += n,
            _ => out.push(Extent {
                offset: pos,
                length: n,
                kind,
            }),
        }
        pos += n;
    }
    Ok(out)
}

impl BlockDev for Qcow2Image {
    fn name(&self) -> &Path {
        &self.path
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.align
    }

    fn physical_block_size(&self) -> u32 {
        self.header.cluster_size().min(4096) as u32
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn provisioning(&self) -> Provisioning {
        self.provisioning
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            check_range(&self.path, self.size, offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(());
            }
            let data = self.call(|r| Cmd::Read(offset, buf.len(), r)).await?;
            buf.copy_from_slice(&data);
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_write(offset, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(());
            }
            let cs = self.header.cluster_size();
            let end = offset + buf.len() as u64;
            let unordered = self.unordered.load(std::sync::atomic::Ordering::SeqCst)
                && offset.is_multiple_of(cs)
                && (end.is_multiple_of(cs) || end == self.size);
            if !unordered {
                return self
                    .call(|r| Cmd::Write(offset, buf.to_vec(), flags.fua, r))
                    .await;
            }
            // The driver thread only maps the clusters; the data goes straight from the
            // caller's buffer to the image file, from this thread.
            let runs = self.call(|r| Cmd::Map(offset, buf.len() as u64, r)).await?;
            let writes = runs.into_iter().map(|(guest, host, n)| {
                let from = (guest - offset) as usize;
                self.file
                    .write_at(host, &buf[from..from + n as usize], false)
            });
            // All of them, not up to the first error: none may still be in the kernel when
            // the caller sees the error and retries.
            let results = futures::future::join_all(writes).await;
            results.into_iter().collect::<Result<Vec<()>>>()?;
            if flags.fua {
                self.call(Cmd::Flush).await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if !self.writable {
                return Ok(());
            }
            self.call(Cmd::Flush).await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.check_write(offset, length)?;
            if length == 0 {
                return Ok(());
            }
            let how = match self.provisioning {
                Provisioning::Thin if may_unmap => ZeroHow::Discard,
                Provisioning::EagerThick => ZeroHow::Data,
                _ => ZeroHow::ZeroFlag,
            };
            self.call(|r| Cmd::Zero(offset, length, how, r)).await
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, length, true)
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(&self.path, self.size, offset, length)?;
            if length == 0 {
                return Ok(vec![Extent {
                    offset,
                    length,
                    kind: ExtentKind::Hole,
                }]);
            }
            self.call(|r| Cmd::Status(offset, length, r)).await
        })
    }
}
