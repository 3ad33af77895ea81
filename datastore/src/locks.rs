//! Object locks: one lock record per object, changed only under the volume lease.
//!
//! A record names its holders by host id and host generation and carries a version that
//! rises on every change of holders. A holder counts only while its host lease is live
//! with that generation *as this host observes it*: a dead host's hold is broken only
//! after its slot was seen unchanged for `host_dead` (by which time its fencing has
//! emptied its cgroup), and a host that rejoined under a new generation no longer holds
//! what its previous incarnation held.
//!
//! Objects map to records by crc32c of the name with linear probing. Records are written
//! through the writer's journal, so one torn by a crash is finished by the journal's
//! replay; until then an unreadable record on an object's probe chain may be that
//! object's own, and the object counts as held.

use std::sync::Arc;
use std::time::Duration;

use crate::format::{Decoded, LockMode, LockRecord, Owner};
use crate::paxos::VolumeLease;
use crate::store::{Datastore, Observer};
use crate::{Error, Result};

/// How long one metadata change may wait for the volume lease: long enough to outwait a
/// holder that died holding it (host_dead), plus a few io_timeouts of contention.
fn volume_lease_wait(ds: &Datastore) -> Duration {
    ds.superblock().host_dead() + 4 * ds.superblock().io_timeout()
}

/// A lock record and where it lives.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LockEntry {
    pub record: u64,
    pub lock: LockRecord,
}

fn check_object(ds: &Datastore, object: &str) -> Result<()> {
    if object.is_empty() || object.len() > crate::format::MAX_OBJECT {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!("object name {object:?} must be 1 to 255 bytes"),
        });
    }
    Ok(())
}

/// Finds `object`'s record, or the record it would take.
fn find(ds: &Datastore, object: &str) -> Result<(u64, Option<LockRecord>)> {
    let sb = ds.superblock();
    let n = sb.lock_count as u64;
    let start = crc32c::crc32c(object.as_bytes()) as u64 % n;
    let mut vacant = None;
    for i in 0..n {
        let idx = sb.lock_start + (start + i) % n;
        match LockRecord::decode(&*ds.read(idx)?, ds.uuid()) {
            Decoded::Valid(r) if r.object == object => return Ok((idx, Some(r))),
            Decoded::Valid(r) if r.holders.is_empty() => {
                vacant.get_or_insert(idx);
            }
            Decoded::Blank => {
                // The probe chain ends here: the object has no record.
                return Ok((vacant.unwrap_or(idx), None));
            }
            Decoded::Unknown(why) => {
                // It may be this object's own record, torn by a crash mid-write: treat it
                // as held. Its writer's journal finishes it once that host is gone.
                return Err(Error::LockHeld {
                    object: object.to_string(),
                    mode: format!("possibly (its lock record {idx} is unreadable: {why})"),
                    holders: "an unknown host; the record is rewritten when its writer's \
                              journal is replayed, or by `ferry datastore check --repair` \
                              once no other host is live"
                        .into(),
                });
            }
            Decoded::Valid(_) => {}
        }
    }
    match vacant {
        Some(idx) => Ok((idx, None)),
        None => Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: "the lock table is full".into(),
        }),
    }
}

