//! Files and folders in a datastore (DESIGN §3 "Space"), addressed as `DEVICE:/folder/file`.
//!
//! - [`Session`]: one joined host's access to a datastore: namespace operations (create,
//!   mkdir, remove, rename, grow), its resource clusters and its journal (`space`).
//! - [`DsFile`]: an open file, a [`diskfmt::BlockDev`] (`dsfile`).
//! - Read-only views (`list`, `stat`, [`DsFile::open_readonly`]) need no session: they
//!   read the committed state, as of each writer's last flush.
//!
//! Who writes what: namespace records (descriptors being created, renamed, freed) and
//! foreign cluster inboxes change under the volume lease; a file's descriptor and pointer
//! records only by the holder of its lock; a cluster's allocation record only by its
//! owner. Every metadata change goes through the host's journal.

mod dsfile;
mod space;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use diskfmt::Provisioning;
use uuid::Uuid;

use crate::filerec::{Descriptor, Entry, Kind, PointerRec, ENTRIES_PER_PTR, MAX_FILE_NAME};
use crate::format::{Block, Decoded, LockMode, Owner, BLOCK, RECORDS_PER_BLOCK};
use crate::paxos::VolumeLease;
use crate::store::{Datastore, Observer};
use crate::{locks, Error, Result};

pub use dsfile::DsFile;
pub(crate) use space::read_clusters as space_clusters;
pub use space::{space_info, SpaceInfo};

/// Locks `m`, treating poisoning (a panic elsewhere) as fatal for this process.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().expect("datastore state lock poisoned")
}

/// A validated path inside a datastore: its components, none empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsPath(Vec<String>);

impl DsPath {
    /// Parses `/a/b/c` (the leading `/` is optional; `/` alone is the root).
    pub fn parse(ds: &Path, s: &str) -> Result<DsPath> {
        let bad = |d: String| Error::Invalid {
            object: ds.to_path_buf(),
            detail: d,
        };
        let t = s.strip_prefix('/').unwrap_or(s);
        if t.is_empty() {
            return Ok(DsPath(Vec::new()));
        }
        let mut parts = Vec::new();
        for c in t.split('/') {
            if c.is_empty() {
                return Err(bad(format!("path {s:?} has an empty component")));
            }
            if c == "." || c == ".." {
                return Err(bad(format!("path {s:?}: {c:?} is not allowed")));
            }
            if c.len() > MAX_FILE_NAME {
                return Err(bad(format!(
                    "path {s:?}: a name is {} bytes, at most {MAX_FILE_NAME} are allowed",
                    c.len()
                )));
            }
            if c.chars().any(|ch| ch.is_control()) {
                return Err(bad(format!(
                    "path {s:?}: names cannot hold control characters"
                )));
            }
            parts.push(c.to_string());
        }
        Ok(DsPath(parts))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent folder and the last name (None for the root).
    pub fn split(&self) -> Option<(DsPath, &str)> {
        let (last, rest) = self.0.split_last()?;
        Some((DsPath(rest.to_vec()), last))
    }
}

impl std::fmt::Display for DsPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.0.join("/"))
    }
}

/// Splits `DEVICE:/path` into the device and the path inside it (None: not a datastore
/// path). A plain file name containing `:` but not `:/` is not one.
pub fn split_ds_path(s: &str) -> Option<(PathBuf, &str)> {
    let i = s.find(":/")?;
    Some((PathBuf::from(&s[..i]), &s[i + 1..]))
}

/// The descriptor table, read in one go.
#[derive(Debug)]
pub struct Table {
    pub entries: Vec<Decoded<(Descriptor, u64)>>,
}

impl Table {
    pub fn read(ds: &Datastore) -> Result<Table> {
        let sb = ds.superblock();
        let recs = ds.read_many(sb.desc_start, sb.desc_count as u64)?;
        Ok(Table {
            entries: recs
                .iter()
                .map(|b| Descriptor::decode(b, ds.uuid()))
                .collect(),
        })
    }

    pub fn get(&self, id: u32) -> Option<&(Descriptor, u64)> {
        match self.entries.get(id as usize)? {
            Decoded::Valid(d) if d.0.kind != Kind::Free => Some(d),
            _ => None,
        }
    }

    pub fn child(&self, parent: u32, name: &str) -> Option<u32> {
        self.entries.iter().enumerate().find_map(|(i, d)| match d {
            Decoded::Valid((d, _))
                if i != 0 && d.kind != Kind::Free && d.parent == parent && d.name == name =>
            {
                Some(i as u32)
            }
            _ => None,
        })
    }

