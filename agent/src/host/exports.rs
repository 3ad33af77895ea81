//! Exports: datastore files the agent serves over NBD, with the locks that make that
//! safe, and the active/inactive switch the compute handoff is built from.
//!
//! A writable export holds the file's exclusive lock, a read-only one a shared lock.
//! An **inactive** export holds no lock: it serves the handshake and reads (the state
//! last committed by whoever writes the file) and holds writes — up to the configured
//! write hold, then EIO — until it is activated, which takes the lock or finds it handed
//! to this host. Deactivating waits for every request in flight, flushes, and then
//! releases the lock or hands it to another host by expected version.
//!
//! While a disk moves to another datastore (live storage relocation), the export serves
//! guest I/O through a [`mirror::Mirror`] from its file to the new one; after the pivot
//! it swaps to the new file ([`Gate::finish_pivot`]) under the same export name.
//!
//! Every export is on the agent's unix socket under its name; with a cluster secret it
//! is also on TCP under `NAME.TOKEN`, where the token is derived from the secret and
//! the name, and LIST is refused there: only a holder of the secret can attach. The
//! export table is kept in `state_dir/exports.json`, so a restarted agent serves the
//! same names on the same sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{bail, Context, Result};
use datastore::files::{DsFile, Session};
use datastore::{LockMode, Owner};
use diskfmt::{BlockDev, Extent, IoFuture, Provisioning, WriteFlags};
use mirror::Mirror;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};
use uuid::Uuid;

/// What is persisted per export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    /// The datastore's uuid.
    pub datastore: Uuid,
    pub path: String,
    pub read_only: bool,
    /// Whether it held its lock (was active) when last recorded.
    pub active: bool,
}

/// Checks an export name: 1 to 64 of letters, digits, '-', '_', '.'.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("export name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// The TCP name of export `name`: the name and a token only a holder of the cluster
/// secret can compute.
pub fn tcp_name(secret: &str, name: &str) -> String {
    let key = blake3::hash(secret.as_bytes());
    let mac = blake3::keyed_hash(key.as_bytes(), name.as_bytes());
    format!("{name}.{}", &mac.to_hex()[..32])
}

struct Inner {
    /// None once the export was shut.
    file: Option<Arc<DsFile>>,
    active: bool,
    /// A storage relocation in progress: guest I/O goes through it. The target is a
    /// file of this host (kept here to become the export's file after the pivot) or,
    /// when the disk moves to another host, that host's export over NBD (`None`).
    mirror: Option<(Arc<Mirror>, Option<Arc<DsFile>>)>,
    /// The datastore device and path of `file`.
    device: PathBuf,
    path: String,
    /// A new file another host copies a disk into, not yet the disk: what is written
    /// is committed by the copy's final flush, not write by write.
    copy_target: bool,
}

impl Inner {
    fn file(&self, name: &Path) -> diskfmt::Result<&DsFile> {
        self.file.as_deref().ok_or_else(|| gone(name))
    }

    /// Where guest I/O goes: the mirror while one runs, else the file.
    fn dev(&self, name: &Path) -> diskfmt::Result<&dyn BlockDev> {
        match &self.mirror {
            Some((m, _)) if self.file.is_some() => Ok(&**m),
            _ => Ok(self.file(name)?),
        }
    }

    /// Commits the metadata of what was just written to the file that is the disk: the
    /// source while a mirror runs (the target is committed by the pivot's flush; until
    /// then a crash leaves the source authoritative), the target once it pivoted.
    async fn durable(&self, name: &Path) -> diskfmt::Result<()> {
        if self.copy_target {
            return Ok(());
        }
        match &self.mirror {
            Some((m, Some(t))) if m.phase() == mirror::Phase::Done => durable(t).await,
            _ => durable(self.file(name)?).await,
        }
    }
}

fn gone(name: &Path) -> diskfmt::Error {
    diskfmt::Error::Invalid {
        object: name.to_path_buf(),
        detail: "the export was removed or the agent is stopping".into(),
    }
}

/// Closes a file shared with a mirror once the mirror has let go of it.
async fn close_shared(f: Arc<DsFile>, keep_lock: bool) -> Result<()> {
    let f = Arc::try_unwrap(f)
        .map_err(|_| crate::error::fail!("the file is still in use by a mirror"))?;
    if keep_lock {
        f.detach().await?;
    } else {
        f.close().await?;
    }
    Ok(())
}