fn describe(obs: &Observer, holders: &[Owner]) -> String {
    holders
        .iter()
        .map(|h| {
            let name = obs
                .views()
                .get(h.host_id as usize - 1)
                .and_then(|v| v.slot.as_ref())
                .map(|s| s.name.clone())
                .unwrap_or_else(|| "?".into());
            format!("{name} (host {} generation {})", h.host_id, h.generation)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `f` on `object`'s record under the volume lease, writing back what it returns.
fn update<T>(
    ds: &Arc<Datastore>,
    me: Owner,
    obs: &mut Observer,
    object: &str,
    f: impl FnOnce(&Observer, Option<LockRecord>) -> Result<(Option<LockRecord>, T)>,
) -> Result<T> {
    check_object(ds, object)?;
    let lease = VolumeLease::acquire(ds, me, obs, volume_lease_wait(ds))?;
    let result = (|| -> Result<T> {
        obs.observe(ds)?;
        // The observation that may break a dead host's hold is the one its journal is
        // finished under: a host that turned dead since the lease's own recovery may have
        // a committed transaction naming this very record.
        crate::journal::recover(ds, obs)?;
        let (idx, rec) = find(ds, object)?;
        let (new, out) = f(obs, rec)?;
        if let Some(new) = new {
            // Through our journal: a crash mid-write leaves a torn record that the
            // journal's replay finishes (an unreadable record is never taken as free).
            let seq = crate::journal::last_seq(ds, me.host_id)? + 1;
            crate::journal::commit(ds, me, seq, &[(idx, new.encode(ds.uuid()))])?;
        }
        Ok(out)
    })();
    let released = lease.release();
    let out = result?;
    released?;
    Ok(out)
}

/// Tries once to take `object` in `mode` for `me`; returns the new lock version.
pub fn try_acquire(
    ds: &Arc<Datastore>,
    me: Owner,
    obs: &mut Observer,
    object: &str,
    mode: LockMode,
) -> Result<u64> {
    update(ds, me, obs, object, |obs, rec| {
        let mut rec = rec.unwrap_or(LockRecord {
            object: object.to_string(),
            mode,
            version: 0,
            holders: Vec::new(),
        });
        let live: Vec<Owner> = rec
            .holders
            .iter()
            .copied()
            .filter(|h| obs.owner_valid(*h) && *h != me)
            .collect();
        let compatible = live.is_empty() || (rec.mode == mode && mode != LockMode::Exclusive);
        if !compatible {
            return Err(Error::LockHeld {
                object: object.to_string(),
                mode: rec.mode.as_str().to_string(),
                holders: describe(obs, &live),
            });
        }
        if live.len() < rec.holders.len() {
            let broken: Vec<Owner> = rec
                .holders
                .iter()
                .copied()
                .filter(|h| !live.contains(h) && *h != me)
                .collect();
            if !broken.is_empty() {
                tracing::info!(
                    "lock {object:?}: breaking the hold of {}",
                    describe(obs, &broken)
                );
            }
        }
        rec.holders = live;
        rec.holders.push(me);
        rec.mode = mode;
        rec.version += 1;
        let v = rec.version;
        Ok((Some(rec), v))
    })
}

/// Takes `object`, retrying every `poll` until `wait` has passed.
pub fn acquire(
    ds: &Arc<Datastore>,
    me: Owner,
    obs: &mut Observer,
    object: &str,
    mode: LockMode,
    wait: Duration,
) -> Result<u64> {
    let clock = Arc::clone(ds.clock());
    let deadline = clock.now() + wait;
    let poll = ds.superblock().io_timeout() / 2;
    loop {
        match try_acquire(ds, me, obs, object, mode) {
            Err(Error::LockHeld { .. }) if clock.now() < deadline => clock.sleep(poll),
            other => return other,
        }
    }
}

/// Releases `me`'s hold on `object`.
pub fn release(ds: &Arc<Datastore>, me: Owner, obs: &mut Observer, object: &str) -> Result<()> {
    update(ds, me, obs, object, |_, rec| match rec {
        Some(mut rec) if rec.holders.contains(&me) => {
            rec.holders.retain(|h| *h != me);
            rec.version += 1;
            Ok((Some(rec), ()))
        }
        _ => Ok((None, ())),
    })
}

/// Hands `me`'s exclusive hold on `object` to `to`, if the lock is still at
/// `expected_version`; returns the new version.
pub fn handoff(
    ds: &Arc<Datastore>,
    me: Owner,
    obs: &mut Observer,
    object: &str,
    to: Owner,
    expected_version: u64,
) -> Result<u64> {
    update(ds, me, obs, object, |obs, rec| {
        let Some(mut rec) = rec else {
            return Err(Error::Invalid {
                object: ds.path().to_path_buf(),
                detail: format!("lock {object:?} does not exist"),
            });
        };
        if rec.version != expected_version || rec.holders != [me] {
            return Err(Error::LockHeld {
                object: object.to_string(),
                mode: format!("at version {} (expected {expected_version})", rec.version),
                holders: describe(obs, &rec.holders),
            });
        }
        // Exactly the incarnation the slot shows, live: a generation above it is no
        // host yet (owner_valid lets an owner outrank a delayed joiner's write; a
        // handoff must not name a future incarnation).
        let exact = obs
            .views()
            .get(to.host_id as usize - 1)
            .and_then(|v| v.slot.as_ref().map(|s| (s.host_generation, v.liveness)))
            .is_some_and(|(g, l)| g == to.generation && l == crate::store::Liveness::Live);
        if to.host_id == 0 || !exact || !obs.owner_valid(to) {
            return Err(Error::Invalid {
                object: ds.path().to_path_buf(),
                detail: format!(
                    "cannot hand lock {object:?} to host {} generation {}: not live",
                    to.host_id, to.generation
                ),
            });
        }
        rec.holders = vec![to];
        rec.version += 1;
        let v = rec.version;
        Ok((Some(rec), v))
    })
}

/// Every lock record in use.
pub fn list(ds: &Datastore) -> Result<Vec<LockEntry>> {
    let sb = ds.superblock();
    let recs = ds.read_many(sb.lock_start, sb.lock_count as u64)?;
    Ok((sb.lock_start..)
        .zip(recs.iter())
        .filter_map(|(record, b)| match LockRecord::decode(b, ds.uuid()) {
            Decoded::Valid(lock) => Some(LockEntry { record, lock }),
            _ => None,
        })
        .collect())
}
