//! An open datastore file: a [`BlockDev`] over 1 MiB blocks of the shared device.
//!
//! Reads and writes go straight to the data blocks through the `diskfmt` engine
//! (io_uring, `O_DIRECT`). Metadata stays in memory until a flush (or a FUA write)
//! commits it: new blocks of thin files, and which 4 KiB sub-blocks hold written data
//! ("written" bits; an unwritten sub-block reads as zeros without touching the device,
//! so a first 4 KiB write into a fresh block costs one 4 KiB write, never a 1 MiB
//! zero-fill). A write marks its sub-blocks only once it has completed, and a flush
//! snapshots the marks *before* flushing the device, so a committed mark never points at
//! data that is not durable. After a crash, writes that were not flushed may read as
//! zeros; flushed ones are all there.
//!
//! Data operations hold the file's I/O lock shared; operations that change which blocks
//! back the file (write_zeroes, discard, grow) hold it exclusive, so no block is freed
//! while I/O to it is in flight. A write that only partly covers an unwritten sub-block
//! of a thin or lazy-thick file is padded with zeros to whole sub-blocks, exclusively.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use diskfmt::file::DirectFile;
use diskfmt::{BlockDev, Extent, ExtentKind, IoFuture, Provisioning, WriteFlags};
use uuid::Uuid;

use crate::filerec::{Descriptor, Entry, MapBlock, PointerRec, ENTRIES_PER_PTR, SUB_BLOCK};
use crate::format::{Block, LockMode, BLOCK, RECORDS_PER_BLOCK};
use crate::store::Datastore;
use crate::{Error, Result};

use super::{desc_rec, lock, ptr_rec, Session};

/// A file's in-memory state.
#[derive(Debug)]
pub(crate) struct FileState {
    pub desc: Descriptor,
    pub desc_gen: u64,
    pub desc_dirty: bool,
    pub map: Vec<Entry>,
    pub ptr_gen: HashMap<u32, u64>,
    pub ptr_dirty: BTreeSet<u32>,
}

/// What an open file shares with its session (for commits).
#[derive(Debug)]
pub(crate) struct FileShared {
    pub id: u32,
    pub name: PathBuf,
    /// None: a read-only view without a lock (committed state).
    pub mode: Option<LockMode>,
    pub st: Mutex<FileState>,
    pub io: tokio::sync::RwLock<()>,
}

impl FileShared {
    pub fn needs_merge(&self) -> bool {
        self.mode == Some(LockMode::MultiWriter) && !lock(&self.st).ptr_dirty.is_empty()
    }

    /// Encodes and clears the dirty records: (writes, multi-writer records to merge,
    /// whether the descriptor was dirty, the pointer records taken).
    #[allow(clippy::type_complexity)]
    pub fn take_dirty(
        &self,
        ds: &Datastore,
    ) -> (
        Vec<(u64, Box<Block>)>,
        Vec<(u64, PointerRec)>,
        bool,
        Vec<u32>,
    ) {
        let mut st = lock(&self.st);
        let mut writes = Vec::new();
        let mut merge = Vec::new();
        let desc = std::mem::take(&mut st.desc_dirty);
        if desc {
            st.desc_gen += 1;
            writes.push((
                desc_rec(ds, self.id),
                st.desc.encode(ds.uuid(), st.desc_gen),
            ));
        }
        let ptrs: Vec<u32> = std::mem::take(&mut st.ptr_dirty).into_iter().collect();
        for &r in &ptrs {
            let Some(rec) = ptr_rec(ds, &st.desc, r) else {
                continue; // its map block is gone (the file was truncated)
            };
            let first = r as usize * ENTRIES_PER_PTR;
            let entries = (first..first + ENTRIES_PER_PTR)
                .map(|i| st.map.get(i).copied().unwrap_or_default())
                .collect();
            let p = PointerRec {
                file: st.desc.uuid,
                seq: st.desc.maps[r as usize / RECORDS_PER_BLOCK as usize].seq,
                index: r,
                entries,
            };
            if self.mode == Some(LockMode::MultiWriter) {
                merge.push((rec, p));
            } else {
                let g = st.ptr_gen.entry(r).or_insert(0);
                *g += 1;
                writes.push((rec, p.encode(ds.uuid(), *g)));
            }
        }
        (writes, merge, desc, ptrs)
    }

