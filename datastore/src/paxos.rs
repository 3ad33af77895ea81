//! The volume lease, acquired by Disk Paxos: the lease under which shared metadata (lock
//! records now; directories and cluster ownership in Step 3) changes.
//!
//! Each lease version (`lver`) is one Paxos instance. Every host owns one ballot record
//! and only ever writes that one; all others are only read. To take lease version `v`:
//! 1. phase 1: write our ballot `{lver v, mbal b}` with `b = round × max_hosts + host_id`
//!    (so ballots of different hosts never collide), read all ballots; abort if any for
//!    `v` has a higher `mbal`; adopt the value of the highest `bal` seen, else propose us;
//! 2. phase 2: write `{lver v, mbal b, bal b, inp value}`, read all ballots again; abort if
//!    any for `v` has a higher `mbal`. Otherwise `value` is chosen for `v`.
//!
//! An instance is abandoned as stale when any ballot is already about a later instance, or
//! when the leader record already names `v` or a later one once we are done (a host that
//! moved on may have overwritten the ballots that carried `v`'s decision).
//!
//! The winner writes the leader record `{lver v, owner}`. Releasing writes the leader with
//! no owner. A leader whose owner's host lease is live is respected; one whose owner is
//! dead (by observation) or gone (freed or new generation) may be overtaken. Aborted
//! rounds retry with random backoff until a deadline.

use std::sync::Arc;
use std::time::Duration;

use crate::format::{Ballot, Decoded, Leader, Owner};
use crate::store::{Datastore, Observer};
use crate::{Error, Result};

/// A held volume lease; release it with [`VolumeLease::release`].
#[derive(Debug)]
pub struct VolumeLease {
    ds: Arc<Datastore>,
    owner: Owner,
    lver: u64,
    _turn: Turn,
}

/// The volume lease names a host incarnation, not a thread: within one process only one
/// task at a time may hold it for a given (datastore, owner), or two concurrent
/// metadata changes of one host could both believe they hold it. A turn is taken before
/// the Disk Paxos round and given back when the lease is released or dropped (also when
/// a panic unwinds through the holder).
#[derive(Debug)]
struct Turn {
    key: (uuid::Uuid, Owner),
}

static TURNS: std::sync::Mutex<Vec<(uuid::Uuid, Owner)>> = std::sync::Mutex::new(Vec::new());

impl Turn {
    /// Waits (on the datastore's clock, so simulated time works) for this process's
    /// turn, until `deadline`.
    fn take(ds: &Datastore, me: Owner, deadline: Duration) -> Result<Turn> {
        let key = (*ds.uuid(), me);
        loop {
            {
                let mut t = TURNS.lock().unwrap_or_else(|p| p.into_inner());
                if !t.contains(&key) {
                    t.push(key);
                    return Ok(Turn { key });
                }
            }
            if ds.clock().now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{}: waiting for another task of this host to release the volume lease",
                        ds.path().display()
                    ),
                    secs: 0.0,
                });
            }
            ds.clock().sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut t = TURNS.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|k| *k != self.key);
    }
}

fn read_leader(ds: &Datastore) -> Result<Option<Leader>> {
    Ok(
        match Leader::decode(&*ds.read(ds.superblock().leader_rec)?, ds.uuid()) {
            Decoded::Valid(l) => Some(l),
            Decoded::Blank => Some(Leader {
                lver: 0,
                owner: Owner::NONE,
            }),
            Decoded::Unknown(why) => {
                tracing::warn!("volume lease leader record unreadable ({why})");
                None
            }
        },
    )
}

fn read_ballots(ds: &Datastore) -> Result<Vec<Option<Ballot>>> {
    let sb = ds.superblock();
    // One read of every ballot: each record in it is still read atomically.
    Ok(ds
        .read_many(sb.ballot_start, sb.max_hosts as u64)?
        .iter()
        .map(|b| match Ballot::decode(b, ds.uuid()) {
            Decoded::Valid(b) => Some(b),
            Decoded::Blank => Some(Ballot::default()),
            Decoded::Unknown(_) => None,
        })
        .collect())
}

/// Pseudo-random jitter without a random crate: the clock's nanoseconds mixed with the id.
fn jitter(ds: &Datastore, host_id: u32, max: Duration) -> Duration {
    let n = ds.clock().now().subsec_nanos() as u64 ^ (host_id as u64).wrapping_mul(0x9E37_79B9);
    Duration::from_nanos(n % (max.as_nanos() as u64).max(1))
}

