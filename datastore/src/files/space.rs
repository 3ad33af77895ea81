//! Space: the resource clusters a host owns, block allocation and frees, and the commit
//! that makes a host's metadata changes durable through its journal.
//!
//! A host allocates only from clusters it owns, so allocation needs no cluster-wide lock.
//! It claims a cluster (unowned, or owned by a gone host) under the volume lease. A block
//! freed in one of its own clusters becomes reusable only once the free is committed (so
//! no committed map can still point at it); a block freed in a cluster another host owns
//! goes to that cluster's inbox under the volume lease, and the owner takes it back when
//! it next claims space.
//!
//! Space rules: a host keeps at most one cluster with free blocks in use (the freest),
//! plus one it has just claimed; a commit gives every other cluster with free blocks back
//! (owner none, its used blocks still marked), and a cluster left with nothing of its
//! owner's in it is given back by the commit that frees its last block. So the free space
//! another host cannot reach is at most one cluster per live host. Blocks freed but not
//! committed are not reusable yet: a writer that runs short commits them first, and
//! claims a cluster only if that did not free a block.
//!
//! A commit snapshots every dirty record of the session's open files and clusters at one
//! cut, flushes the data device, then writes the snapshot through the journal. Record
//! order across several transactions (a large commit) is: cluster records with new
//! allocations, file records, then cluster records with frees and inboxes — a crash in
//! between can leak blocks (repaired by `datastore check --repair`) but never leaves a
//! committed map pointing at a free block.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::filerec::{ClusterRec, MAX_TXN_RECORDS};
use crate::format::{Block, Decoded};
use crate::journal::{self, Outcome};
use crate::paxos::VolumeLease;
use crate::store::Datastore;
use crate::{Error, Result};

use super::{lock, Session};

/// A cluster this host owns.
#[derive(Debug)]
pub(crate) struct OwnedCluster {
    /// In use in memory (allocations, including frees not committed yet).
    pub used: ClusterRec,
    pub generation: u64,
    pub dirty: bool,
}

/// A session's space state.
#[derive(Debug, Default)]
pub(crate) struct Space {
    pub owned: BTreeMap<u32, OwnedCluster>,
    /// Blocks of own clusters freed but not committed.
    pub pending: Vec<u64>,
    /// Blocks of other hosts' clusters freed but not yet in their inbox.
    pub foreign: Vec<u64>,
}

/// Free and total space of a datastore.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SpaceInfo {
    pub block_size: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
}

fn cluster_of(ds: &Datastore, block: u64) -> (u32, u32) {
    let bpc = ds.superblock().blocks_per_cluster as u64;
    ((block / bpc) as u32, (block % bpc) as u32)
}

fn cluster_rec(ds: &Datastore, c: u32, inbox: bool) -> u64 {
    ds.superblock().cluster_start + 2 * c as u64 + inbox as u64
}

/// A cluster record as read, with its generation.
pub(crate) type ClusterRead = Decoded<(ClusterRec, u64)>;

/// Reads every cluster's allocation record and inbox.
pub(crate) fn read_clusters(ds: &Datastore) -> Result<Vec<(ClusterRead, ClusterRead)>> {
    let sb = ds.superblock();
    let recs = ds.read_many(sb.cluster_start, 2 * sb.cluster_count as u64)?;
    Ok(recs
        .chunks(2)
        .enumerate()
        .map(|(c, pair)| {
            (
                ClusterRec::decode(&pair[0], ds.uuid(), false, c as u32),
                ClusterRec::decode(&pair[1], ds.uuid(), true, c as u32),
            )
        })
        .collect())
}

/// Free and total space as committed on disk.
pub fn space_info(ds: &Datastore) -> Result<SpaceInfo> {
    let sb = ds.superblock();
    let mut free = 0u64;
    for (c, (used, inbox)) in read_clusters(ds)?.into_iter().enumerate() {
        let n = sb.cluster_blocks(c as u32) as u64;
        if let (Decoded::Valid((u, _)), Decoded::Valid((i, _))) = (used, inbox) {
            let used_not_freed = (0..n as u32).filter(|&b| u.get(b) && !i.get(b)).count() as u64;
            free += n - used_not_freed;
        }
    }
    Ok(SpaceInfo {
        block_size: crate::format::BLOCK,
        total_blocks: sb.block_count,
        free_blocks: free,
    })
}

