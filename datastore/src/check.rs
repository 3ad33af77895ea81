//! `ferry datastore check`: verifies every invariant of a datastore's committed state and
//! repairs what can be repaired without guessing (leaked blocks, stray inbox bits,
//! unfinished journal transactions of gone hosts).
//!
//! Invariants: the root is a folder; every descriptor is readable; every non-root entry
//! lives in a folder, names are unique in a folder and parents form no cycle; every
//! block a file uses (data and map blocks) is inside the data area, used by exactly one
//! file, and marked used (and not freed) in its cluster; every block marked used is used
//! by a file (else it is a leak); inbox bits free only used blocks; cluster and lock
//! records are readable; no gone host has an unapplied journal transaction.
//!
//! `check` reads without any lock, so on a live datastore a host's commit in progress can
//! show as leaked blocks for a moment; `--repair` runs only while no other host is live.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::filerec::{ClusterRec, JournalHeader, Kind, TxnState};
use crate::files::{self, Session};
use crate::format::{Decoded, LockRecord};
use crate::paxos::VolumeLease;
use crate::store::{Datastore, Liveness, Observer};
use crate::{Error, Result};

/// What `check` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub files: u64,
    pub folders: u64,
    pub used_blocks: u64,
    pub free_blocks: u64,
    /// Blocks marked used that no file uses (repairable).
    pub leaked_blocks: Vec<u64>,
    /// Where the leaks are: "cluster C (owner host H generation G): N block(s)".
    pub leaks: Vec<String>,
    /// Inbox bits for blocks not in use (repairable).
    pub stray_inbox_bits: Vec<u64>,
    /// Hosts with an unapplied journal transaction: (host id, whether its writer is gone).
    pub unapplied_journals: Vec<(u32, bool)>,
    /// Unreadable (torn) lock records: the objects whose probe chains cross them count as
    /// held. Cleared by `--repair` once no other host is live.
    pub torn_lock_records: Vec<u64>,
    /// Everything else: damage that needs a person.
    pub problems: Vec<String>,
    /// What `--repair` did.
    pub repaired: Vec<String>,
}

impl Report {
    /// Whether nothing at all is wrong.
    pub fn clean(&self) -> bool {
        self.leaked_blocks.is_empty()
            && self.stray_inbox_bits.is_empty()
            && self.unapplied_journals.is_empty()
            && self.torn_lock_records.is_empty()
            && self.problems.is_empty()
    }
}