/// The device behind an export: the file, and the gate that holds writes while the
/// export is inactive.
pub struct Gate {
    name: PathBuf,
    size: u64,
    lbs: u32,
    pbs: u32,
    prov: Provisioning,
    read_only: bool,
    hold: Duration,
    inner: RwLock<Inner>,
    active: watch::Sender<bool>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("name", &self.name)
            .field("active", &*self.active.borrow())
            .finish()
    }
}

fn held_too_long(name: &Path, offset: u64, hold: Duration) -> diskfmt::Error {
    diskfmt::Error::Io {
        object: name.to_path_buf(),
        op: "write",
        offset,
        err: std::io::Error::other(format!(
            "the export is inactive (this host does not hold the file's lock) and was not \
             activated within {}s",
            hold.as_secs()
        )),
    }
}

impl Gate {
    /// Opens the export's file: with its lock when `active`, else a lock-free view.
    pub async fn open(
        session: &Arc<Session>,
        path: &str,
        read_only: bool,
        active: bool,
        hold: Duration,
    ) -> Result<Gate> {
        let device = session.datastore().path().to_path_buf();
        let file = if active {
            let mode = if read_only {
                LockMode::Shared
            } else {
                LockMode::Exclusive
            };
            session.open(path, mode).await?
        } else {
            let d = device.clone();
            let p = path.to_string();
            tokio::task::spawn_blocking(move || DsFile::open_readonly(&d, &p))
                .await
                .expect("open task")?
        };
        Ok(Gate {
            name: file.name().to_path_buf(),
            size: file.size(),
            lbs: file.logical_block_size(),
            pbs: file.physical_block_size(),
            prov: file.provisioning(),
            read_only,
            hold,
            inner: RwLock::new(Inner {
                file: Some(Arc::new(file)),
                active,
                mirror: None,
                device,
                path: path.to_string(),
                copy_target: false,
            }),
            active: watch::Sender::new(active),
        })
    }

    /// An active export of a file this host just created (and holds the lock of), that
    /// another host copies a disk into: writes are committed by flushes only until
    /// [`Gate::make_disk`].
    pub fn from_file(session: &Arc<Session>, file: DsFile, path: &str, hold: Duration) -> Gate {
        Gate {
            name: file.name().to_path_buf(),
            size: file.size(),
            lbs: file.logical_block_size(),
            pbs: file.physical_block_size(),
            prov: file.provisioning(),
            read_only: false,
            hold,
            inner: RwLock::new(Inner {
                file: Some(Arc::new(file)),
                active: true,
                mirror: None,
                device: session.datastore().path().to_path_buf(),
                path: path.to_string(),
                copy_target: true,
            }),
            active: watch::Sender::new(true),
        }
    }

    /// The copy is complete and flushed, and the file is now the disk: every write is
    /// committed before it is acknowledged from here on.
    pub async fn make_disk(&self) {
        self.inner.write().await.copy_target = false;
    }

    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    pub async fn uuid(&self) -> Uuid {
        let g = self.inner.read().await;
        g.file.as_ref().map(|f| f.uuid()).unwrap_or_default()
    }

    /// Takes the lock (or finds it handed to us) and lets held writes through.
    pub async fn activate(&self, session: &Arc<Session>) -> Result<()> {
        let mut g = self.inner.write().await;
        if g.active {
            return Ok(());
        }
        if g.file.is_none() {
            bail!("{}: the export was removed", self.name.display());
        }
        let mode = if self.read_only {
            LockMode::Shared
        } else {
            LockMode::Exclusive
        };
        let file = session.open(&g.path, mode).await?;
        if file.size() != self.size {
            let _ = file.close().await;
            bail!(
                "{}: its size changed while the export was inactive; remove and add the export again",
                self.name.display()
            );
        }
        g.file = Some(Arc::new(file));
        g.active = true;
        self.active.send_replace(true);
        Ok(())
    }