impl Space {
    /// Takes up to `n` free blocks from owned clusters (no I/O).
    pub fn alloc_fast(&mut self, ds: &Datastore, n: usize) -> Vec<u64> {
        let bpc = ds.superblock().blocks_per_cluster as u64;
        let mut out = Vec::with_capacity(n);
        for (c, oc) in self.owned.iter_mut() {
            let blocks = ds.superblock().cluster_blocks(*c);
            for i in 0..blocks {
                if out.len() == n {
                    return out;
                }
                if !oc.used.get(i) {
                    oc.used.set(i, true);
                    oc.dirty = true;
                    out.push(*c as u64 * bpc + i as u64);
                }
            }
        }
        out
    }

    /// Whether an owned cluster has a free block.
    pub fn has_free(&self, ds: &Datastore) -> bool {
        self.owned
            .iter()
            .any(|(c, oc)| (0..ds.superblock().cluster_blocks(*c)).any(|i| !oc.used.get(i)))
    }

    /// Frees `block` (reusable after the next commit).
    pub fn free(&mut self, ds: &Datastore, block: u64) {
        let (c, _) = cluster_of(ds, block);
        if self.owned.contains_key(&c) {
            self.pending.push(block);
        } else {
            self.foreign.push(block);
        }
    }
}

/// What a failed commit leaves memory to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Nothing that must be kept committed: mark everything dirty again.
    RollBack,
    /// Everything committed (some of it not applied yet): keep the new state.
    Done,
    /// Part of it, or an unknown part, committed: stop the session.
    Stop,
}

/// A commit's snapshot.
struct Snapshot {
    files: Vec<(u64, Box<Block>)>,
    /// Files and records to mark dirty again if the commit fails.
    restore: Vec<(Arc<super::dsfile::FileShared>, bool, Vec<u32>)>,
    /// Multi-writer pointer records to merge with what is on disk.
    merge: Vec<(u64, crate::filerec::PointerRec)>,
    clusters_keep: Vec<(u64, Box<Block>)>,
    clusters_final: Vec<(u64, Box<Block>)>,
    final_bits: Vec<(u32, ClusterRec, u64)>,
    frees: Vec<u64>,
    foreign: Vec<u64>,
    /// Clusters given back (owner none in the final image), and their state to restore
    /// if the commit fails.
    released: Vec<u32>,
    released_state: Vec<(u32, OwnedCluster)>,
}

impl Session {
    /// Finds room for a writer that ran short: commits the frees not committed yet (they
    /// become reusable), and claims space only if that freed nothing of ours.
    pub(crate) fn make_room(&self) -> Result<()> {
        if !lock(&self.space).pending.is_empty() {
            self.commit()?;
            if lock(&self.space).has_free(&self.ds) {
                return Ok(());
            }
        }
        self.claim()
    }