/// Checks the datastore (read-only).
pub fn check(ds: &Datastore) -> Result<Report> {
    let sb = ds.superblock();
    let mut r = Report::default();
    let table = files::Table::read(ds)?;
    // Descriptors and the folder tree.
    match table.entries.first() {
        Some(Decoded::Valid((d, _))) if d.kind == Kind::Folder => {}
        _ => r
            .problems
            .push("descriptor 0 is not the root folder".into()),
    }
    let mut names: HashSet<(u32, String)> = HashSet::new();
    let mut owners: HashMap<u64, u32> = HashMap::new();
    // Files whose block map cannot be read: the blocks they use are unknown.
    let mut damaged_maps = 0usize;
    for (id, e) in table.entries.iter().enumerate().skip(1) {
        let id = id as u32;
        let d = match e {
            Decoded::Blank => continue,
            Decoded::Unknown(why) => {
                r.problems
                    .push(format!("descriptor {id} is unreadable ({why})"));
                continue;
            }
            Decoded::Valid((d, _)) if d.kind == Kind::Free => continue,
            Decoded::Valid((d, _)) => d,
        };
        let path = table.path_of(id);
        match d.kind {
            Kind::Folder => r.folders += 1,
            _ => r.files += 1,
        }
        if !table
            .get(d.parent)
            .is_some_and(|(p, _)| p.kind == Kind::Folder)
        {
            r.problems
                .push(format!("{path}: its parent {} is not a folder", d.parent));
        }
        if !names.insert((d.parent, d.name.clone())) {
            r.problems
                .push(format!("{path}: the name appears twice in its folder"));
        }
        let mut cur = d.parent;
        let mut steps = 0;
        while cur != 0 && steps <= table.entries.len() {
            cur = table.get(cur).map_or(0, |(p, _)| p.parent);
            steps += 1;
        }
        if steps > table.entries.len() {
            r.problems.push(format!("{path}: its folders form a cycle"));
        }
        if d.kind != Kind::File {
            continue;
        }
        let name = files::display(ds, &path);
        let map = match files::load_map(ds, &name, d) {
            Ok((m, _)) => m,
            Err(e) => {
                r.problems.push(e.to_string());
                damaged_maps += 1;
                for m in &d.maps {
                    owners.insert(m.block, id);
                }
                continue;
            }
        };
        let used = map
            .iter()
            .filter_map(|e| e.block)
            .chain(d.maps.iter().map(|m| m.block));
        for b in used {
            if b >= sb.block_count {
                r.problems
                    .push(format!("{path}: block {b} is outside the data area"));
            } else if let Some(other) = owners.insert(b, id) {
                r.problems.push(format!(
                    "block {b} is used by both {} and {path}",
                    table.path_of(other)
                ));
            }
        }
    }
    // Clusters against the files.
    let bpc = sb.blocks_per_cluster as u64;
    for (c, (used, inbox)) in files::space_clusters(ds)?.into_iter().enumerate() {
        let c = c as u32;
        let (u, i) = match (used, inbox) {
            (Decoded::Valid((u, _)), Decoded::Valid((i, _))) => (u, i),
            _ => {
                r.problems
                    .push(format!("cluster {c}: its records are unreadable"));
                continue;
            }
        };
        let leaks_before = r.leaked_blocks.len();
        if u.owner.host_id > sb.max_hosts {
            r.problems.push(format!(
                "cluster {c}: owner host {} does not exist",
                u.owner.host_id
            ));
        }
        for bit in 0..sb.cluster_blocks(c) {
            let b = c as u64 * bpc + bit as u64;
            let in_use = u.get(bit) && !i.get(bit);
            if i.get(bit) && !u.get(bit) {
                r.stray_inbox_bits.push(b);
            }
            match (owners.contains_key(&b), in_use) {
                (true, true) => r.used_blocks += 1,
                (true, false) => r.problems.push(format!(
                    "block {b} of {} is marked free in cluster {c}",
                    table.path_of(owners[&b])
                )),
                (false, true) => r.leaked_blocks.push(b),
                (false, false) => r.free_blocks += 1,
            }
        }
        if r.leaked_blocks.len() > leaks_before {
            r.leaks.push(format!(
                "cluster {c} (owner host {} generation {}): {} block(s)",
                u.owner.host_id,
                u.owner.generation,
                r.leaked_blocks.len() - leaks_before
            ));
        }
    }
    if damaged_maps > 0 && !r.leaked_blocks.is_empty() {
        // Blocks in use by no readable file may be those of the damaged maps: not leaks
        // (repair would free blocks a file still uses).
        r.problems.push(format!(
            "{} block(s) in use by no readable file: not counted as leaks while {damaged_maps} \
             file map(s) cannot be read",
            r.leaked_blocks.len()
        ));
        r.used_blocks += r.leaked_blocks.len() as u64;
        r.leaked_blocks.clear();
        r.leaks.clear();
    }
    // Lock records.
    let recs = ds.read_many(sb.lock_start, sb.lock_count as u64)?;
    for (idx, b) in (sb.lock_start..).zip(recs.iter()) {
        if let Decoded::Unknown(_) = LockRecord::decode(b, ds.uuid()) {
            r.torn_lock_records.push(idx);
        }
    }
    // Journals.
    let mut obs = Observer::new(ds);
    let views = obs.observe(ds)?.to_vec();
    for v in views {
        if let Decoded::Valid(h) =
            JournalHeader::decode(&*ds.read(sb.journal_rec(v.host_id))?, ds.uuid())
        {
            let images = ds.read_many(sb.journal_rec(v.host_id) + 1, h.targets.len() as u64)?;
            // A torn journal write never committed: nothing to finish.
            if h.state == TxnState::Committed && crate::journal::images_crc(&images) == h.images_crc
            {
                let gone = match v.liveness {
                    Liveness::Free | Liveness::Dead => true,
                    _ => v
                        .slot
                        .as_ref()
                        .is_some_and(|s| s.host_generation > h.writer.generation),
                };
                r.unapplied_journals.push((v.host_id, gone));
            }
        }
    }
    Ok(r)
}