impl VolumeLease {
    /// Acquires the volume lease for `me`, waiting up to `timeout`.
    pub fn acquire(
        ds: &Arc<Datastore>,
        me: Owner,
        obs: &mut Observer,
        timeout: Duration,
    ) -> Result<VolumeLease> {
        let clock = Arc::clone(ds.clock());
        let sb = ds.superblock();
        let deadline = clock.now() + timeout;
        // One holder per process: with the turn held, a leader naming `me` is a hold
        // this process gave up without releasing (a failed release), never a live one.
        let turn = Turn::take(ds, me, deadline)?;
        let mut turn = Some(turn);
        let mut backoff = Duration::from_millis(5);
        loop {
            let leader = read_leader(ds)?;
            obs.observe(ds)?;
            let free = match leader {
                Some(l) => l.owner.is_none() || l.owner == me || !obs.owner_valid(l.owner),
                None => false,
            };
            if free {
                let lver = leader.map(|l| l.lver).unwrap_or(0) + 1;
                if let Some(winner) = run_paxos(ds, me, lver)? {
                    ds.write(
                        sb.leader_rec,
                        &Leader {
                            lver,
                            owner: winner,
                        }
                        .encode(ds.uuid()),
                    )?;
                    if winner == me {
                        // Anything a gone host left half-done is finished before the
                        // holder changes shared metadata.
                        let lease = VolumeLease {
                            ds: Arc::clone(ds),
                            owner: me,
                            lver,
                            _turn: turn.take().expect("the turn is taken once"),
                        };
                        if let Err(e) = crate::journal::recover(ds, obs) {
                            let _ = lease.release();
                            return Err(e);
                        }
                        return Ok(lease);
                    }
                }
            }
            if clock.now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{}: taking the volume lease", ds.path().display()),
                    secs: timeout.as_secs_f64(),
                });
            }
            clock.sleep(backoff + jitter(ds, me.host_id, backoff));
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// The lease version held.
    pub fn lver(&self) -> u64 {
        self.lver
    }

    /// Releases the lease (if it is still ours).
    pub fn release(self) -> Result<()> {
        let sb = self.ds.superblock();
        if let Some(l) = read_leader(&self.ds)? {
            if l.lver == self.lver && l.owner == self.owner {
                self.ds.write(
                    sb.leader_rec,
                    &Leader {
                        lver: self.lver,
                        owner: Owner::NONE,
                    }
                    .encode(self.ds.uuid()),
                )?;
            }
        }
        Ok(())
    }
}

/// One Disk Paxos instance for `lver`; returns the chosen owner, or None if outvoted.
fn run_paxos(ds: &Datastore, me: Owner, lver: u64) -> Result<Option<Owner>> {
    let sb = ds.superblock();
    let n = sb.max_hosts as u64;
    let my_rec = sb.ballot_start + me.host_id as u64 - 1;
    let ballots = read_ballots(ds)?;
    let max_mbal = ballots
        .iter()
        .flatten()
        .filter(|b| b.lver == lver)
        .map(|b| b.mbal)
        .max()
        .unwrap_or(0);
    let mine = ballots[me.host_id as usize - 1].unwrap_or_default();
    let bal = (max_mbal / n + 1) * n + me.host_id as u64;
    // Phase 1: announce the ballot, keeping what we accepted for this instance before.
    let (keep_bal, keep_inp) = if mine.lver == lver {
        (mine.bal, mine.inp)
    } else {
        (0, None)
    };
    ds.write(
        my_rec,
        &Ballot {
            lver,
            mbal: bal,
            bal: keep_bal,
            inp: keep_inp,
        }
        .encode(ds.uuid()),
    )?;
    let ballots = read_ballots(ds)?;
    let mut best: Option<(u64, Owner)> = None;
    for b in ballots.iter() {
        let Some(b) = b else {
            // An unreadable ballot could hide a higher one: do not risk it.
            return Ok(None);
        };
        if b.lver > lver {
            // Someone already runs a later instance: ours is stale.
            return Ok(None);
        }
        if b.lver != lver {
            continue;
        }
        if b.mbal > bal {
            return Ok(None);
        }
        if let Some(inp) = b.inp {
            if b.bal > 0 && best.is_none_or(|(bb, _)| b.bal > bb) {
                best = Some((b.bal, inp));
            }
        }
    }
    let value = best.map(|(_, v)| v).unwrap_or(me);
    // Phase 2: accept the value at our ballot.
    ds.write(
        my_rec,
        &Ballot {
            lver,
            mbal: bal,
            bal,
            inp: Some(value),
        }
        .encode(ds.uuid()),
    )?;
    for b in read_ballots(ds)? {
        match b {
            None => return Ok(None),
            Some(b) if b.lver > lver || (b.lver == lver && b.mbal > bal) => return Ok(None),
            Some(_) => {}
        }
    }
    // An instance that was already decided and recorded (the leader names it or a later
    // one) is stale: a host that moved on may have overwritten the ballots that carried
    // its decision, so what we "chose" must not count.
    match read_leader(ds)? {
        Some(l) if l.lver < lver => Ok(Some(value)),
        _ => Ok(None),
    }
}