    /// Under the volume lease: takes back freed blocks from own clusters' inboxes, or
    /// claims a cluster with free blocks. `NoSpace` if neither finds any.
    pub(crate) fn claim(&self) -> Result<()> {
        let mut seq = lock(&self.commit_lock);
        self.running()?;
        // Concurrent writers all run short at once: the first claim may have served the
        // others already.
        if lock(&self.space).has_free(&self.ds) {
            return Ok(());
        }
        let mut obs = lock(&self.obs);
        let lease = VolumeLease::acquire(&self.ds, self.me, &mut obs, self.lease_wait())?;
        let out = (|| {
            let all = read_clusters(&self.ds)?;
            let mut writes = Vec::new();
            let mut took = Vec::new();
            // Own clusters' inboxes first.
            let owned: Vec<u32> = lock(&self.space).owned.keys().copied().collect();
            for c in owned {
                if let (Decoded::Valid((disk, dg)), Decoded::Valid((inbox, ig))) = &all[c as usize]
                {
                    if inbox.count() > 0 {
                        let mut d = disk.clone();
                        for (w, iw) in d.bits.iter_mut().zip(&inbox.bits) {
                            *w &= !iw;
                        }
                        writes.push((
                            cluster_rec(&self.ds, c, false),
                            d.encode(self.ds.uuid(), false, dg + 1),
                        ));
                        writes.push((
                            cluster_rec(&self.ds, c, true),
                            ClusterRec::empty(c).encode(self.ds.uuid(), true, ig + 1),
                        ));
                        took.push((c, inbox.clone(), dg + 1, None));
                    }
                }
            }
            if writes.is_empty() {
                // A cluster nobody live owns, with the most free blocks.
                let mut best: Option<(u32, u32)> = None;
                for (c, pair) in all.iter().enumerate() {
                    let c = c as u32;
                    let (Decoded::Valid((u, _)), Decoded::Valid((i, _))) = pair else {
                        continue;
                    };
                    if u.owner == self.me || (!u.owner.is_none() && obs.owner_valid(u.owner)) {
                        continue;
                    }
                    let n = self.ds.superblock().cluster_blocks(c);
                    let free = (0..n).filter(|&b| !u.get(b) || i.get(b)).count() as u32;
                    if free > 0 && best.is_none_or(|(_, f)| free > f) {
                        best = Some((c, free));
                    }
                }
                let Some((c, _)) = best else {
                    return Err(Error::NoSpace {
                        object: self.ds.path().to_path_buf(),
                        detail: "every resource cluster is full or owned by another live host \
                                 (each live host keeps at most one cluster with free blocks)"
                            .into(),
                    });
                };
                let (Decoded::Valid((u, ug)), Decoded::Valid((i, ig))) = &all[c as usize] else {
                    unreachable!("checked above");
                };
                let mut d = u.clone();
                d.owner = self.me;
                for (w, iw) in d.bits.iter_mut().zip(&i.bits) {
                    *w &= !iw;
                }
                writes.push((
                    cluster_rec(&self.ds, c, false),
                    d.encode(self.ds.uuid(), false, ug + 1),
                ));
                writes.push((
                    cluster_rec(&self.ds, c, true),
                    ClusterRec::empty(c).encode(self.ds.uuid(), true, ig + 1),
                ));
                took.push((c, i.clone(), ug + 1, Some(d)));
            }
            *seq += 1;
            // A claim that committed but is not applied yet is ours all the same (the
            // volume lease stays held until it is applied); one in doubt stops the session.
            let failed = match journal::commit_txn(&self.ds, self.me, *seq, &writes) {
                Ok(()) => None,
                Err(f) if f.outcome == Outcome::NotCommitted => return Err(f.error),
                Err(f) if f.outcome == Outcome::InDoubt => {
                    return Err(self.stop("claiming space", f.error));
                }
                Err(f) => Some(f.error),
            };
            let _cut = self.cut.read().expect("cut");
            let mut sp = lock(&self.space);
            for (c, inbox, generation, claimed) in took {
                match claimed {
                    Some(d) => {
                        sp.owned.insert(
                            c,
                            OwnedCluster {
                                used: d,
                                generation,
                                dirty: false,
                            },
                        );
                    }
                    None => {
                        if let Some(oc) = sp.owned.get_mut(&c) {
                            for (w, iw) in oc.used.bits.iter_mut().zip(&inbox.bits) {
                                *w &= !iw;
                            }
                            oc.generation = generation;
                        }
                    }
                }
            }
            failed.map_or(Ok(()), Err)
        })();
        let released = lease.release();
        out?;
        released
    }

