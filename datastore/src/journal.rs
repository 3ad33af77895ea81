//! Per-host redo journal: metadata changes that span several records are made atomic.
//!
//! A host's journal is `JOURNAL_RECORDS` records at `journal_rec(host_id)`: a header
//! (`FYJH`) and up to 255 record images. A transaction is:
//! 1. one write of header (state *committed*, targets, crc32c of the images) + images —
//!    the commit point: a torn journal write fails the crc and counts as never written;
//! 2. every image written in place;
//! 3. the header rewritten as *applied*.
//!
//! [`replay`] finishes a committed transaction that was not applied (a crash between 1
//! and 3). It runs under the volume lease, by the host itself when it (re)joins, and first
//! by any host about to break the locks or claim the clusters of a dead host, so no
//! record of the transaction is changed by anyone else before it is finished.
//!
//! Crash tests kill the process at each step through the failpoints `journal-written`,
//! `apply-partial` and `applied` ([`crate::failpoint`]).

use crate::filerec::{JournalHeader, TxnState, MAX_TXN_RECORDS};
use crate::format::{Block, Decoded, Owner};
use crate::store::Datastore;
use crate::store::{Liveness, Observer};
use crate::{Error, Result};

pub(crate) fn images_crc(images: &[Box<Block>]) -> u32 {
    images
        .iter()
        .fold(0u32, |crc, b| crc32c::crc32c_append(crc, &b.0))
}

/// The sequence number of `host_id`'s last journal transaction (0 if none).
pub fn last_seq(ds: &Datastore, host_id: u32) -> Result<u64> {
    // (An unreadable header counts as 0: sequence numbers only label transactions.)
    Ok(
        match JournalHeader::decode(&*ds.read(ds.superblock().journal_rec(host_id))?, ds.uuid()) {
            Decoded::Valid(h) => h.seq,
            _ => 0,
        },
    )
}

/// One writer of a host's journal at a time within this process: lock-record changes
/// (under the volume lease) and file commits (under their file's lock) share it.
#[derive(Debug)]
struct Turn {
    key: (uuid::Uuid, u32),
}

static TURNS: std::sync::Mutex<Vec<(uuid::Uuid, u32)>> = std::sync::Mutex::new(Vec::new());

impl Turn {
    /// Waits for the journal (polling on the datastore's clock, so simulated time works).
    fn take(ds: &Datastore, host_id: u32) -> Turn {
        let key = (*ds.uuid(), host_id);
        loop {
            {
                let mut t = TURNS.lock().unwrap_or_else(|p| p.into_inner());
                if !t.contains(&key) {
                    t.push(key);
                    return Turn { key };
                }
            }
            ds.clock().sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        TURNS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| *k != self.key);
    }
}

/// Writes `writes` (record index, image) atomically through `host_id`'s journal, with
/// sequence number `seq` (greater than the last one).
///
/// A transaction of ours that was committed but not applied (an earlier commit failed
/// while applying) is finished first: the journal holds one transaction, and one that
/// committed must never be dropped half-applied.
pub fn commit(ds: &Datastore, me: Owner, seq: u64, writes: &[(u64, Box<Block>)]) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let _turn = Turn::take(ds, me.host_id);
    replay_if(ds, me.host_id, |w| w == me)?;
    if writes.len() > MAX_TXN_RECORDS {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "metadata transaction of {} records exceeds the journal ({MAX_TXN_RECORDS})",
                writes.len()
            ),
        });
    }
    let jrec = ds.superblock().journal_rec(me.host_id);
    let images: Vec<Box<Block>> = writes.iter().map(|(_, b)| b.clone()).collect();
    let mut header = JournalHeader {
        seq,
        writer: me,
        state: TxnState::Committed,
        images_crc: images_crc(&images),
        targets: writes.iter().map(|(t, _)| *t).collect(),
    };
    let mut all = Vec::with_capacity(images.len() + 1);
    all.push(header.encode(ds.uuid()));
    all.extend(images);
    ds.write_many(jrec, &all)?;
    crate::failpoint::crash_at("journal-written");
    apply(ds, writes)?;
    header.state = TxnState::Applied;
    ds.write(jrec, &header.encode(ds.uuid()))
}

fn apply(ds: &Datastore, writes: &[(u64, Box<Block>)]) -> Result<()> {
    for (i, (target, image)) in writes.iter().enumerate() {
        if i == writes.len() / 2 {
            crate::failpoint::crash_at("apply-partial");
        }
        ds.write(*target, image)?;
    }
    crate::failpoint::crash_at("applied");
    Ok(())
}

/// Finishes the unapplied transactions of every host incarnation that is gone: its slot
/// is dead or free, or a later incarnation holds it (this host's own earlier one
/// included). A live incarnation's transaction is its own business: it may be applying
/// it right now. The caller holds the volume lease and has just observed the slots.
pub fn recover(ds: &Datastore, obs: &mut Observer) -> Result<()> {
    let views = obs.views().to_vec();
    for v in views {
        let key = (v.slot.as_ref().map_or(0, |s| s.host_generation), v.liveness);
        if v.liveness == Liveness::Unknown || obs.journal_checked(v.host_id) == Some(key) {
            continue;
        }
        if v.slot.is_none() && v.liveness == Liveness::Free {
            // Never used: nothing to replay.
            obs.set_journal_checked(v.host_id, key);
            continue;
        }
        let gone = |writer: Owner| match v.liveness {
            Liveness::Dead | Liveness::Free => true,
            _ => key.0 > writer.generation,
        };
        replay_if(ds, v.host_id, gone)?;
        obs.set_journal_checked(v.host_id, key);
    }
    Ok(())
}

/// Finishes `host_id`'s last transaction if it was committed but not applied and
/// `gone(writer)` says its writer no longer runs. Returns whether anything was replayed.
/// The caller holds the volume lease.
pub fn replay_if(ds: &Datastore, host_id: u32, gone: impl Fn(Owner) -> bool) -> Result<bool> {
    let jrec = ds.superblock().journal_rec(host_id);
    let mut header = match JournalHeader::decode(&*ds.read(jrec)?, ds.uuid()) {
        Decoded::Valid(h) if h.state == TxnState::Committed && gone(h.writer) => h,
        _ => return Ok(false),
    };
    let images = ds.read_many(jrec + 1, header.targets.len() as u64)?;
    if images_crc(&images) != header.images_crc {
        // A torn journal write: the transaction never committed and nothing of it was
        // applied. Retire it so nobody looks at it again.
        tracing::info!(
            "{}: journal transaction {} of host {host_id} was torn (never committed); retiring it",
            ds.path().display(),
            header.seq
        );
        header.state = TxnState::Applied;
        ds.write(jrec, &header.encode(ds.uuid()))?;
        return Ok(false);
    }
    let end = ds.superblock().size / crate::format::RECORD as u64;
    if let Some(bad) = header.targets.iter().find(|t| **t >= end || **t < 2) {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "journal of host {host_id} targets record {bad}, outside the datastore"
            ),
        });
    }
    tracing::info!(
        "{}: replaying journal transaction {} of host {host_id} ({} records)",
        ds.path().display(),
        header.seq,
        header.targets.len()
    );
    let writes: Vec<(u64, Box<Block>)> = header.targets.iter().copied().zip(images).collect();
    apply(ds, &writes)?;
    header.state = TxnState::Applied;
    ds.write(jrec, &header.encode(ds.uuid()))?;
    Ok(true)
}