    /// Drains requests in flight, flushes, and releases the lock — or hands it to `to`
    /// (by `expected` lock version, or the current one). Returns the new lock version
    /// after a handoff.
    pub async fn deactivate(
        &self,
        session: &Arc<Session>,
        to: Option<Owner>,
        expected: Option<u64>,
    ) -> Result<Option<u64>> {
        let mut g = self.inner.write().await;
        if !g.active || g.file.is_none() {
            return Ok(None);
        }
        if g.mirror.is_some() {
            bail!(
                "{}: a storage relocation of this disk is in progress; cancel it first",
                self.name.display()
            );
        }
        if let (Some(_), Some(want)) = (to, expected) {
            // Check the version before anything changes, so a refused handoff leaves
            // the export exactly as it was.
            let uuid = g.file(&self.name)?.uuid();
            let s = Arc::clone(session);
            let now = tokio::task::spawn_blocking(move || s.lock_version(&uuid))
                .await
                .expect("lock task")?;
            if now != Some(want) {
                return Err(datastore::Error::LockHeld {
                    object: self.name.display().to_string(),
                    mode: format!(
                        "at version {} (the handoff expected {want}; nothing was handed over)",
                        now.map_or("(not held here)".to_string(), |v| v.to_string())
                    ),
                    holders: "this host".into(),
                }
                .into());
            }
        }
        g.file(&self.name)?.flush().await?;
        let d = g.device.clone();
        let p = g.path.clone();
        let view = tokio::task::spawn_blocking(move || DsFile::open_readonly(&d, &p))
            .await
            .expect("open task")?;
        let old = g.file.replace(Arc::new(view)).expect("checked above");
        let uuid = old.uuid();
        self.active.send_replace(false);
        g.active = false;
        let out = match to {
            None => close_shared(old, false).await.map(|_| None),
            Some(to) => {
                close_shared(old, true).await?;
                let s = Arc::clone(session);
                tokio::task::spawn_blocking(move || s.handoff(&uuid, to, expected))
                    .await
                    .expect("handoff task")
                    .map(Some)
                    .map_err(crate::error::Error::from)
            }
        };
        if let Err(e) = &out {
            // Still ours (nothing was handed over): serve writes again.
            tracing::warn!("{}: deactivation failed: {e:#}", self.name.display());
            if let Ok(file) = session.open(&g.path, LockMode::Exclusive).await {
                g.file = Some(Arc::new(file));
                g.active = true;
                self.active.send_replace(true);
            }
        }
        out
    }

    /// Closes the export: releases the lock (`keep_lock` false) or only commits and
    /// keeps it, for an agent that stops and will come back.
    pub async fn shut(&self, keep_lock: bool) -> Result<()> {
        let mut g = self.inner.write().await;
        let Some(file) = g.file.take() else {
            return Ok(());
        };
        let active = std::mem::replace(&mut g.active, false);
        self.active.send_replace(false);
        if let Some((m, target)) = g.mirror.take() {
            // A relocation still running: the source stays the disk; the target is the
            // relocation's to clean up.
            m.cancel().await;
            drop(m);
            if let Some(t) = target {
                close_shared(t, keep_lock).await?;
            }
        }
        if active {
            close_shared(file, keep_lock).await?;
        }
        Ok(())
    }

    /// For an agent that stops and will come back: waits for the requests in flight,
    /// commits what they wrote, and then holds every later request unanswered for good
    /// (the process exits next; clients see the connection drop, reconnect to the next
    /// agent process and send those requests again). The lock stays held.
    pub async fn freeze(&self) -> Result<()> {
        let g = self.inner.write().await;
        let flushed = match (&g.file, g.active) {
            (Some(f), true) => {
                let mut r = f.flush().await.map_err(crate::error::Error::from);
                if let Some((m, _)) = &g.mirror {
                    r = r.and(m.target().flush().await.map_err(crate::error::Error::from));
                }
                r
            }
            _ => Ok(()),
        };
        // Never released: nothing may be acknowledged after this commit.
        std::mem::forget(g);
        flushed
    }

    pub async fn lock_version(&self, session: &Arc<Session>) -> Option<u64> {
        if !self.is_active() {
            return None;
        }
        let uuid = self.uuid().await;
        let s = Arc::clone(session);
        tokio::task::spawn_blocking(move || s.lock_version(&uuid).ok().flatten())
            .await
            .ok()
            .flatten()
    }

    /// The datastore path of the file the export serves.
    pub async fn path(&self) -> String {
        self.inner.read().await.path.clone()
    }