    /// Makes every completed write and metadata change of this session durable.
    pub fn commit(&self) -> Result<()> {
        let mut seq = lock(&self.commit_lock);
        self.running()?;
        let needs_lease = {
            let sp = lock(&self.space);
            !sp.foreign.is_empty()
        } || lock(&self.files)
            .iter()
            .filter_map(|w| w.upgrade())
            .any(|f| f.needs_merge());
        let lease = if needs_lease {
            let mut obs = lock(&self.obs);
            Some(VolumeLease::acquire(
                &self.ds,
                self.me,
                &mut obs,
                self.lease_wait(),
            )?)
        } else {
            None
        };
        let mut snap = {
            let _cut = self.cut.write().expect("cut");
            self.snapshot(needs_lease)
        };
        let out = self
            .sync_data()
            .map_err(|e| (After::RollBack, e))
            .and_then(|_| self.write_snapshot(&mut seq, &snap));
        let released = lease.map(|l| l.release()).unwrap_or(Ok(()));
        let (after, out) = match out {
            Ok(()) => (After::Done, Ok(())),
            Err((after, e)) => (after, Err(e)),
        };
        match after {
            After::Stop => {
                let e = out.expect_err("a stop comes with its error");
                return Err(self.stop("committing metadata", e));
            }
            After::Done => {
                let _cut = self.cut.read().expect("cut");
                let mut sp = lock(&self.space);
                for (c, bits, generation) in &snap.final_bits {
                    if let Some(oc) = sp.owned.get_mut(c) {
                        for &b in &snap.frees {
                            let (bc, i) = cluster_of(&self.ds, b);
                            if bc == *c {
                                oc.used.set(i, false);
                            }
                        }
                        let _ = bits;
                        oc.generation = *generation;
                    }
                }
            }
            After::RollBack => {
                for (f, desc, ptrs) in &snap.restore {
                    f.mark_dirty(*desc, ptrs);
                }
                let _cut = self.cut.read().expect("cut");
                let mut sp = lock(&self.space);
                for (c, oc) in snap.released_state.drain(..) {
                    sp.owned.insert(c, oc);
                }
                sp.pending.extend(&snap.frees);
                sp.foreign.extend(&snap.foreign);
                for (c, _, _) in &snap.final_bits {
                    if let Some(oc) = sp.owned.get_mut(c) {
                        oc.dirty = true;
                    }
                }
            }
        }
        out?;
        released
    }

    fn sync_data(&self) -> Result<()> {
        self.sync
            .sync_data()
            .map_err(|e| Error::io(self.ds.path(), "flush", e))
    }

    /// Under the cut: every dirty record, encoded. Records that may only be written under
    /// the volume lease (foreign inboxes, multi-writer maps) are taken only when
    /// `have_lease`; otherwise they wait for a commit that takes it.
    fn snapshot(&self, have_lease: bool) -> Snapshot {
        let files: Vec<_> = lock(&self.files)
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        let mut snap = Snapshot {
            files: Vec::new(),
            restore: Vec::new(),
            merge: Vec::new(),
            clusters_keep: Vec::new(),
            clusters_final: Vec::new(),
            final_bits: Vec::new(),
            frees: Vec::new(),
            foreign: Vec::new(),
            released: Vec::new(),
            released_state: Vec::new(),
        };
        for f in files {
            if f.mode == Some(crate::format::LockMode::MultiWriter) && !have_lease {
                continue;
            }
            let (writes, merge, desc, ptrs) = f.take_dirty(&self.ds);
            if !writes.is_empty() || !merge.is_empty() {
                snap.files.extend(writes);
                snap.merge.extend(merge);
                snap.restore.push((f, desc, ptrs));
            }
        }
        let mut sp = lock(&self.space);
        snap.frees = std::mem::take(&mut sp.pending);
        if have_lease {
            snap.foreign = std::mem::take(&mut sp.foreign);
        }
        let freed: BTreeSet<u32> = snap
            .frees
            .iter()
            .map(|&b| cluster_of(&self.ds, b).0)
            .collect();
        // What each owned cluster holds once the frees are committed, and the one cluster
        // with free blocks this host keeps (the freest): every other cluster with free
        // blocks is given back, so no live host sits on space another host needs.
        let fins: BTreeMap<u32, ClusterRec> = sp
            .owned
            .iter()
            .map(|(c, oc)| {
                let mut fin = oc.used.clone();
                for &b in &snap.frees {
                    let (bc, i) = cluster_of(&self.ds, b);
                    if bc == *c {
                        fin.set(i, false);
                    }
                }
                (*c, fin)
            })
            .collect();
        let free_in =
            |c: u32, fin: &ClusterRec| self.ds.superblock().cluster_blocks(c) - fin.count();
        let keep = fins
            .iter()
            .filter(|(c, fin)| free_in(**c, fin) > 0 && fin.count() > 0)
            .max_by_key(|(c, fin)| (free_in(**c, fin), std::cmp::Reverse(**c)))
            .map(|(c, _)| *c);
        for (c, oc) in sp.owned.iter_mut() {
            let mut fin = fins[c].clone();
            let touched = oc.dirty || freed.contains(c);
            // (An empty cluster nobody touched was just claimed: it is about to be used.)
            let give_back = if fin.count() == 0 {
                touched
            } else {
                free_in(*c, &fin) > 0 && Some(*c) != keep
            };
            if !touched && !give_back {
                continue;
            }
            oc.dirty = false;
            let g = oc.generation + 1;
            snap.clusters_keep.push((
                cluster_rec(&self.ds, *c, false),
                oc.used.encode(self.ds.uuid(), false, g),
            ));
            if give_back {
                // Given back, so any host can claim it (the blocks still in use stay
                // marked; their frees go through its inbox from now on). It leaves `owned`
                // now, under the cut: nothing allocates from it any more.
                fin.owner = crate::format::Owner::NONE;
                snap.released.push(*c);
            }
            snap.clusters_final.push((
                cluster_rec(&self.ds, *c, false),
                fin.encode(self.ds.uuid(), false, g + 1),
            ));
            snap.final_bits.push((*c, fin, g + 1));
        }
        for c in &snap.released {
            if let Some(oc) = sp.owned.remove(c) {
                snap.released_state.push((*c, oc));
            }
        }
        snap
    }