    pub fn children(&self, parent: u32) -> Vec<u32> {
        (1..self.entries.len() as u32)
            .filter(|&i| self.get(i).is_some_and(|(d, _)| d.parent == parent))
            .collect()
    }

    /// Resolves `path` to a descriptor id.
    pub fn resolve(&self, ds: &Datastore, path: &DsPath) -> Result<u32> {
        let mut cur = 0u32;
        for (n, c) in path.0.iter().enumerate() {
            let Some((d, _)) = self.get(cur) else {
                return Err(not_found(ds, path));
            };
            if d.kind != Kind::Folder {
                return Err(Error::Invalid {
                    object: display(ds, &DsPath(path.0[..n].to_vec())),
                    detail: "is a file, not a folder".into(),
                });
            }
            cur = self.child(cur, c).ok_or_else(|| not_found(ds, path))?;
        }
        Ok(cur)
    }

    /// A free descriptor slot (blank or freed; unknown ones are never reused).
    pub fn vacant(&self) -> Option<(u32, u64)> {
        self.entries
            .iter()
            .enumerate()
            .skip(1)
            .find_map(|(i, d)| match d {
                Decoded::Blank => Some((i as u32, 0)),
                Decoded::Valid((d, g)) if d.kind == Kind::Free => Some((i as u32, *g)),
                _ => None,
            })
    }

    /// The path of descriptor `id` (for messages and listings).
    pub fn path_of(&self, id: u32) -> DsPath {
        let mut parts = Vec::new();
        let mut cur = id;
        let mut guard = 0;
        while cur != 0 && guard < self.entries.len() {
            match self.get(cur) {
                Some((d, _)) => {
                    parts.push(d.name.clone());
                    cur = d.parent;
                }
                None => break,
            }
            guard += 1;
        }
        parts.reverse();
        DsPath(parts)
    }
}

pub fn display(ds: &Datastore, path: &DsPath) -> PathBuf {
    PathBuf::from(format!("{}:{path}", ds.path().display()))
}

fn not_found(ds: &Datastore, path: &DsPath) -> Error {
    Error::NotFound {
        object: display(ds, path),
    }
}

/// The lock object of a file.
pub(crate) fn lock_object(uuid: &Uuid) -> String {
    format!("file:{uuid}")
}

/// Record index of descriptor `id`.
pub(crate) fn desc_rec(ds: &Datastore, id: u32) -> u64 {
    ds.superblock().desc_start + id as u64
}

/// Record index of pointer record `r` of a file whose map blocks are `maps`.
pub(crate) fn ptr_rec(ds: &Datastore, d: &Descriptor, r: u32) -> Option<u64> {
    let mb = d.maps.get(r as usize / RECORDS_PER_BLOCK as usize)?;
    Some(ds.superblock().block_record(mb.block) + r as u64 % RECORDS_PER_BLOCK)
}

/// A file's block map as committed: one entry per 1 MiB block of its size, and the
/// generation of each pointer record found.
pub fn load_map(
    ds: &Datastore,
    name: &Path,
    d: &Descriptor,
) -> Result<(Vec<Entry>, HashMap<u32, u64>)> {
    let nblocks = d.size.div_ceil(BLOCK) as usize;
    let mut map = vec![Entry::default(); nblocks];
    let mut gens = HashMap::new();
    let sb = ds.superblock();
    for (mi, mb) in d.maps.iter().enumerate() {
        if mb.block >= sb.block_count {
            return Err(corrupt(
                name,
                format!("map block {} is outside the data area", mb.block),
            ));
        }
        let recs = ds.read_many(sb.block_record(mb.block), RECORDS_PER_BLOCK)?;
        for (k, b) in recs.iter().enumerate() {
            let r = (mi as u64 * RECORDS_PER_BLOCK) as u32 + k as u32;
            let (p, g) = match PointerRec::decode(b, ds.uuid()) {
                Decoded::Valid(x) => x,
                Decoded::Blank => continue,
                // Map blocks are zeroed before they are published and pointer records are
                // written through the journal: an unreadable one is damage (or a record
                // read while its writer rewrote it), never holes.
                Decoded::Unknown(why) => {
                    return Err(corrupt(
                        name,
                        format!(
                            "pointer record {r} (map block {}) is unreadable ({why})",
                            mb.block
                        ),
                    ))
                }
            };
            if p.file != d.uuid || p.seq != mb.seq || p.index != r {
                continue; // stale: an earlier use of this block
            }
            gens.insert(r, g);
            let first = r as usize * ENTRIES_PER_PTR;
            for (j, e) in p.entries.iter().enumerate() {
                if let Some(slot) = map.get_mut(first + j) {
                    if e.block.is_some_and(|b| b >= sb.block_count) {
                        return Err(corrupt(
                            name,
                            format!("block {} of the map is outside the data area", first + j),
                        ));
                    }
                    *slot = *e;
                }
            }
        }
    }
    Ok((map, gens))
}