    /// Starts mirroring the export's file to `target` (a new file on some datastore,
    /// open with its exclusive lock); guest I/O goes through the mirror from now on.
    /// The mirror writes to `through(target)`: the file itself, or a test hook's wrapper.
    pub async fn start_mirror(
        &self,
        target: DsFile,
        opts: mirror::Options,
        through: impl FnOnce(Arc<dyn BlockDev>) -> Arc<dyn BlockDev>,
    ) -> Result<Arc<Mirror>> {
        let target = Arc::new(target);
        match self
            .begin_mirror(
                through(Arc::clone(&target) as Arc<dyn BlockDev>),
                Some(target.clone()),
                opts,
            )
            .await
        {
            Ok(m) => Ok(m),
            Err(e) => {
                let _ = close_shared(target, false).await;
                Err(e)
            }
        }
    }

    /// Starts mirroring the export's file to another host's export of the disk's new
    /// file (an NBD client): the disk moves with its VM to that host
    /// ([`Gate::release_synced`] ends it).
    pub async fn start_mirror_remote(
        &self,
        target: Arc<dyn BlockDev>,
        opts: mirror::Options,
    ) -> Result<Arc<Mirror>> {
        self.begin_mirror(target, None, opts).await
    }

    async fn begin_mirror(
        &self,
        target: Arc<dyn BlockDev>,
        file: Option<Arc<DsFile>>,
        opts: mirror::Options,
    ) -> Result<Arc<Mirror>> {
        let mut g = self.inner.write().await;
        if !g.active || self.read_only {
            bail!(
                "{}: only an active, writable export can be relocated",
                self.name.display()
            );
        }
        if g.mirror.is_some() {
            bail!(
                "{}: a relocation of this disk already runs",
                self.name.display()
            );
        }
        let source = Arc::clone(g.file.as_ref().ok_or_else(|| gone(&self.name))?);
        let m = Mirror::start(source as Arc<dyn BlockDev>, target, opts)?;
        g.mirror = Some((Arc::clone(&m), file));
        Ok(m)
    }

    /// Ends a mirror to another host once its target holds everything: with no request
    /// able to enter (the export is held for the whole step), checks that the target is
    /// in sync and flushes it, stops the mirror, flushes the file and releases its lock
    /// (the export stays, inactive, until its VM is gone — or is activated again if the
    /// move is rolled back). Fails, changing nothing, if the target is not in sync
    /// within `within`.
    /// Returns the mirror's final progress.
    pub async fn release_synced(&self, within: Duration) -> Result<mirror::Progress> {
        let mut g = self.inner.write().await;
        let Some(m) = g.mirror.as_ref().map(|(m, _)| Arc::clone(m)) else {
            bail!("{}: no relocation of this disk runs", self.name.display());
        };
        let pivot = m
            .prepare_pivot(within)
            .await
            .with_context(|| format!("{}: the disk's new copy", self.name.display()))?;
        // Everything is on the target and flushed; nothing can come in meanwhile.
        drop(pivot);
        g.mirror = None;
        m.cancel().await;
        let progress = m.progress();
        drop(m);
        let file = g.file(&self.name)?;
        file.flush().await?;
        let d = g.device.clone();
        let p = g.path.clone();
        let view = tokio::task::spawn_blocking(move || DsFile::open_readonly(&d, &p))
            .await
            .expect("open task")?;
        let old = g.file.replace(Arc::new(view)).expect("checked above");
        g.active = false;
        self.active.send_replace(false);
        close_shared(old, false).await?;
        Ok(progress)
    }

    /// After the mirror's pivot was committed: serves the target file directly from
    /// now on (at `device`:`path`) and returns the old file, still locked, for the
    /// caller to close and delete.
    pub async fn finish_pivot(&self, device: PathBuf, path: &str) -> Result<DsFile> {
        let mut g = self.inner.write().await;
        let Some((m, target)) = g.mirror.take() else {
            bail!("{}: no relocation runs", self.name.display());
        };
        if m.phase() != mirror::Phase::Done {
            g.mirror = Some((m, target));
            bail!("{}: the relocation has not pivoted", self.name.display());
        }
        let Some(target) = target else {
            g.mirror = Some((m, None));
            bail!(
                "{}: the relocation's target is on another host",
                self.name.display()
            );
        };
        m.finish().await;
        drop(m);
        let old = g.file.replace(target).ok_or_else(|| gone(&self.name))?;
        g.device = device;
        g.path = path.to_string();
        Arc::try_unwrap(old).map_err(|_| {
            crate::error::fail!("{}: the old file is still in use", self.name.display())
        })
    }