    /// Writes the snapshot through the journal. On failure, says what memory must do:
    /// the cluster records with allocations and the file records may be written again
    /// whatever became of them (roll back and retry later); the last transaction, with
    /// frees, clusters given back and other hosts' inboxes, must be taken as done once it
    /// committed, and a partial or unknown outcome of it stops the session.
    fn write_snapshot(&self, seq: &mut u64, snap: &Snapshot) -> Result<(), (After, Error)> {
        let mut txn = |writes: &[(u64, Box<Block>)], last: bool| -> Result<(), (After, Error)> {
            for (i, chunk) in writes.chunks(MAX_TXN_RECORDS).enumerate() {
                *seq += 1;
                if let Err(f) = journal::commit_txn(&self.ds, self.me, *seq, chunk) {
                    let single = writes.len() <= MAX_TXN_RECORDS;
                    let after = match f.outcome {
                        _ if !last => After::RollBack,
                        Outcome::NotCommitted if i == 0 => After::RollBack,
                        Outcome::Committed if single => After::Done,
                        _ => After::Stop,
                    };
                    return Err((after, f.error));
                }
            }
            Ok(())
        };
        // Foreign frees into their clusters' inboxes, and multi-writer maps merged with
        // what the other writers committed (the volume lease is held).
        let mut shared = Vec::new();
        let mut by_cluster: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &b in &snap.foreign {
            let (c, i) = cluster_of(&self.ds, b);
            by_cluster.entry(c).or_default().push(i);
        }
        for (c, idx) in by_cluster {
            let rec = cluster_rec(&self.ds, c, true);
            let disk = self.ds.read(rec).map_err(|e| (After::RollBack, e))?;
            let (mut inbox, g) = match ClusterRec::decode(&disk, self.ds.uuid(), true, c) {
                Decoded::Valid(x) => x,
                _ => (ClusterRec::empty(c), 0),
            };
            for i in idx {
                inbox.set(i, true);
            }
            shared.push((rec, inbox.encode(self.ds.uuid(), true, g + 1)));
        }
        for (rec, mine) in &snap.merge {
            let disk = self.ds.read(*rec).map_err(|e| (After::RollBack, e))?;
            let merged = match crate::filerec::PointerRec::decode(&disk, self.ds.uuid()) {
                Decoded::Valid((disk, g))
                    if disk.file == mine.file
                        && disk.seq == mine.seq
                        && disk.index == mine.index =>
                {
                    let mut m = disk.clone();
                    for (e, mine_e) in m.entries.iter_mut().zip(&mine.entries) {
                        for w in 0..4 {
                            e.written[w] |= mine_e.written[w];
                        }
                    }
                    m.encode(self.ds.uuid(), g + 1)
                }
                _ => mine.encode(self.ds.uuid(), 1),
            };
            shared.push((*rec, merged));
        }
        let total = snap.files.len() + snap.clusters_final.len() + shared.len();
        if total <= MAX_TXN_RECORDS {
            let mut all = Vec::with_capacity(total);
            all.extend(snap.clusters_final.iter().cloned());
            all.extend(snap.files.iter().cloned());
            all.extend(shared);
            return txn(&all, true);
        }
        txn(&snap.clusters_keep, false)?;
        txn(&snap.files, false)?;
        let mut last = snap.clusters_final.clone();
        last.extend(shared);
        txn(&last, true)
    }
}