    pub fn mark_dirty(&self, desc: bool, ptrs: &[u32]) {
        let mut st = lock(&self.st);
        st.desc_dirty |= desc;
        st.ptr_dirty.extend(ptrs.iter().copied());
    }
}

/// One piece of a read or write: `len` bytes at `buf_off` of the caller's buffer, on the
/// device at `dev` (None: zeros, nothing on the device).
#[derive(Debug, Clone, Copy)]
struct Seg {
    buf_off: usize,
    len: usize,
    dev: Option<u64>,
}

fn push_seg(segs: &mut Vec<Seg>, s: Seg) {
    if let Some(last) = segs.last_mut() {
        let contiguous = match (last.dev, s.dev) {
            (None, None) => true,
            (Some(a), Some(b)) => a + last.len as u64 == b,
            _ => false,
        };
        if contiguous && last.buf_off + last.len == s.buf_off {
            last.len += s.len;
            return;
        }
    }
    segs.push(s);
}

/// An open datastore file.
#[derive(Debug)]
pub struct DsFile {
    sh: Arc<FileShared>,
    sess: Option<Arc<Session>>,
    ds: Arc<Datastore>,
    data: Arc<DirectFile>,
    done: AtomicBool,
}

fn to_block(e: Error, name: &Path, offset: u64) -> diskfmt::Error {
    match e {
        Error::Block(b) => b,
        Error::NoSpace { detail, .. } => {
            tracing::warn!("{}: no space: {detail}", name.display());
            diskfmt::Error::Io {
                object: name.to_path_buf(),
                op: "allocate a block",
                offset,
                err: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }
        }
        // I/O fencing: past the host lease deadline nothing is written (EIO to the guest).
        Error::LeaseLost { detail, .. } => {
            tracing::error!("{}: {detail}", name.display());
            diskfmt::Error::Io {
                object: name.to_path_buf(),
                op: "write",
                offset,
                err: std::io::Error::from_raw_os_error(libc::EIO),
            }
        }
        Error::Io { object, detail } => {
            tracing::error!("{}: {detail}", object.display());
            diskfmt::Error::Io {
                object: name.to_path_buf(),
                op: "write",
                offset,
                err: std::io::Error::from_raw_os_error(libc::EIO),
            }
        }
        other => diskfmt::Error::Invalid {
            object: name.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

impl DsFile {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        sess: Option<Arc<Session>>,
        ds: Arc<Datastore>,
        data: Arc<DirectFile>,
        name: PathBuf,
        id: u32,
        mode: Option<LockMode>,
        desc: Descriptor,
        desc_gen: u64,
        map: Vec<Entry>,
        ptr_gen: HashMap<u32, u64>,
    ) -> DsFile {
        DsFile {
            sh: Arc::new(FileShared {
                id,
                name,
                mode,
                st: Mutex::new(FileState {
                    desc,
                    desc_gen,
                    desc_dirty: false,
                    map,
                    ptr_gen,
                    ptr_dirty: BTreeSet::new(),
                }),
                io: tokio::sync::RwLock::new(()),
            }),
            sess,
            ds,
            data,
            done: AtomicBool::new(false),
        }
    }

    /// Opens `path` of the datastore on `device` read-only, without a lock: the state
    /// committed by the last flush of whoever writes it.
    pub fn open_readonly(device: &Path, path: &str) -> Result<DsFile> {
        let ds = Arc::new(Datastore::open(device)?);
        let p = super::DsPath::parse(ds.path(), path)?;
        let shown = super::display(&ds, &p);
        let t = super::Table::read(&ds)?;
        let id = t.resolve(&ds, &p)?;
        let (d, g) = t
            .get(id)
            .ok_or_else(|| Error::NotFound {
                object: shown.clone(),
            })?
            .clone();
        if d.kind != crate::filerec::Kind::File {
            return Err(Error::Invalid {
                object: shown,
                detail: "is a folder".into(),
            });
        }
        let (map, gens) = super::load_map(&ds, &shown, &d)?;
        let engine = diskfmt::Engine::global()
            .map_err(|e| Error::io(ds.path(), "start the I/O engine", e))?;
        let data = DirectFile::open(ds.path(), diskfmt::file::OpenMode::ReadOnly, engine)?;
        Ok(DsFile::new(
            None,
            Arc::clone(&ds),
            Arc::new(data),
            shown,
            id,
            None,
            d,
            g,
            map,
            gens,
        ))
    }

    pub(crate) fn shared(&self) -> &Arc<FileShared> {
        &self.sh
    }

    /// The file's identity.
    pub fn uuid(&self) -> Uuid {
        lock(&self.sh.st).desc.uuid
    }

    /// The lock this file is open with (None: read-only view).
    pub fn mode(&self) -> Option<LockMode> {
        self.sh.mode
    }

    fn session(&self, offset: u64) -> diskfmt::Result<&Arc<Session>> {
        match (&self.sess, self.sh.mode) {
            (Some(s), Some(LockMode::Exclusive | LockMode::MultiWriter)) => {
                s.running()
                    .map_err(|e| to_block(e, &self.sh.name, offset))?;
                Ok(s)
            }
            _ => Err(diskfmt::Error::Invalid {
                object: self.sh.name.clone(),
                detail: format!("is open read-only (request at offset {offset})"),
            }),
        }
    }

    fn check(&self, offset: u64, len: u64) -> diskfmt::Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(diskfmt::Error::Invalid {
                object: self.sh.name.clone(),
                detail: format!(
                    "request at offset {offset} of {len} bytes is beyond the end ({size} bytes)"
                ),
            }),
        }
    }

    fn multi(&self) -> bool {
        self.sh.mode == Some(LockMode::MultiWriter)
    }

    /// Commits this host's pending metadata (blocking, on a worker thread).
    async fn commit(&self) -> Result<()> {
        let Some(s) = self.sess.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || s.commit())
            .await
            .expect("commit task")
    }

    /// Takes `n` blocks from this host's clusters (claiming more when they run short)
    /// without putting them in any map: a commit in between records them as used, so a
    /// crash before they are published leaks them (`check --repair` frees leaks), never
    /// exposes them.
    async fn alloc_unpublished(&self, n: usize) -> Result<Vec<u64>> {
        let sess = self.sess.as_ref().expect("a writable file has a session");
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            {
                let _cut = sess.cut.read().expect("cut");
                let mut sp = lock(&sess.space);
                got.extend(sp.alloc_fast(&self.ds, n - got.len()));
            }
            if got.len() < n {
                let s = Arc::clone(sess);
                if let Err(e) = tokio::task::spawn_blocking(move || s.make_room())
                    .await
                    .expect("claim task")
                {
                    self.free_unpublished(&got);
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Gives back blocks taken by [`Self::alloc_unpublished`] and never published.
    fn free_unpublished(&self, blocks: &[u64]) {
        let sess = self.sess.as_ref().expect("a writable file has a session");
        let _cut = sess.cut.read().expect("cut");
        let mut sp = lock(&sess.space);
        for &b in blocks {
            sp.free(&self.ds, b);
        }
    }

    /// Takes `n` blocks and fills them with zeros before anyone can see them.
    async fn alloc_zeroed(&self, n: usize) -> Result<Vec<u64>> {
        let blocks = self.alloc_unpublished(n).await?;
        if let Err(e) = self.zero_blocks(&blocks).await {
            self.free_unpublished(&blocks);
            return Err(e);
        }
        Ok(blocks)
    }

    /// Makes sure the file has `need` map blocks. A map block is zeroed before it is
    /// published, so every record in it is blank or a pointer record this file wrote: an
    /// unreadable one is damage, never an old block's data.
    async fn ensure_maps(&self, need: usize) -> Result<()> {
        let sess = self.sess.as_ref().expect("a writable file has a session");
        loop {
            let have = lock(&self.sh.st).desc.maps.len();
            if have >= need {
                return Ok(());
            }
            let blocks = self.alloc_zeroed(need - have).await?;
            let _cut = sess.cut.read().expect("cut");
            let mut st = lock(&self.sh.st);
            let mut sp = lock(&sess.space);
            for b in blocks {
                if st.desc.maps.len() < need {
                    st.desc.map_seq += 1;
                    let seq = st.desc.map_seq;
                    st.desc.maps.push(MapBlock { block: b, seq });
                    st.desc_dirty = true;
                } else {
                    sp.free(&self.ds, b); // a concurrent writer published one first
                }
            }
        }
    }

    /// The map blocks a file of `blocks` data blocks needs.
    fn maps_for(blocks: usize) -> usize {
        blocks
            .div_ceil(ENTRIES_PER_PTR)
            .div_ceil(RECORDS_PER_BLOCK as usize)
    }

    /// Makes sure blocks `first..last` (and the map blocks that describe them) exist,
    /// claiming clusters when this host's are full. New data blocks are published with
    /// no sub-block written (they read as zeros without touching the device).
    async fn ensure_blocks(&self, first: usize, last: usize) -> Result<()> {
        let sess = self.sess.as_ref().expect("a writable file has a session");
        self.ensure_maps(Self::maps_for(last)).await?;
        loop {
            let short = {
                let _cut = sess.cut.read().expect("cut");
                let mut st = lock(&self.sh.st);
                let mut sp = lock(&sess.space);
                let mut short = false;
                for i in first..last {
                    if st.map[i].block.is_some() {
                        continue;
                    }
                    let Some(b) = sp.alloc_fast(&self.ds, 1).pop() else {
                        short = true;
                        break;
                    };
                    st.map[i] = Entry {
                        block: Some(b),
                        written: [0; 4],
                    };
                    st.ptr_dirty.insert((i / ENTRIES_PER_PTR) as u32);
                }
                short
            };
            if !short {
                return Ok(());
            }
            let s = Arc::clone(sess);
            tokio::task::spawn_blocking(move || s.make_room())
                .await
                .expect("claim task")?;
        }
    }

    /// Grows the file to `new_size` bytes (a multiple of 512), allocating (lazy-thick)
    /// or allocating and zeroing (eager-thick) the new blocks, then commits. Eager-thick
    /// blocks join the file only once zeroed: their unwritten parts are read from the
    /// device, and must never show an earlier file's data.
    pub async fn grow(&self, new_size: u64) -> Result<()> {
        if self.sh.mode != Some(LockMode::Exclusive) {
            return Err(Error::Invalid {
                object: self.sh.name.clone(),
                detail: "growing a file needs an exclusive open".into(),
            });
        }
        let sess = Arc::clone(self.session(new_size).map_err(Error::Block)?);
        let _g = self.sh.io.write().await;
        let (old_blocks, prov) = {
            let st = lock(&self.sh.st);
            (st.map.len(), st.desc.provisioning)
        };
        let old = self.size();
        if new_size < old
            || !new_size.is_multiple_of(512)
            || new_size > crate::filerec::MAX_FILE_SIZE
        {
            return Err(Error::Invalid {
                object: self.sh.name.clone(),
                detail: format!(
                    "cannot grow from {old} to {new_size} bytes: the new size must be larger, a multiple of 512 and at most {}",
                    crate::filerec::MAX_FILE_SIZE
                ),
            });
        }
        let new_blocks = new_size.div_ceil(BLOCK) as usize;
        if prov != Provisioning::Thin {
            self.ensure_maps(Self::maps_for(new_blocks)).await?;
        }
        let fresh = if prov == Provisioning::EagerThick {
            self.alloc_zeroed(new_blocks - old_blocks).await?
        } else {
            Vec::new()
        };
        {
            let _cut = sess.cut.read().expect("cut");
            let mut st = lock(&self.sh.st);
            st.map.resize(new_blocks, Entry::default());
            for (i, b) in (old_blocks..new_blocks).zip(fresh) {
                st.map[i] = Entry {
                    block: Some(b),
                    written: [0; 4],
                };
                st.ptr_dirty.insert((i / ENTRIES_PER_PTR) as u32);
            }
            st.desc.size = new_size;
            st.desc_dirty = true;
        }
        if prov == Provisioning::LazyThick {
            self.ensure_blocks(old_blocks, new_blocks).await?;
        }
        self.commit().await
    }

    /// Writes zeros over whole data blocks.
    async fn zero_blocks(&self, blocks: &[u64]) -> Result<()> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in blocks {
            let off = self.ds.superblock().block_offset(b);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == off => *l += BLOCK,
                _ => runs.push((off, BLOCK)),
            }
        }
        for (off, len) in runs {
            self.ds.check_write(None)?;
            self.data.write_zero_data(off, len).await?;
        }
        Ok(())
    }

    /// Frees every block (used by remove), then commits.
    pub(crate) async fn truncate_all(&self) -> Result<()> {
        let sess = self.session(0).map_err(Error::Block)?;
        let _g = self.sh.io.write().await;
        {
            let _cut = sess.cut.read().expect("cut");
            let mut st = lock(&self.sh.st);
            let mut sp = lock(&sess.space);
            let blocks: Vec<u64> = st
                .map
                .iter()
                .filter_map(|e| e.block)
                .chain(st.desc.maps.iter().map(|m| m.block))
                .collect();
            for b in blocks {
                sp.free(&self.ds, b);
            }
            st.map.clear();
            st.desc.maps.clear();
            st.desc.size = 0;
            st.desc_dirty = true;
            st.ptr_dirty.clear();
        }
        self.commit().await
    }

    /// Commits and releases the lock.
    pub async fn close(self) -> Result<()> {
        self.done.store(true, Ordering::SeqCst);
        let Some(sess) = self.sess.clone() else {
            return Ok(());
        };
        let uuid = self.uuid();
        let committed = if self.sh.mode.is_some_and(|m| m != LockMode::Shared) {
            self.commit().await
        } else {
            Ok(())
        };
        let unlocked = tokio::task::spawn_blocking(move || sess.unlock(&uuid))
            .await
            .expect("unlock task");
        committed?;
        unlocked
    }

    /// Commits and closes the handle but keeps the lock: for an agent that stops and
    /// comes back (its next incarnation opens the file again under the same lock), or
    /// that hands the lock to another host next.
    pub async fn detach(self) -> Result<()> {
        self.done.store(true, Ordering::SeqCst);
        let committed =
            if self.sess.is_some() && self.sh.mode.is_some_and(|m| m != LockMode::Shared) {
                self.commit().await
            } else {
                Ok(())
            };
        if let Some(sess) = &self.sess {
            sess.detach_handle(&self.uuid());
        }
        committed
    }

    /// Whether metadata changed by this file's completed writes may not be durable yet:
    /// records still dirty, or a commit in progress that may have taken them. A server
    /// whose clients resend unanswered requests to its next process (the agent's NBD
    /// exports) flushes before acknowledging a write while this is true, so a write it
    /// acknowledged survives the process — a later flush sent to the next process could
    /// not commit what only this one knew.
    pub fn metadata_pending(&self) -> bool {
        {
            let st = lock(&self.sh.st);
            if st.desc_dirty || !st.ptr_dirty.is_empty() {
                return true;
            }
        }
        match &self.sess {
            // A commit holds this lock from before its snapshot until it is durable.
            Some(s) => s.commit_lock.try_lock().is_err(),
            None => false,
        }
    }

    /// Drops the handle without committing or unlocking (the caller does both).
    pub(crate) fn forget(self) {
        self.done.store(true, Ordering::SeqCst);
    }

    /// Plans the device pieces of `offset..offset+len` for a read.
    fn plan_read(&self, offset: u64, len: usize) -> Vec<Seg> {
        let st = lock(&self.sh.st);
        let multi = self.multi();
        let sb = self.ds.superblock();
        let mut segs = Vec::new();
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let bi = (pos / BLOCK) as usize;
            let in_block = pos % BLOCK;
            let sub = (in_block / SUB_BLOCK) as usize;
            let sub_end = ((sub as u64 + 1) * SUB_BLOCK).min(BLOCK);
            let n = (sub_end - in_block).min(end - pos) as usize;
            let e = st.map[bi];
            let dev = match e.block {
                Some(b) if multi || e.is_written(sub) => Some(sb.block_offset(b) + in_block),
                _ => None,
            };
            push_seg(
                &mut segs,
                Seg {
                    buf_off: (pos - offset) as usize,
                    len: n,
                    dev,
                },
            );
            pos += n as u64;
        }
        segs
    }

    /// Whether a write of `offset..end` partly covers a sub-block holding no written
    /// data (which must then be padded with zeros).
    fn needs_pad(&self, offset: u64, end: u64) -> bool {
        let st = lock(&self.sh.st);
        if st.desc.provisioning == Provisioning::EagerThick {
            return false; // unwritten sub-blocks are zeros on the device
        }
        let partial_unwritten = |at: u64| {
            if at.is_multiple_of(SUB_BLOCK) || at >= st.desc.size {
                return false;
            }
            let e = st.map[(at / BLOCK) as usize];
            e.block.is_none() || !e.is_written(((at % BLOCK) / SUB_BLOCK) as usize)
        };
        // `end - 1` lies in the last sub-block, which is partial unless `end` is aligned.
        partial_unwritten(offset) || (!end.is_multiple_of(SUB_BLOCK) && partial_unwritten(end - 1))
    }

    async fn write_impl(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.ds.check_write(None)?;
        let sess = self.session(offset).map_err(Error::Block)?;
        self.check(offset, buf.len() as u64).map_err(Error::Block)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let shared = self.sh.io.read().await;
        let (_shared, _excl, padded);
        if self.needs_pad(offset, end) {
            drop(shared);
            _excl = Some(self.sh.io.write().await);
            _shared = None;
        } else {
            _shared = Some(shared);
            _excl = None;
        }
        // Pad to whole sub-blocks where an edge sub-block holds no written data.
        let (woff, data): (u64, &[u8]) = if _excl.is_some() && self.needs_pad(offset, end) {
            let ps = offset / SUB_BLOCK * SUB_BLOCK;
            let pe = end.div_ceil(SUB_BLOCK) * SUB_BLOCK;
            let (pad_start, pad_end) = {
                let st = lock(&self.sh.st);
                let unwritten = |at: u64| {
                    let e = st.map[(at / BLOCK) as usize];
                    e.block.is_none() || !e.is_written(((at % BLOCK) / SUB_BLOCK) as usize)
                };
                (
                    if !offset.is_multiple_of(SUB_BLOCK) && unwritten(offset) {
                        ps
                    } else {
                        offset
                    },
                    if !end.is_multiple_of(SUB_BLOCK) && unwritten(end - 1) {
                        pe
                    } else {
                        end
                    },
                )
            };
            let mut v = vec![0u8; (pad_end - pad_start) as usize];
            let at = (offset - pad_start) as usize;
            v[at..at + buf.len()].copy_from_slice(buf);
            padded = v;
            (pad_start, &padded[..])
        } else {
            (offset, buf)
        };
        let wend = woff + data.len() as u64;
        let (first, last) = ((woff / BLOCK) as usize, wend.div_ceil(BLOCK) as usize);
        if !self.multi() {
            self.ensure_blocks(first, last).await?;
        }
        let segs = {
            let st = lock(&self.sh.st);
            let sb = self.ds.superblock();
            let mut segs = Vec::new();
            let mut pos = woff;
            while pos < wend {
                let bi = (pos / BLOCK) as usize;
                let in_block = pos % BLOCK;
                let n = (BLOCK - in_block).min(wend - pos) as usize;
                let Some(b) = st.map[bi].block else {
                    return Err(Error::Invalid {
                        object: self.sh.name.clone(),
                        detail: format!("block {bi} of a multi-writer file is not allocated"),
                    });
                };
                push_seg(
                    &mut segs,
                    Seg {
                        buf_off: (pos - woff) as usize,
                        len: n,
                        dev: Some(sb.block_offset(b) + in_block),
                    },
                );
                pos += n as u64;
            }
            segs
        };
        // I/O fencing, immediately before the data is submitted.
        self.ds.check_write(None)?;
        let writes = segs.iter().map(|s| {
            self.data.write_at(
                s.dev.expect("write segments are on the device"),
                &data[s.buf_off..s.buf_off + s.len],
                false,
            )
        });
        futures::future::try_join_all(writes).await?;
        // Completed: mark the sub-blocks written.
        {
            let mut st = lock(&self.sh.st);
            let mut pos = woff / SUB_BLOCK * SUB_BLOCK;
            while pos < wend {
                let bi = (pos / BLOCK) as usize;
                let sub = ((pos % BLOCK) / SUB_BLOCK) as usize;
                if !st.map[bi].is_written(sub) {
                    st.map[bi].set_written(sub, true);
                    st.ptr_dirty.insert((bi / ENTRIES_PER_PTR) as u32);
                }
                pos += SUB_BLOCK;
            }
        }
        if flags.fua {
            self.commit().await?;
        }
        let _ = sess;
        Ok(())
    }

    async fn zero_impl(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        // Past the lease deadline no change is made, even one only the map records.
        self.ds.check_write(None)?;
        let sess = self.session(offset).map_err(Error::Block)?;
        self.check(offset, len).map_err(Error::Block)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.sh.io.write().await;
        let end = offset + len;
        let sb = self.ds.superblock();
        // Byte ranges of the device to fill with real zeros.
        let mut zero_dev: Vec<(u64, u64)> = Vec::new();
        {
            let _cut = sess.cut.read().expect("cut");
            let mut st = lock(&self.sh.st);
            let mut sp = lock(&sess.space);
            let prov = st.desc.provisioning;
            let multi = self.multi();
            let mut pos = offset;
            while pos < end {
                let bi = (pos / BLOCK) as usize;
                let in_block = pos % BLOCK;
                let n = (BLOCK - in_block).min(end - pos);
                let e = st.map[bi];
                let Some(b) = e.block else {
                    pos += n;
                    continue; // a hole already reads as zeros
                };
                let base = sb.block_offset(b);
                if multi {
                    zero_dev.push((base + in_block, n));
                    pos += n;
                    continue;
                }
                let mut ne = e;
                let s0 = in_block / SUB_BLOCK;
                let s1 = (in_block + n).div_ceil(SUB_BLOCK);
                for s in s0..s1 {
                    let (ss, se) = (s * SUB_BLOCK, (s + 1) * SUB_BLOCK);
                    let (cs, ce) = (ss.max(in_block), se.min(in_block + n));
                    let whole = cs == ss && ce == se;
                    if whole {
                        if prov == Provisioning::EagerThick && e.is_written(s as usize) {
                            zero_dev.push((base + ss, SUB_BLOCK));
                        }
                        ne.set_written(s as usize, false);
                    } else if e.is_written(s as usize) {
                        zero_dev.push((base + cs, ce - cs));
                    }
                }
                if prov == Provisioning::Thin && unmap && !ne.any_written() {
                    sp.free(&self.ds, b);
                    ne = Entry::default();
                }
                if ne != e {
                    st.map[bi] = ne;
                    st.ptr_dirty.insert((bi / ENTRIES_PER_PTR) as u32);
                }
                pos += n;
            }
        }
        zero_dev.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in zero_dev {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        for (o, l) in merged {
            self.ds.check_write(None)?;
            self.data.write_zero_data(o, l).await?;
        }
        Ok(())
    }

    fn status(&self, offset: u64, len: u64) -> Vec<Extent> {
        let st = lock(&self.sh.st);
        let multi = self.multi();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let bi = (pos / BLOCK) as usize;
            let in_block = pos % BLOCK;
            let e = st.map[bi];
            let (kind, n) = match e.block {
                None => (ExtentKind::Hole, BLOCK - in_block),
                Some(_) if multi => (ExtentKind::Data, BLOCK - in_block),
                Some(_) => {
                    let sub = (in_block / SUB_BLOCK) as usize;
                    let k = if e.is_written(sub) {
                        ExtentKind::Data
                    } else {
                        ExtentKind::Zero
                    };
                    (k, (sub as u64 + 1) * SUB_BLOCK - in_block)
                }
            };
            let n = n.min(end - pos);
            match out.last_mut() {
                Some(last) if last.kind == kind => last.length += n,
                _ => out.push(Extent {
                    offset: pos,
                    length: n,
                    kind,
                }),
            }
            pos += n;
        }
        out
    }
}

