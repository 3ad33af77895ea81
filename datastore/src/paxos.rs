//! The volume lease, acquired by Disk Paxos: the lease under which shared metadata (lock
//! records, directories, cluster ownership) changes.
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
//! The winner writes the leader record `{lver v, owner}`; so does a host that learned the
//! decision in someone else's place. The current instance is the highest that the leader
//! or any ballot names: a leader record behind the ballots (a helper's late write) or torn
//! is not trusted, and that instance is run again to learn its value. The next instance
//! starts only when the current owner is known to be free: none, dead or gone by
//! observation, or its own ballot says `released ≥ v` (written before the leader on
//! release, and on giving up after proposing itself; only its owner writes a ballot, so
//! no stale write can undo it). A torn ballot of a gone host reads as blank. Aborted
//! rounds retry with random backoff until a deadline.

use std::sync::Arc;
use std::time::Duration;

use crate::format::{Ballot, Decoded, Leader, Owner};
use crate::store::{Datastore, Liveness, Observer};
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

/// Reads every ballot. A torn ballot (its writer crashed mid-write) of a host this
/// observer sees dead or free reads as blank: a gone host never acts on it, and a value
/// that was chosen lives on in its chooser's intact ballot (a chooser never rewrites its
/// ballot for that instance). A torn ballot of a live host is `None`: it may be writing it
/// now (a round that sees one aborts and retries). Our own is blank if torn: we are not
/// writing it, so it is an earlier incarnation's.
fn read_ballots(ds: &Datastore, obs: &Observer, me: Owner) -> Result<Vec<Option<Ballot>>> {
    let sb = ds.superblock();
    // One read of every ballot: each record in it is still read atomically.
    Ok(ds
        .read_many(sb.ballot_start, sb.max_hosts as u64)?
        .iter()
        .enumerate()
        .map(|(i, b)| match Ballot::decode(b, ds.uuid()) {
            Decoded::Valid(b) => Some(b),
            Decoded::Blank => Some(Ballot::default()),
            Decoded::Unknown(_) => {
                let host_id = i as u32 + 1;
                let gone = obs
                    .views()
                    .get(i)
                    .is_some_and(|v| matches!(v.liveness, Liveness::Dead | Liveness::Free));
                (gone || host_id == me.host_id).then(Ballot::default)
            }
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
    ///
    /// The current instance is the highest one that the leader record or any ballot
    /// names. When the leader record is behind the ballots (a stale write of a helper, or
    /// a winner that has not recorded yet) or torn, that instance is run again to learn
    /// its value (Paxos makes any later round of an instance adopt a chosen value). The
    /// next instance is started only once the current one's owner is known to be free:
    /// no owner, ourselves (the process turn proves no task of ours holds it), not live,
    /// or its ballot says it released that instance.
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
            let ballots = read_ballots(ds, obs, me)?;
            let mine = ballots[me.host_id as usize - 1].unwrap_or_default();
            let newest = ballots.iter().flatten().map(|b| b.lver).max().unwrap_or(0);
            let known = match leader {
                Some(l) if l.lver >= newest => Some((l.lver, l.owner)),
                _ if newest == 0 => Some((0, Owner::NONE)),
                _ => None,
            };
            // Records the decision of an instance in the leader record.
            let record = |lver: u64, owner: Owner| {
                ds.write(sb.leader_rec, &Leader { lver, owner }.encode(ds.uuid()))
            };
            let mut take = None;
            match known {
                Some((cur, owner)) => {
                    let released = |o: Owner| {
                        ballots[o.host_id as usize - 1].is_some_and(|b| b.released >= cur)
                    };
                    if owner.is_none() || owner == me || !obs.owner_valid(owner) || released(owner)
                    {
                        take = Some(cur + 1);
                    }
                }
                None => {
                    // Learn the newest instance: we may only win it for ourselves if we
                    // never said we hold nothing up to it.
                    let cur = newest;
                    if let Some(winner) = run_paxos(ds, me, cur, obs, mine.released < cur)? {
                        record(cur, winner)?;
                        if winner == me && mine.released < cur {
                            if let Some(l) = self_won(ds, me, cur, obs, &mut turn)? {
                                return Ok(l);
                            }
                        }
                    }
                }
            }
            if let Some(lver) = take {
                if let Some(winner) = run_paxos(ds, me, lver, obs, true)? {
                    record(lver, winner)?;
                    if winner == me {
                        if let Some(l) = self_won(ds, me, lver, obs, &mut turn)? {
                            return Ok(l);
                        }
                    }
                }
            }
            if clock.now() >= deadline {
                give_up(ds, me, obs);
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

    /// Releases the lease (if it is still ours): our ballot says so first (it cannot be
    /// overwritten by anyone else), then the leader record, if it still names us.
    ///
    /// A transaction of ours that committed under the lease but is not applied yet is
    /// finished first; if it cannot be, the lease stays ours (on disk) until it is, or
    /// until this host is gone and another finishes it: the records it writes were
    /// computed under this lease, and nobody may change them in between.
    pub fn release(self) -> Result<()> {
        let sb = self.ds.superblock();
        crate::journal::finish_own(&self.ds, self.owner)?;
        mark_released(&self.ds, self.owner, self.lver)?;
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

/// We won instance `lver`: finish what gone hosts left half-done, then hold.
fn self_won(
    ds: &Arc<Datastore>,
    me: Owner,
    lver: u64,
    obs: &mut Observer,
    turn: &mut Option<Turn>,
) -> Result<Option<VolumeLease>> {
    let lease = VolumeLease {
        ds: Arc::clone(ds),
        owner: me,
        lver,
        _turn: turn.take().expect("the turn is taken once"),
    };
    // Anything a gone host left half-done is finished before the holder changes shared
    // metadata.
    if let Err(e) = crate::journal::recover(ds, obs) {
        let _ = lease.release();
        return Err(e);
    }
    Ok(Some(lease))
}

/// Raises our ballot's `released` to `lver` (keeping its Paxos fields).
fn mark_released(ds: &Datastore, me: Owner, lver: u64) -> Result<()> {
    let rec = ds.superblock().ballot_start + me.host_id as u64 - 1;
    let mut b = match Ballot::decode(&*ds.read(rec)?, ds.uuid()) {
        Decoded::Valid(b) => b,
        _ => Ballot::default(),
    };
    if b.released >= lver {
        return Ok(());
    }
    b.released = lver;
    ds.write(rec, &b.encode(ds.uuid()))
}

/// Giving up: if our ballot accepted ourselves in its instance, others may have chosen
/// that value after we stopped looking; say we hold nothing up to it, so nobody waits
/// for an owner that is not there.
fn give_up(ds: &Datastore, me: Owner, obs: &Observer) {
    let Ok(ballots) = read_ballots(ds, obs, me) else {
        return;
    };
    let mine = ballots[me.host_id as usize - 1].unwrap_or_default();
    if mine.inp == Some(me) && mine.released < mine.lver {
        if let Err(e) = mark_released(ds, me, mine.lver) {
            tracing::warn!(
                "volume lease: could not mark instance {} released: {e}",
                mine.lver
            );
        }
    }
}

/// One Disk Paxos instance for `lver`; returns the chosen owner, or None if outvoted.
/// With `propose_me` false we only learn: a round that finds no accepted value aborts.
fn run_paxos(
    ds: &Datastore,
    me: Owner,
    lver: u64,
    obs: &Observer,
    propose_me: bool,
) -> Result<Option<Owner>> {
    let sb = ds.superblock();
    let n = sb.max_hosts as u64;
    let my_rec = sb.ballot_start + me.host_id as u64 - 1;
    let ballots = read_ballots(ds, obs, me)?;
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
    let released = mine.released;
    ds.write(
        my_rec,
        &Ballot {
            lver,
            mbal: bal,
            bal: keep_bal,
            inp: keep_inp,
            released,
        }
        .encode(ds.uuid()),
    )?;
    let ballots = read_ballots(ds, obs, me)?;
    let mut best: Option<(u64, Owner)> = None;
    for b in ballots.iter() {
        let Some(b) = b else {
            // An unreadable ballot of a live host could hide a higher one: do not risk it.
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
    let value = match best {
        Some((_, v)) => v,
        None if propose_me => me,
        None => return Ok(None),
    };
    // Phase 2: accept the value at our ballot.
    ds.write(
        my_rec,
        &Ballot {
            lver,
            mbal: bal,
            bal,
            inp: Some(value),
            released,
        }
        .encode(ds.uuid()),
    )?;
    for b in read_ballots(ds, obs, me)? {
        match b {
            None => return Ok(None),
            Some(b) if b.lver > lver || (b.lver == lver && b.mbal > bal) => return Ok(None),
            Some(_) => {}
        }
    }
    // An instance that was already decided and recorded (the leader names it or a later
    // one) is stale: a host that moved on may have overwritten the ballots that carried
    // its decision. (A torn leader tells nothing; the ballots above already showed that
    // nobody moved past this instance.)
    match read_leader(ds)? {
        Some(l) if l.lver >= lver => Ok(None),
        _ => Ok(Some(value)),
    }
}