fn corrupt(name: &Path, detail: String) -> Error {
    Error::Invalid {
        object: name.to_path_buf(),
        detail: format!("damaged file metadata: {detail} (run `ferry datastore check`)"),
    }
}

/// What `stat` and `ls` report about a file or folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stat {
    pub path: String,
    pub kind: Kind,
    /// Virtual size in bytes (files).
    pub size: u64,
    pub provisioning: Option<Provisioning>,
    /// Bytes of data blocks allocated (files).
    pub allocated_bytes: u64,
    pub uuid: Option<Uuid>,
    /// Who holds the file's lock, as "mode by host (id, generation)…", if anyone.
    pub lock: Option<String>,
}

fn stat_of(ds: &Datastore, table: &Table, id: u32, locks: &[locks::LockEntry]) -> Result<Stat> {
    let (d, _) = table
        .get(id)
        .ok_or_else(|| not_found(ds, &table.path_of(id)))?;
    let path = table.path_of(id);
    if d.kind == Kind::Folder {
        return Ok(Stat {
            path: path.to_string(),
            kind: Kind::Folder,
            size: 0,
            provisioning: None,
            allocated_bytes: 0,
            uuid: None,
            lock: None,
        });
    }
    let (map, _) = load_map(ds, &display(ds, &path), d)?;
    let allocated = map.iter().filter(|e| e.block.is_some()).count() as u64 * BLOCK;
    let obj = lock_object(&d.uuid);
    let lock = locks
        .iter()
        .find(|l| l.lock.object == obj && !l.lock.holders.is_empty())
        .map(|l| {
            format!(
                "{} by {}",
                l.lock.mode.as_str(),
                l.lock
                    .holders
                    .iter()
                    .map(|h| format!("host {} (generation {})", h.host_id, h.generation))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    Ok(Stat {
        path: path.to_string(),
        kind: Kind::File,
        size: d.size,
        provisioning: Some(d.provisioning),
        allocated_bytes: allocated,
        uuid: Some(d.uuid),
        lock,
    })
}

/// `stat` of one path (committed state; no session needed).
pub fn stat(ds: &Datastore, path: &str) -> Result<Stat> {
    let p = DsPath::parse(ds.path(), path)?;
    let table = Table::read(ds)?;
    let id = table.resolve(ds, &p)?;
    stat_of(ds, &table, id, &locks::list(ds)?)
}

/// Lists a folder (or stats a single file), sorted by name.
pub fn list(ds: &Datastore, path: &str) -> Result<Vec<Stat>> {
    let p = DsPath::parse(ds.path(), path)?;
    let table = Table::read(ds)?;
    let id = table.resolve(ds, &p)?;
    let all_locks = locks::list(ds)?;
    let (d, _) = table.get(id).ok_or_else(|| not_found(ds, &p))?;
    if d.kind == Kind::File {
        return Ok(vec![stat_of(ds, &table, id, &all_locks)?]);
    }
    let mut out = table
        .children(id)
        .into_iter()
        .map(|c| stat_of(ds, &table, c, &all_locks))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// One joined host's access to a datastore. The caller keeps the host lease (and its
/// fencing) alive for as long as the session is used.
#[derive(Debug)]
pub struct Session {
    pub(crate) ds: Arc<Datastore>,
    pub(crate) me: Owner,
    pub(crate) obs: Mutex<Observer>,
    /// Journal sequence; held for every journal transaction.
    pub(crate) commit_lock: Mutex<u64>,
    /// Allocation and frees hold it shared; a commit's snapshot holds it exclusive, so a
    /// snapshot never sees a block allocated but not yet in its file's map.
    pub(crate) cut: RwLock<()>,
    pub(crate) space: Mutex<space::Space>,
    pub(crate) files: Mutex<Vec<Weak<dsfile::FileShared>>>,
    /// Open handles of this host, per file: the lock record names the host, not a handle,
    /// so the session counts them (the lock is released with the last one) and refuses
    /// what an open handle forbids (remove, rename, a second writable open).
    pub(crate) handles: Mutex<std::collections::HashMap<Uuid, (LockMode, usize)>>,
    pub(crate) data: Arc<diskfmt::file::DirectFile>,
    /// A plain descriptor of the device, for `fdatasync` before a commit.
    pub(crate) sync: std::fs::File,
    /// Why the session stopped changing the datastore, once it has: a metadata commit
    /// whose outcome is partly or wholly unknown leaves memory that can no longer be
    /// trusted. Every lock stays held until the host restarts (or is gone), when the
    /// journal settles the outcome.
    pub(crate) stopped: Mutex<Option<String>>,
}

impl Session {
    /// Starts a session for host `me` (joined to `ds`): finishes any transaction an
    /// earlier incarnation of this host left half-done.
    pub fn start(ds: Arc<Datastore>, me: Owner) -> Result<Arc<Session>> {
        let mut obs = Observer::new(&ds);
        let wait = ds.superblock().host_dead() + 4 * ds.superblock().io_timeout();
        VolumeLease::acquire(&ds, me, &mut obs, wait)?.release()?;
        Self::assemble(ds, me, obs, space::Space::default())
    }

    /// The session itself, once the volume lease has seen the journals finished.
    fn assemble(
        ds: Arc<Datastore>,
        me: Owner,
        obs: Observer,
        space: space::Space,
    ) -> Result<Arc<Session>> {
        let seq = crate::journal::last_seq(&ds, me.host_id)?;
        let engine = diskfmt::Engine::global()
            .map_err(|e| Error::io(ds.path(), "start the I/O engine", e))?;
        let (data, sync) = open_data_path(&ds, engine)?;
        Ok(Arc::new(Session {
            ds,
            me,
            obs: Mutex::new(obs),
            commit_lock: Mutex::new(seq),
            cut: RwLock::new(()),
            space: Mutex::new(space),
            files: Mutex::new(Vec::new()),
            handles: Mutex::new(std::collections::HashMap::new()),
            data: Arc::new(data),
            sync,
            stopped: Mutex::new(None),
        }))
    }

    /// Refuses every change once the session has stopped (see [`Session::stop`]).
    pub(crate) fn running(&self) -> Result<()> {
        match &*lock(&self.stopped) {
            None => Ok(()),
            Some(why) => Err(Error::Io {
                object: self.ds.path().to_path_buf(),
                detail: format!(
                    "this host stopped changing the datastore ({why}); its locks stay held: \
                     restart ferry on this host once the device works (the journal settles \
                     the commit then)"
                ),
            }),
        }
    }

    /// Stops the session after `what` failed with an outcome memory cannot follow.
    pub(crate) fn stop(&self, what: &str, e: Error) -> Error {
        let why = format!("{what} failed with an unknown outcome: {e}");
        tracing::error!("{}: {why}", self.ds.path().display());
        lock(&self.stopped).get_or_insert(why);
        self.running().expect_err("just stopped")
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.ds
    }

    /// Starts a session for a host that resumed its slot after a process restart (see
    /// `HostLease::resume`): the earlier process has exited, so its unapplied journal
    /// transaction is finished now, and the resource clusters it owned (same host id and
    /// generation) are this session's again, as committed on disk. Blocks it had
    /// allocated but not committed read as free: no committed map points at them.
    pub fn resume(ds: Arc<Datastore>, me: Owner) -> Result<Arc<Session>> {
        let mut obs = Observer::new(&ds);
        let wait = ds.superblock().host_dead() + 4 * ds.superblock().io_timeout();
        let lease = VolumeLease::acquire(&ds, me, &mut obs, wait)?;
        let loaded = (|| -> Result<space::Space> {
            crate::journal::replay_if(&ds, me.host_id, |w| {
                w.host_id == me.host_id && w.generation <= me.generation
            })?;
            let mut sp = space::Space::default();
            for (c, (used, _)) in space::read_clusters(&ds)?.into_iter().enumerate() {
                if let Decoded::Valid((u, g)) = used {
                    if u.owner == me {
                        sp.owned.insert(
                            c as u32,
                            space::OwnedCluster {
                                used: u,
                                generation: g,
                                dirty: false,
                            },
                        );
                    }
                }
            }
            Ok(sp)
        })();
        let released = lease.release();
        let sp = loaded?;
        released?;
        Self::assemble(ds, me, obs, sp)
    }

    /// Reads the heartbeat region into this session's observer and returns what it
    /// sees. Called periodically by a long-running host (the agent), so that when it
    /// needs to break a dead host's lock, its observer has watched that host's slot for
    /// as long as it really has been unchanged.
    pub fn observe(&self) -> Result<Vec<crate::store::SlotView>> {
        Ok(lock(&self.obs).observe(&self.ds)?.to_vec())
    }

    /// This host's lock on a file (opened by us): the lock version, for a handoff by
    /// expected version.
    pub fn lock_version(&self, uuid: &Uuid) -> Result<Option<u64>> {
        let obj = lock_object(uuid);
        Ok(locks::list(&self.ds)?
            .into_iter()
            .find(|e| e.lock.object == obj && e.lock.holders.contains(&self.me))
            .map(|e| e.lock.version))
    }

    /// Hands this host's exclusive lock on a file to host `to` if it is still at
    /// `expected` (None: whatever version it has now, as long as we alone hold it).
    pub fn handoff(&self, uuid: &Uuid, to: Owner, expected: Option<u64>) -> Result<u64> {
        self.running()?;
        let expected = match expected {
            Some(v) => v,
            None => self.lock_version(uuid)?.ok_or_else(|| Error::Invalid {
                object: self.ds.path().to_path_buf(),
                detail: format!("this host does not hold file {uuid}"),
            })?,
        };
        locks::handoff(
            &self.ds,
            self.me,
            &mut lock(&self.obs),
            &lock_object(uuid),
            to,
            expected,
        )
    }

    pub fn owner(&self) -> Owner {
        self.me
    }

    fn lease_wait(&self) -> std::time::Duration {
        self.ds.superblock().host_dead() + 4 * self.ds.superblock().io_timeout()
    }

    /// Under the volume lease, with a fresh descriptor table: writes the records `f`
    /// returns, through this host's journal (a crash mid-write never leaves a torn
    /// descriptor).
    fn with_lease(&self, f: impl FnOnce(&Table) -> Result<Vec<(u64, Box<Block>)>>) -> Result<()> {
        self.running()?;
        let mut obs = lock(&self.obs);
        let lease = VolumeLease::acquire(&self.ds, self.me, &mut obs, self.lease_wait())?;
        drop(obs);
        let out = Table::read(&self.ds)
            .and_then(|t| f(&t))
            .and_then(|writes| {
                // The sequence number only labels the transaction: no need to wait for the
                // session's commits.
                let seq = crate::journal::last_seq(&self.ds, self.me.host_id)? + 1;
                match crate::journal::commit_txn(&self.ds, self.me, seq, &writes) {
                    Ok(()) => Ok(()),
                    Err(f) if f.outcome == crate::journal::Outcome::InDoubt => {
                        Err(self.stop("changing a descriptor", f.error))
                    }
                    Err(f) => Err(f.error),
                }
            });
        let released = lease.release();
        out?;
        released
    }

    fn parse(&self, path: &str) -> Result<DsPath> {
        DsPath::parse(self.ds.path(), path)
    }

    /// Creates a folder.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        let p = self.parse(path)?;
        let (parent, name) = p.split().ok_or_else(|| Error::Exists {
            object: display(&self.ds, &p),
            detail: "the root folder always exists".into(),
        })?;
        let name = name.to_string();
        self.with_lease(|t| {
            let pid = self.parent_folder(t, &parent)?;
            if t.child(pid, &name).is_some() {
                return Err(exists(&self.ds, &p));
            }
            let (id, g) = self.vacant(t)?;
            let d = Descriptor {
                kind: Kind::Folder,
                parent: pid,
                name: name.clone(),
                ..Descriptor::root()
            };
            Ok(vec![(
                desc_rec(&self.ds, id),
                d.encode(self.ds.uuid(), g + 1),
            )])
        })
    }

    fn parent_folder(&self, t: &Table, parent: &DsPath) -> Result<u32> {
        let pid = t.resolve(&self.ds, parent)?;
        match t.get(pid) {
            Some((d, _)) if d.kind == Kind::Folder => Ok(pid),
            _ => Err(Error::Invalid {
                object: display(&self.ds, parent),
                detail: "is not a folder".into(),
            }),
        }
    }

    fn vacant(&self, t: &Table) -> Result<(u32, u64)> {
        t.vacant().ok_or_else(|| Error::NoSpace {
            object: self.ds.path().to_path_buf(),
            detail: format!(
                "all {} file descriptors are in use",
                self.ds.superblock().desc_count
            ),
        })
    }

    /// Creates a file of `size` bytes (a multiple of 512) and opens it exclusively.
    pub async fn create(
        self: &Arc<Self>,
        path: &str,
        size: u64,
        provisioning: Provisioning,
    ) -> Result<DsFile> {
        let p = self.parse(path)?;
        let shown = display(&self.ds, &p);
        if !size.is_multiple_of(512) || size > crate::filerec::MAX_FILE_SIZE {
            return Err(Error::Invalid {
                object: shown,
                detail: format!(
                    "size {size} must be a multiple of 512 bytes and at most {} bytes",
                    crate::filerec::MAX_FILE_SIZE
                ),
            });
        }
        let (parent, name) = p.split().ok_or_else(|| Error::Invalid {
            object: shown.clone(),
            detail: "a file needs a name".into(),
        })?;
        let name = name.to_string();
        let this = Arc::clone(self);
        let p2 = p.clone();
        tokio::task::spawn_blocking(move || {
            this.with_lease(|t| {
                let pid = this.parent_folder(t, &parent)?;
                if t.child(pid, &name).is_some() {
                    return Err(exists(&this.ds, &p2));
                }
                let (id, g) = this.vacant(t)?;
                let d = Descriptor {
                    kind: Kind::File,
                    provisioning,
                    parent: pid,
                    uuid: Uuid::new_v4(),
                    name: name.clone(),
                    ..Descriptor::root()
                };
                Ok(vec![(
                    desc_rec(&this.ds, id),
                    d.encode(this.ds.uuid(), g + 1),
                )])
            })
        })
        .await
        .expect("create task")?;
        let f = self.open(path, LockMode::Exclusive).await?;
        if size > 0 {
            if let Err(e) = f.grow(size).await {
                let _ = f.close().await;
                let _ = self.remove(path).await;
                return Err(e);
            }
        }
        Ok(f)
    }

    /// Opens a file with a lock of `mode`: exclusive (read-write, one host), shared
    /// (read-only, many hosts) or multi-writer (read-write on many hosts; eager-thick
    /// files only, whose blocks never move).
    pub async fn open(self: &Arc<Self>, path: &str, mode: LockMode) -> Result<DsFile> {
        let this = Arc::clone(self);
        let path = path.to_string();
        tokio::task::spawn_blocking(move || this.open_blocking(&path, mode))
            .await
            .expect("open task")
    }

    fn open_blocking(self: &Arc<Self>, path: &str, mode: LockMode) -> Result<DsFile> {
        self.running()?;
        let p = self.parse(path)?;
        let shown = display(&self.ds, &p);
        let t = Table::read(&self.ds)?;
        let id = t.resolve(&self.ds, &p)?;
        let (d, _) = t.get(id).ok_or_else(|| not_found(&self.ds, &p))?;
        if d.kind != Kind::File {
            return Err(Error::Invalid {
                object: shown,
                detail: "is a folder".into(),
            });
        }
        if mode == LockMode::MultiWriter && d.provisioning != Provisioning::EagerThick {
            return Err(Error::Invalid {
                object: shown,
                detail: format!(
                    "multi-writer opens need an eager-thick file (this one is {})",
                    d.provisioning
                ),
            });
        }
        let uuid = d.uuid;
        let obj = lock_object(&uuid);
        // A second handle on this host: only read-only next to read-only (the hold is
        // already ours); anything else would give two maps of one file.
        let already = {
            let mut h = lock(&self.handles);
            match h.get_mut(&uuid) {
                Some((LockMode::Shared, n)) if mode == LockMode::Shared => {
                    *n += 1;
                    true
                }
                Some((held, _)) => {
                    return Err(Error::Invalid {
                        object: shown,
                        detail: format!(
                            "is already open on this host ({}): close that handle first",
                            held.as_str()
                        ),
                    })
                }
                None => {
                    // Reserve the entry while the lock is taken.
                    h.insert(uuid, (mode, 1));
                    false
                }
            }
        };
        if !already {
            if let Err(e) = locks::try_acquire(&self.ds, self.me, &mut lock(&self.obs), &obj, mode)
            {
                lock(&self.handles).remove(&uuid);
                return Err(name_file(e, &shown));
            }
        }
        // Under the lock, read the descriptor again: it is ours to trust now.
        let loaded = (|| {
            let rec = self.ds.read(desc_rec(&self.ds, id))?;
            match Descriptor::decode(&rec, self.ds.uuid()) {
                Decoded::Valid((d, g)) if d.kind == Kind::File && d.uuid == uuid => {
                    let (map, gens) = load_map(&self.ds, &shown, &d)?;
                    Ok((d, g, map, gens))
                }
                _ => Err(Error::NotFound {
                    object: shown.clone(),
                }),
            }
        })();
        match loaded {
            Ok((d, g, map, gens)) => {
                let f = DsFile::new(
                    Some(Arc::clone(self)),
                    Arc::clone(&self.ds),
                    Arc::clone(&self.data),
                    shown,
                    id,
                    Some(mode),
                    d,
                    g,
                    map,
                    gens,
                );
                lock(&self.files).push(Arc::downgrade(f.shared()));
                Ok(f)
            }
            Err(e) => {
                let _ = self.unlock(&uuid);
                Err(e)
            }
        }
    }

    /// Closes one handle of this host on a file; the last one releases the lock.
    pub(crate) fn unlock(&self, uuid: &Uuid) -> Result<()> {
        // A stopped session keeps its locks: what it last committed may not be applied.
        self.running()?;
        {
            let mut h = lock(&self.handles);
            match h.get_mut(uuid) {
                Some((_, n)) if *n > 1 => {
                    *n -= 1;
                    return Ok(());
                }
                _ => {
                    h.remove(uuid);
                }
            }
        }
        locks::release(&self.ds, self.me, &mut lock(&self.obs), &lock_object(uuid))
    }

    /// Closes one handle of this host on a file but keeps the lock (an agent that stops
    /// and comes back, or hands the lock to another host next): the next open takes it up
    /// again.
    pub(crate) fn detach_handle(&self, uuid: &Uuid) {
        let mut h = lock(&self.handles);
        match h.get_mut(uuid) {
            Some((_, n)) if *n > 1 => *n -= 1,
            _ => {
                h.remove(uuid);
            }
        }
    }

    /// Refuses what an open handle of this host forbids.
    fn refuse_if_open(&self, uuid: &Uuid, shown: &std::path::Path, what: &str) -> Result<()> {
        match lock(&self.handles).get(uuid) {
            Some((mode, _)) => Err(Error::Invalid {
                object: shown.to_path_buf(),
                detail: format!(
                    "is open on this host ({}): close it before {what}",
                    mode.as_str()
                ),
            }),
            None => Ok(()),
        }
    }

    /// Deletes a file (which nobody may have open) or an empty folder, freeing its space.
    pub async fn remove(self: &Arc<Self>, path: &str) -> Result<()> {
        let p = self.parse(path)?;
        if p.is_root() {
            return Err(Error::Invalid {
                object: display(&self.ds, &p),
                detail: "the root folder cannot be removed".into(),
            });
        }
        let t = {
            let ds = Arc::clone(&self.ds);
            tokio::task::spawn_blocking(move || Table::read(&ds))
                .await
                .expect("table task")?
        };
        let id = t.resolve(&self.ds, &p)?;
        let kind = t.get(id).map(|(d, _)| d.kind);
        if kind == Some(Kind::Folder) {
            let this = Arc::clone(self);
            return tokio::task::spawn_blocking(move || {
                this.with_lease(|t| {
                    let (d, g) = t.get(id).ok_or_else(|| not_found(&this.ds, &p))?;
                    if d.kind != Kind::Folder {
                        return Err(not_found(&this.ds, &p));
                    }
                    if !t.children(id).is_empty() {
                        return Err(Error::Invalid {
                            object: display(&this.ds, &p),
                            detail: "the folder is not empty".into(),
                        });
                    }
                    Ok(vec![(
                        desc_rec(&this.ds, id),
                        Descriptor::free().encode(this.ds.uuid(), g + 1),
                    )])
                })
            })
            .await
            .expect("remove task");
        }
        if let Some((d, _)) = t.get(id) {
            self.refuse_if_open(&d.uuid, &display(&self.ds, &p), "removing it")?;
        }
        let f = self.open(path, LockMode::Exclusive).await?;
        f.truncate_all().await?;
        let uuid = f.uuid();
        f.forget();
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let freed = this.with_lease(|t| match t.entries.get(id as usize) {
                Some(Decoded::Valid((d, g))) if d.uuid == uuid => Ok(vec![(
                    desc_rec(&this.ds, id),
                    Descriptor::free().encode(this.ds.uuid(), g + 1),
                )]),
                _ => Ok(Vec::new()),
            });
            let unlocked = this.unlock(&uuid);
            freed?;
            unlocked
        })
        .await
        .expect("remove task")
    }

    /// Renames or moves a file or folder. A file must not be open anywhere.
    pub async fn rename(self: &Arc<Self>, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.parse(from)?, self.parse(to)?);
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.rename_blocking(&src, &dst))
            .await
            .expect("rename task")
    }

    fn rename_blocking(&self, src: &DsPath, dst: &DsPath) -> Result<()> {
        let (dparent, dname) = dst.split().ok_or_else(|| exists(&self.ds, dst))?;
        let t = Table::read(&self.ds)?;
        let id = t.resolve(&self.ds, src)?;
        if id == 0 {
            return Err(Error::Invalid {
                object: display(&self.ds, src),
                detail: "the root folder cannot be renamed".into(),
            });
        }
        let (d, _) = t.get(id).ok_or_else(|| not_found(&self.ds, src))?.clone();
        if d.kind == Kind::File {
            self.refuse_if_open(&d.uuid, &display(&self.ds, src), "renaming it")?;
        }
        let file_lock = (d.kind == Kind::File).then(|| lock_object(&d.uuid));
        if let Some(obj) = &file_lock {
            locks::try_acquire(
                &self.ds,
                self.me,
                &mut lock(&self.obs),
                obj,
                LockMode::Exclusive,
            )
            .map_err(|e| name_file(e, &display(&self.ds, src)))?;
        }
        let out = self.with_lease(|t| {
            let pid = self.parent_folder(t, &dparent)?;
            if t.child(pid, dname).is_some() {
                return Err(exists(&self.ds, dst));
            }
            // A folder cannot move into itself or below itself.
            let mut cur = pid;
            while cur != 0 {
                if cur == id {
                    return Err(Error::Invalid {
                        object: display(&self.ds, dst),
                        detail: "a folder cannot move inside itself".into(),
                    });
                }
                cur = t.get(cur).map_or(0, |(d, _)| d.parent);
            }
            let (mut d, g) = t.get(id).ok_or_else(|| not_found(&self.ds, src))?.clone();
            d.parent = pid;
            d.name = dname.to_string();
            Ok(vec![(
                desc_rec(&self.ds, id),
                d.encode(self.ds.uuid(), g + 1),
            )])
        });
        if let Some(obj) = &file_lock {
            let _ = locks::release(&self.ds, self.me, &mut lock(&self.obs), obj);
        }
        out
    }

    /// Free and total space.
    pub fn space(&self) -> Result<SpaceInfo> {
        space::space_info(&self.ds)
    }
}