/// Checks, then repairs what is safe to repair, as host `session` (under the volume
/// lease): unapplied transactions of gone hosts are finished (taking the lease does
/// that), leaked blocks are freed and stray inbox bits cleared, all through this host's
/// journal. Returns the report of a second check, listing what was done.
///
/// Repair needs a consistent cut of the datastore, which a live host committing without
/// the lease would break (its blocks allocated in between would look leaked): it runs
/// only while no other host is live. Unless every other slot is free, it first watches
/// the slots for `host_dead`, so that a host that crashed is seen dead (and its journal
/// finished), never taken as live — or as gone while it still writes.
pub fn repair(session: &Session) -> Result<Report> {
    let ds = session.datastore();
    let me = session.owner();
    let mut obs = Observer::new(ds);
    let sb = ds.superblock();
    let wait = sb.host_dead() + 4 * sb.io_timeout();
    obs.observe(ds)?;
    let others = |obs: &Observer, all: bool| -> Vec<String> {
        obs.views()
            .iter()
            .filter(|v| v.host_id != me.host_id)
            .filter(|v| match v.liveness {
                Liveness::Free => false,
                Liveness::Dead => all,
                Liveness::Live | Liveness::Unknown => true,
            })
            .map(|v| match &v.slot {
                Some(s) => format!("{} (host {})", s.name, v.host_id),
                None => format!("host {}", v.host_id),
            })
            .collect()
    };
    if !others(&obs, true).is_empty() {
        let start = ds.clock().now();
        let until = start + sb.host_dead() + sb.io_timeout();
        while ds.clock().now() < until {
            ds.clock().sleep(sb.io_timeout() / 2);
            obs.observe(ds)?;
            let watched = ds.clock().now() - start;
            let renewing = |v: &crate::store::SlotView| {
                v.host_id != me.host_id
                    && v.liveness == Liveness::Live
                    && watched >= 3 * sb.io_timeout()
                    && std::time::Duration::from_millis(v.unchanged_ms) < watched / 2
            };
            if obs.views().iter().any(renewing) {
                break; // a host plainly renews its slot: no need to wait out host_dead
            }
        }
    }
    let live = others(&obs, false);
    if !live.is_empty() {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "repair needs every other host stopped (live now: {}): a live host commits \
                 without the volume lease, and its new blocks would look leaked; stop those \
                 hosts' agents, or wait until they are seen dead, then repair again \
                 (`check` without --repair is safe at any time)",
                live.join(", ")
            ),
        });
    }
    let lease = VolumeLease::acquire(ds, me, &mut obs, wait)?;
    let done = (|| -> Result<Vec<String>> {
        let mut did = clear_torn_lock_records(ds, me, &mut obs)?;
        let before = check(ds)?;
        if !before.problems.is_empty() {
            return Err(Error::Invalid {
                object: ds.path().to_path_buf(),
                detail: format!(
                    "{} problem(s) need a person before anything is repaired; first: {}",
                    before.problems.len(),
                    before.problems[0]
                ),
            });
        }
        if let Some((h, _)) = before.unapplied_journals.first() {
            return Err(Error::Invalid {
                object: ds.path().to_path_buf(),
                detail: format!(
                    "host {h} has a journal transaction not applied yet: its blocks may look \
                     leaked; repair again once it is finished"
                ),
            });
        }
        let bpc = ds.superblock().blocks_per_cluster as u64;
        let mut by_cluster: BTreeMap<u32, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
        for &b in &before.leaked_blocks {
            by_cluster
                .entry((b / bpc) as u32)
                .or_default()
                .0
                .push((b % bpc) as u32);
        }
        for &b in &before.stray_inbox_bits {
            by_cluster
                .entry((b / bpc) as u32)
                .or_default()
                .1
                .push((b % bpc) as u32);
        }
        let all = files::space_clusters(ds)?;
        let mut writes = Vec::new();
        for (c, (leaks, strays)) in by_cluster {
            let (Decoded::Valid((mut u, ug)), Decoded::Valid((mut i, ig))) =
                all[c as usize].clone()
            else {
                continue;
            };
            for s in &strays {
                i.set(*s, false);
            }
            if u.owner == me {
                // Our own session allocates from it without the lease: hand the leaked
                // blocks to it through the inbox instead of touching its bitmap.
                for l in &leaks {
                    i.set(*l, true);
                }
            } else {
                for l in &leaks {
                    u.set(*l, false);
                }
                writes.push((
                    ds.superblock().cluster_start + 2 * c as u64,
                    u.encode(ds.uuid(), false, ug + 1),
                ));
            }
            writes.push((
                ds.superblock().cluster_start + 2 * c as u64 + 1,
                ClusterRec {
                    owner: crate::format::Owner::NONE,
                    ..i
                }
                .encode(ds.uuid(), true, ig + 1),
            ));
            if !leaks.is_empty() {
                did.push(format!(
                    "cluster {c}: freed {} leaked block(s)",
                    leaks.len()
                ));
            }
            if !strays.is_empty() {
                did.push(format!(
                    "cluster {c}: cleared {} stray inbox bit(s)",
                    strays.len()
                ));
            }
        }
        for chunk in writes.chunks(crate::filerec::MAX_TXN_RECORDS) {
            let seq = crate::journal::last_seq(ds, me.host_id)? + 1;
            crate::journal::commit(ds, me, seq, chunk)?;
        }
        Ok(did)
    })();
    let released = lease.release();
    let did = done?;
    released?;
    let mut after = check(ds)?;
    after.repaired = did;
    Ok(after)
}

