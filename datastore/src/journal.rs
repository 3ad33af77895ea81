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
//! A commit that fails is never taken as "nothing happened" unless the journal says so:
//! a failed journal write is read back ([`Outcome`]); a committed transaction that cannot
//! be applied is finished before this host writes anything else, and before the volume
//! lease or any lock it was computed under changes hands.
//!
//! Crash tests kill the process at each step through the failpoints `journal-written`,
//! `apply-partial` and `applied` ([`crate::failpoint`]).

use crate::filerec::{JournalHeader, TxnState, MAX_TXN_RECORDS};
use crate::format::{Block, Decoded, Owner};
use crate::store::Datastore;
use crate::store::{Liveness, Observer};
use crate::{Error, Result};

/// The crc32c of a transaction's images, over each image without its own trailing
/// checksum: a sealed record ends with the crc32c of what precedes it, and a CRC run over
/// data followed by its own CRC ends in a constant — over whole records, any set of valid
/// records (the previous transaction's images, left by a torn journal write) would match.
pub(crate) fn images_crc(images: &[Box<Block>]) -> u32 {
    images.iter().fold(0u32, |crc, b| {
        crc32c::crc32c_append(crc, &b.0[..crate::format::RECORD - 4])
    })
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

/// How a failed [`commit_txn`] left its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing of it is on disk, nor ever will be: the caller may act as if it was never
    /// tried.
    NotCommitted,
    /// It committed (its journal write is durable) but is not applied in place yet. It is
    /// finished before this host changes any record again, and before any lock or lease
    /// it was computed under changes hands: the caller must treat it as done.
    Committed,
    /// Unknown (the journal write failed and could not be read back): the caller can
    /// trust neither outcome and must stop using what it derived from it.
    InDoubt,
}

/// A failed commit: what the transaction became, and why.
#[derive(Debug)]
pub struct Failed {
    pub outcome: Outcome,
    pub error: Error,
}

impl From<Failed> for Error {
    fn from(f: Failed) -> Error {
        f.error
    }
}

/// How often finishing a committed transaction is tried before giving up for now.
const APPLY_TRIES: usize = 3;

/// Writes `writes` (record index, image) atomically through `host_id`'s journal, with
/// sequence number `seq` (greater than the last one).
pub fn commit(ds: &Datastore, me: Owner, seq: u64, writes: &[(u64, Box<Block>)]) -> Result<()> {
    commit_txn(ds, me, seq, writes).map_err(Error::from)
}

/// [`commit`], telling how a failure left the transaction.
///
/// A transaction of ours that was committed but not applied (an earlier commit failed
/// while applying) is finished first: the journal holds one transaction, and one that
/// committed must never be dropped half-applied. A journal write that fails is read
/// back: a durable, intact header and images mean it committed after all; anything else
/// means it never will. Applying is retried; a transaction that still cannot be applied
/// stays committed and is finished by the next change this host makes (or by the host
/// that recovers it once this one is gone) — never skipped.
pub fn commit_txn(
    ds: &Datastore,
    me: Owner,
    seq: u64,
    writes: &[(u64, Box<Block>)],
) -> std::result::Result<(), Failed> {
    let not = |error| Failed {
        outcome: Outcome::NotCommitted,
        error,
    };
    if writes.is_empty() {
        return Ok(());
    }
    let _turn = Turn::take(ds, me.host_id);
    replay_if(ds, me.host_id, |w| w == me).map_err(not)?;
    if writes.len() > MAX_TXN_RECORDS {
        return Err(not(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "metadata transaction of {} records exceeds the journal ({MAX_TXN_RECORDS})",
                writes.len()
            ),
        }));
    }
    let jrec = ds.superblock().journal_rec(me.host_id);
    let images: Vec<Box<Block>> = writes.iter().map(|(_, b)| b.clone()).collect();
    let header = JournalHeader {
        seq,
        writer: me,
        state: TxnState::Committed,
        images_crc: images_crc(&images),
        targets: writes.iter().map(|(t, _)| *t).collect(),
    };
    let mut all = Vec::with_capacity(images.len() + 1);
    all.push(header.encode(ds.uuid()));
    all.extend(images);
    if let Err(e) = ds.write_many(jrec, &all) {
        if matches!(e, Error::LeaseLost { .. }) {
            return Err(not(e)); // refused before anything was submitted
        }
        match committed(ds, &header, &all) {
            Ok(false) => return Err(not(e)),
            Ok(true) => {}
            Err(_) => {
                return Err(Failed {
                    outcome: Outcome::InDoubt,
                    error: e,
                })
            }
        }
    }
    crate::failpoint::crash_at("journal-written");
    let mut applied = header.clone();
    applied.state = TxnState::Applied;
    let first = apply(ds, writes).and_then(|_| ds.write(jrec, &applied.encode(ds.uuid())));
    let mut last = match first {
        Ok(()) => return Ok(()),
        Err(e) => Some(e),
    };
    for _ in 1..APPLY_TRIES {
        match replay_if(ds, me.host_id, |w| w == me) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("tried at least once");
    tracing::error!(
        "{}: journal transaction {seq} of host {} committed but could not be applied ({e}); \
         it is finished before this host changes anything else",
        ds.path().display(),
        me.host_id
    );
    Err(Failed {
        outcome: Outcome::Committed,
        error: e,
    })
}

/// Whether the journal now holds `header` committed with intact images (a failed journal
/// write read back).
fn committed(ds: &Datastore, header: &JournalHeader, written: &[Box<Block>]) -> Result<bool> {
    let jrec = ds.superblock().journal_rec(header.writer.host_id);
    let back = ds.read_many(jrec, written.len() as u64)?;
    Ok(match JournalHeader::decode(&back[0], ds.uuid()) {
        Decoded::Valid(h) => {
            h.seq == header.seq
                && h.writer == header.writer
                && h.state == TxnState::Committed
                && images_crc(&back[1..]) == h.images_crc
        }
        _ => false,
    })
}

/// Finishes this host's own committed-but-unapplied transaction, if any (before a lock
/// or lease it was computed under is given up).
pub fn finish_own(ds: &Datastore, me: Owner) -> Result<()> {
    let _turn = Turn::take(ds, me.host_id);
    replay_if(ds, me.host_id, |w| w == me).map(|_| ())
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