    /// Stops a relocation that did not pivot: the export keeps its file; returns the
    /// target (still locked) for the caller to close and delete.
    ///
    /// Guest I/O is held only while the mirror is taken out of the export's path; the
    /// wait for the target requests still in flight (up to twice the target timeout when
    /// the target hangs) happens after the guest's I/O goes to the file directly again.
    pub async fn abort_mirror(&self) -> Option<DsFile> {
        let (m, target) = {
            let mut g = self.inner.write().await;
            let (m, target) = g.mirror.take()?;
            if m.phase() == mirror::Phase::Done {
                // Too late to abort: it pivoted; keep it (finish_pivot must run instead).
                g.mirror = Some((m, target));
                return None;
            }
            (m, target)
        };
        m.cancel().await;
        drop(m);
        target.and_then(|t| Arc::try_unwrap(t).ok())
    }

    /// Waits until the export is active, or fails after the write hold.
    async fn wait_active(&self, offset: u64) -> diskfmt::Result<()> {
        let mut rx = self.active.subscribe();
        let ok = matches!(
            tokio::time::timeout(self.hold, rx.wait_for(|a| *a)).await,
            Ok(Ok(_))
        );
        if ok {
            Ok(())
        } else {
            Err(held_too_long(&self.name, offset, self.hold))
        }
    }
}

/// Commits a write's metadata (first writes to a thin or lazy-thick region, trims)
/// before it is acknowledged. The data itself is on the device already; what an agent
/// crash could lose is the map saying where. Clients of an export resend unanswered
/// requests to the next agent process, but a write answered by this one and a later
/// flush answered by the next one would otherwise leave that write's map uncommitted.
/// Overwrites of written space change nothing and cost nothing here.
async fn durable(f: &DsFile) -> diskfmt::Result<()> {
    if f.metadata_pending() {
        f.flush().await?;
    }
    Ok(())
}

impl BlockDev for Gate {
    fn name(&self) -> &Path {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.lbs
    }

    fn physical_block_size(&self) -> u32 {
        self.pbs
    }

    fn writable(&self) -> bool {
        !self.read_only
    }

    fn provisioning(&self) -> Provisioning {
        self.prov
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let g = self.inner.read().await;
            g.dev(&self.name)?.read(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            loop {
                let g = self.inner.read().await;
                if g.active {
                    let f = g.dev(&self.name)?;
                    f.write(offset, buf, flags).await?;
                    return g.durable(&self.name).await;
                }
                drop(g);
                self.wait_active(offset).await?;
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let g = self.inner.read().await;
            if g.active {
                g.dev(&self.name)?.flush().await
            } else {
                // Nothing was written through an inactive export.
                Ok(())
            }
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let g = self.inner.read().await;
                if g.active {
                    let f = g.dev(&self.name)?;
                    f.write_zeroes(offset, length, may_unmap).await?;
                    return g.durable(&self.name).await;
                }
                drop(g);
                self.wait_active(offset).await?;
            }
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            loop {
                let g = self.inner.read().await;
                if g.active {
                    let f = g.dev(&self.name)?;
                    f.discard(offset, length).await?;
                    return g.durable(&self.name).await;
                }
                drop(g);
                self.wait_active(offset).await?;
            }
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let g = self.inner.read().await;
            g.dev(&self.name)?.block_status(offset, length).await
        })
    }
}

/// Reads the persisted export table.
pub fn load(path: &Path) -> Result<Vec<ExportSpec>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{}: not an export table", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Writes the export table (atomically).
pub fn save(path: &Path, specs: &[ExportSpec]) -> Result<()> {
    crate::host::state::write_durably(path, &specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_names_need_the_secret() {
        let a = tcp_name("0123456789abcdef", "disk0");
        assert!(a.starts_with("disk0."));
        assert_eq!(a, tcp_name("0123456789abcdef", "disk0"));
        assert_ne!(a, tcp_name("0123456789abcdeX", "disk0"));
        assert_ne!(a, tcp_name("0123456789abcdef", "disk1"));
    }

    #[test]
    fn export_names_are_checked() {
        assert!(check_name("vm1-disk0.raw").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