/// Opens the device path again for data I/O and for flushes, and proves it is still
/// the same datastore: a device path can be re-bound to another device between opens
/// (a loop device detached and attached to another image), and data written there
/// would land in someone else's blocks.
fn open_data_path(
    ds: &Datastore,
    engine: diskfmt::Engine,
) -> Result<(diskfmt::file::DirectFile, std::fs::File)> {
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
    let path = ds.path();
    let sync = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))?;
    let mut sb = crate::format::Block::zeroed();
    sync.read_exact_at(&mut sb.0, 0)
        .map_err(|e| Error::io(path, "read the superblock", e))?;
    let same = matches!(
        crate::format::Superblock::decode(&sb),
        Decoded::Valid(s) if s.uuid == *ds.uuid()
    );
    let data = diskfmt::file::DirectFile::open(path, diskfmt::file::OpenMode::ReadWrite, engine)?;
    let id = |m: std::fs::Metadata| (m.dev(), m.ino(), m.rdev());
    let data_meta = data
        .fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::io(path, "stat", e))?;
    let sync_meta = sync.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !same || id(data_meta) != id(sync_meta) {
        return Err(Error::Invalid {
            object: path.to_path_buf(),
            detail: format!(
                "no longer holds datastore {} (the path now leads elsewhere): open it again",
                ds.uuid()
            ),
        });
    }
    Ok((data, sync))
}

fn exists(ds: &Datastore, p: &DsPath) -> Error {
    Error::Exists {
        object: display(ds, p),
        detail: "already exists".into(),
    }
}

/// Makes a lock conflict name the file as well as the holder.
fn name_file(e: Error, file: &Path) -> Error {
    match e {
        Error::LockHeld { mode, holders, .. } => Error::LockHeld {
            object: file.display().to_string(),
            mode,
            holders,
        },
        e => e,
    }
}