impl Drop for DsFile {
    fn drop(&mut self) {
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        if let Some(sess) = &self.sess {
            // Dropped without close: commit and unlock as close would, synchronously.
            if self.sh.mode.is_some_and(|m| m != LockMode::Shared) {
                if let Err(e) = sess.commit() {
                    tracing::error!("{}: commit on close failed: {e}", self.sh.name.display());
                }
            }
            if let Err(e) = sess.unlock(&self.uuid()) {
                tracing::error!("{}: unlock failed: {e}", self.sh.name.display());
            }
        }
    }
}

impl BlockDev for DsFile {
    fn name(&self) -> &Path {
        &self.sh.name
    }

    fn size(&self) -> u64 {
        lock(&self.sh.st).desc.size
    }

    fn logical_block_size(&self) -> u32 {
        512
    }

    fn physical_block_size(&self) -> u32 {
        4096
    }

    fn writable(&self) -> bool {
        self.sess.is_some()
            && matches!(
                self.sh.mode,
                Some(LockMode::Exclusive | LockMode::MultiWriter)
            )
    }

    fn provisioning(&self) -> Provisioning {
        lock(&self.sh.st).desc.provisioning
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check(offset, buf.len() as u64)?;
            let _g = self.sh.io.read().await;
            let segs = self.plan_read(offset, buf.len());
            let mut reads = Vec::new();
            let mut rest: &mut [u8] = buf;
            let mut at = 0usize;
            for s in segs {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(s.buf_off - at);
                let (piece, tail) = tail.split_at_mut(s.len);
                rest = tail;
                at = s.buf_off + s.len;
                match s.dev {
                    None => piece.fill(0),
                    Some(dev) => reads.push(self.data.read_at(dev, piece)),
                }
            }
            futures::future::try_join_all(reads).await?;
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.write_impl(offset, buf, flags)
                .await
                .map_err(|e| to_block(e, &self.sh.name, offset))
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.sh.mode == Some(LockMode::Exclusive) || self.multi() {
                self.commit()
                    .await
                    .map_err(|e| to_block(e, &self.sh.name, 0))?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.zero_impl(offset, length, may_unmap)
                .await
                .map_err(|e| to_block(e, &self.sh.name, offset))
        })
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.zero_impl(offset, length, true)
                .await
                .map_err(|e| to_block(e, &self.sh.name, offset))
        })
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            self.check(offset, length)?;
            Ok(self.status(offset, length))
        })
    }
}