/// Clears torn lock records (under the volume lease, after the journals of gone hosts were
/// replayed, which finishes every record torn by a crash of a journaling writer) when no
/// other host is live: only then can no live host be among their holders. The caller's
/// own session holds no lock.
fn clear_torn_lock_records(
    ds: &Datastore,
    me: crate::format::Owner,
    obs: &mut Observer,
) -> Result<Vec<String>> {
    let torn = check(ds)?.torn_lock_records;
    if torn.is_empty() {
        return Ok(Vec::new());
    }
    obs.observe(ds)?;
    let live: Vec<String> = obs
        .views()
        .iter()
        .filter(|v| v.host_id != me.host_id)
        .filter(|v| matches!(v.liveness, Liveness::Live | Liveness::Unknown))
        .map(|v| match &v.slot {
            Some(s) => format!("{} (host {})", s.name, v.host_id),
            None => format!("host {}", v.host_id),
        })
        .collect();
    if !live.is_empty() {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "lock record(s) {torn:?} are unreadable and may name a live host's lock; \
                 they can be cleared only while no other host is live (live now: {}): \
                 stop those hosts' agents, or wait until they are seen dead, then repair again",
                live.join(", ")
            ),
        });
    }
    // A vacant record, not a blank one: a blank record would end the probe chains of
    // the objects stored past it.
    let vacant = LockRecord {
        object: "\0cleared".into(),
        mode: crate::format::LockMode::Exclusive,
        version: 0,
        holders: Vec::new(),
    }
    .encode(ds.uuid());
    let writes: Vec<(u64, Box<crate::format::Block>)> =
        torn.iter().map(|&i| (i, vacant.clone())).collect();
    for chunk in writes.chunks(crate::filerec::MAX_TXN_RECORDS) {
        let seq = crate::journal::last_seq(ds, me.host_id)? + 1;
        crate::journal::commit(ds, me, seq, chunk)?;
    }
    Ok(vec![format!(
        "cleared {} unreadable lock record(s) {torn:?} (no other host is live)",
        torn.len()
    )])
}
