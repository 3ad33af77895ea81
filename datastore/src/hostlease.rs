//! Host leases (delta leases): a host proves it is alive by rewriting its own heartbeat
//! slot every `2 × io_timeout`.
//!
//! - **Join**: pick the slot already named after this host (refused if it is renewed
//!   while we watch: another live host has that name), else a free slot, else a slot seen
//!   dead. Write it (new generation, new incarnation), wait `2 × io_timeout`, read it back:
//!   a concurrent joiner of the same slot shows up as a different incarnation. A write that
//!   completes more than `io_timeout` after the read it was based on is abandoned.
//! - **Renew**: a dedicated thread, synchronous record I/O. Each renewal reads the slot
//!   (it must still be ours), then writes it with the renewal counter increased. The
//!   *issue* time of the last good renewal is what counts: once `8 × io_timeout` has
//!   passed since then, the lease is lost and the holder must stop using its locks.
//! - **Resume** (an agent restart): the same slot, generation and incarnation, renewed
//!   again at once, so every lock the host holds stays held. Only with local proof that
//!   the earlier process has exited, and only while its last good renewal is less than
//!   `fence_after - io_timeout` old: a resumed renewal then is just a late renewal.
//! - **Leave**: stop renewing and mark the slot free.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use uuid::Uuid;

use crate::format::{Decoded, HostSlot, Owner, SlotState, MAX_ADDR, MAX_NAME};
use crate::store::{Datastore, Liveness, Observer};
use crate::{Error, Result};

/// Called after every good renewal with its issue time (a watchdog pet).
pub type PetFn = Box<dyn Fn(Duration) + Send>;

/// A joined host: its slot, and the renewal thread.
#[derive(Debug)]
pub struct HostLease {
    ds: Arc<Datastore>,
    owner: Owner,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The pet of a lease renewed by [`HostLease::renew_now`] instead of a thread.
    manual_pet: Option<ManualPet>,
}

/// The pet of a lease without a renewal thread.
struct ManualPet(Mutex<PetFn>);

impl std::fmt::Debug for ManualPet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManualPet")
    }
}

/// How a lease is joined.
#[derive(Debug, Clone, Copy)]
pub struct JoinOptions {
    /// When false (negative-control tests only), an expired lease is not reported lost.
    pub enforce: bool,
    /// When false, no renewal thread is started: the caller renews with
    /// [`HostLease::renew_now`] every `renew_interval` (the protocol simulator's hosts do,
    /// so that every renewal is a step it schedules).
    pub renewal_thread: bool,
}

impl Default for JoinOptions {
    fn default() -> Self {
        JoinOptions {
            enforce: true,
            renewal_thread: true,
        }
    }
}

#[derive(Debug)]
struct Shared {
    slot: Mutex<HostSlot>,
    /// Issue time of the last good renewal.
    last_good: Mutex<Duration>,
    lost: Mutex<Option<String>>,
    stop: AtomicBool,
    /// When false (negative-control tests only), an expired lease is not treated as lost.
    enforce: bool,
}

fn check_name(ds: &Datastore, name: &str, address: &str) -> Result<()> {
    let bad = |d: String| {
        Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: d,
        })
    };
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return bad(format!(
            "host name {name:?} must be 1 to {MAX_NAME} characters of letters, digits, '-', '_' or '.'"
        ));
    }
    if address.len() > MAX_ADDR {
        return bad(format!(
            "address {address:?} is longer than {MAX_ADDR} bytes"
        ));
    }
    Ok(())
}

impl HostLease {
    /// Joins the datastore as host `name`, publishing `address`.
    pub fn join(ds: Arc<Datastore>, name: &str, address: &str, pet: PetFn) -> Result<HostLease> {
        Self::join_opts(ds, name, address, pet, true)
    }

    /// [`HostLease::join`], with `enforce` false for negative-control tests: an expired
    /// lease is then not reported lost.
    pub fn join_opts(
        ds: Arc<Datastore>,
        name: &str,
        address: &str,
        pet: PetFn,
        enforce: bool,
    ) -> Result<HostLease> {
        let opts = JoinOptions {
            enforce,
            ..JoinOptions::default()
        };
        Self::join_with(ds, name, address, pet, opts)
    }

    /// [`HostLease::join`] with options.
    pub fn join_with(
        ds: Arc<Datastore>,
        name: &str,
        address: &str,
        pet: PetFn,
        opts: JoinOptions,
    ) -> Result<HostLease> {
        let enforce = opts.enforce;
        check_name(&ds, name, address)?;
        let sb = ds.superblock().clone();
        let clock = Arc::clone(ds.clock());
        let mut obs = Observer::new(&ds);
        for attempt in 0..8 {
            let views = obs.observe(&ds)?.to_vec();
            let mine = views.iter().find(|v| {
                v.slot
                    .as_ref()
                    .is_some_and(|s| s.name == name && s.state == SlotState::Joined)
            });
            let host_id = match mine {
                Some(v) => {
                    // Our name holds a slot: a previous incarnation, or another live host.
                    // Watch it until it is seen dead, refusing as soon as it is renewed.
                    let deadline = clock.now() + sb.host_dead();
                    let first = v.slot.clone();
                    loop {
                        let v2 = obs.observe(&ds)?[v.host_id as usize - 1].clone();
                        if v2.slot != first {
                            return Err(Error::Exists {
                                object: ds.path().to_path_buf(),
                                detail: format!(
                                    "host {name:?} is already live in slot {} (it renewed while we \
                                     watched): another host or agent runs under this name",
                                    v.host_id
                                ),
                            });
                        }
                        if v2.liveness == Liveness::Dead {
                            break;
                        }
                        if clock.now() > deadline + 4 * sb.io_timeout() {
                            return Err(Error::Timeout {
                                what: format!(
                                    "{}: waiting for slot {} of host {name:?} to be seen dead",
                                    ds.path().display(),
                                    v.host_id
                                ),
                                secs: (sb.host_dead() + 4 * sb.io_timeout()).as_secs_f64(),
                            });
                        }
                        clock.sleep(sb.io_timeout() / 2);
                    }
                    v.host_id
                }
                None => match views.iter().find(|v| v.liveness == Liveness::Free) {
                    Some(v) => v.host_id,
                    None => {
                        // No free slot: wait to see one dead.
                        let deadline = clock.now() + sb.host_dead() + sb.io_timeout();
                        loop {
                            let views = obs.observe(&ds)?;
                            if let Some(v) = views
                                .iter()
                                .find(|v| matches!(v.liveness, Liveness::Free | Liveness::Dead))
                            {
                                break v.host_id;
                            }
                            if clock.now() > deadline {
                                return Err(Error::Invalid {
                                    object: ds.path().to_path_buf(),
                                    detail: format!(
                                        "all {} host slots are in use by live hosts",
                                        sb.max_hosts
                                    ),
                                });
                            }
                            clock.sleep(sb.io_timeout());
                        }
                    }
                },
            };
            // Taken only if it still holds exactly what was judged free or dead.
            let judged = obs
                .seen_record(host_id)
                .map(|b| Box::new(b.clone()))
                .unwrap_or_else(crate::format::Block::zeroed);
            match Self::take_slot(&ds, host_id, &judged, name, address, &pet, enforce)? {
                Some((slot, issued)) => {
                    let owner = Owner {
                        host_id,
                        generation: slot.host_generation,
                    };
                    tracing::info!(
                        "{}: joined as {name} (host id {host_id}, generation {})",
                        ds.path().display(),
                        owner.generation
                    );
                    let shared = Arc::new(Shared {
                        slot: Mutex::new(slot),
                        last_good: Mutex::new(issued),
                        lost: Mutex::new(None),
                        stop: AtomicBool::new(false),
                        enforce,
                    });
                    repair_own_ballot(&ds, host_id);
                    ds.arm_faults();
                    if !opts.renewal_thread {
                        return Ok(HostLease {
                            ds,
                            owner,
                            shared,
                            thread: None,
                            manual_pet: Some(ManualPet(Mutex::new(pet))),
                        });
                    }
                    let t_ds = Arc::clone(&ds);
                    let t_shared = Arc::clone(&shared);
                    let thread = std::thread::Builder::new()
                        .name("ferry-renew".into())
                        .spawn(move || renew_loop(&t_ds, &t_shared, pet))
                        .map_err(|e| Error::io(ds.path(), "start the renewal thread", e))?;
                    return Ok(HostLease {
                        ds,
                        owner,
                        shared,
                        thread: Some(thread),
                        manual_pet: None,
                    });
                }
                None => {
                    tracing::info!(
                        "slot {host_id}: another host joined it at the same time; retrying"
                    );
                    clock.sleep(sb.io_timeout() / 4 * (attempt + 1));
                }
            }
        }
        Err(Error::Timeout {
            what: format!("{}: joining as {name}", ds.path().display()),
            secs: 0.0,
        })
    }

    /// Resumes a slot this host joined in an earlier process (an agent restart): same
    /// slot, generation and incarnation, so every lock it held stays held. The caller
    /// must have local proof that the earlier process has exited (it held a host-local
    /// lock file that is now free) and give the issue time of that process's last good
    /// renewal (`last_good`, `CLOCK_BOOTTIME`; an earlier time than the true one is
    /// safe). The first renewal is issued at once; resuming is refused once
    /// `fence_after - io_timeout` has passed since `last_good`, when the watchdog may
    /// already be emptying the host's cgroup and other hosts may soon see it dead.
    pub fn resume(
        ds: Arc<Datastore>,
        host_id: u32,
        incarnation: Uuid,
        address: &str,
        last_good: Duration,
        pet: PetFn,
    ) -> Result<HostLease> {
        let sb = ds.superblock().clone();
        let too_late = |detail: String| Error::LeaseLost {
            object: ds.path().to_path_buf(),
            detail,
        };
        if host_id == 0 || host_id > sb.max_hosts {
            return Err(too_late(format!("slot {host_id} does not exist")));
        }
        let mut slot = match ds.read_slot(host_id)? {
            Decoded::Valid(s) if s.incarnation == incarnation && s.state == SlotState::Joined => s,
            _ => {
                return Err(too_late(format!(
                    "slot {host_id} no longer holds our incarnation: join again"
                )))
            }
        };
        check_name(&ds, &slot.name, address)?;
        let since = ds.clock().now().saturating_sub(last_good);
        if since + sb.io_timeout() >= sb.fence_after() {
            return Err(too_late(format!(
                "the last renewal was {:.1}s ago, too close to the fencing deadline ({:.1}s)                  to resume: join again",
                since.as_secs_f64(),
                sb.fence_after().as_secs_f64()
            )));
        }
        slot.address = address.to_string();
        let owner = Owner {
            host_id,
            generation: slot.host_generation,
        };
        let shared = Arc::new(Shared {
            slot: Mutex::new(slot),
            last_good: Mutex::new(last_good),
            lost: Mutex::new(None),
            stop: AtomicBool::new(false),
            enforce: true,
        });
        ds.set_write_deadline(Some(last_good + sb.fence_after()));
        // Renew once now, synchronously, so the caller knows the slot is ours again.
        renew_once(&ds, &shared, &pet);
        if let Some(why) = shared.lost.lock().expect("lease state").clone() {
            return Err(too_late(why));
        }
        if *shared.last_good.lock().expect("lease state") == last_good {
            return Err(too_late("the resuming renewal failed".into()));
        }
        tracing::info!(
            "{}: resumed slot {host_id} (generation {})",
            ds.path().display(),
            owner.generation
        );
        ds.arm_faults();
        let t_ds = Arc::clone(&ds);
        let t_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferry-renew".into())
            .spawn(move || renew_loop(&t_ds, &t_shared, pet))
            .map_err(|e| Error::io(ds.path(), "start the renewal thread", e))?;
        Ok(HostLease {
            ds,
            owner,
            shared,
            thread: Some(thread),
            manual_pet: None,
        })
    }

    /// Renews once now (a lease joined without a renewal thread); false once the lease
    /// is lost.
    pub fn renew_now(&self) -> bool {
        if let Some(pet) = &self.manual_pet {
            let pet = pet.0.lock().expect("lease pet");
            renew_once(&self.ds, &self.shared, &pet);
        }
        self.lost().is_none()
    }

    /// The slot's incarnation (what [`HostLease::resume`] needs).
    pub fn incarnation(&self) -> Uuid {
        self.shared.slot.lock().expect("lease state").incarnation
    }

    /// Writes our record into slot `host_id` if it still holds `judged` (the record an
    /// observation judged free or dead), and checks nobody else did the same.
    ///
    /// The slot is re-read just before writing and must match `judged` byte for byte: a
    /// joiner held up between its observation and its write (stopped, swapped out) finds
    /// the host that joined meanwhile and backs off instead of writing over a live
    /// lease. The write itself must be submitted within `io_timeout` of that re-read
    /// (checked immediately before submission), so any two joiners that both saw the slot
    /// free overlap in time and the `2 × io_timeout` read-back tells them apart.
    fn take_slot(
        ds: &Datastore,
        host_id: u32,
        judged: &crate::format::Block,
        name: &str,
        address: &str,
        pet: &PetFn,
        enforce: bool,
    ) -> Result<Option<(HostSlot, Duration)>> {
        let sb = ds.superblock();
        let clock = ds.clock();
        let t_read = clock.now();
        // Arm the watchdog before writing anything: a joiner held up from here on (stopped,
        // starved) is fenced `8 × io_timeout` after `t_read`, like a host that stopped
        // renewing; its writes are refused from then on.
        pet(t_read);
        if enforce {
            ds.set_write_deadline(Some(t_read + sb.fence_after()));
        }
        let raw = ds.read(ds.slot_rec(host_id))?;
        if raw.0 != judged.0 {
            tracing::info!("slot {host_id} changed since it was judged free; not taking it");
            return Ok(None);
        }
        let prev_generation = match HostSlot::decode(&raw, ds.uuid()) {
            Decoded::Valid(s) => s.host_generation,
            Decoded::Blank => 0,
            Decoded::Unknown(why) => {
                // Generations must only grow (see `Observer::owner_valid`): continue above
                // every generation of this slot that a lock record or the leader names.
                let above = highest_generation_named(ds, host_id)?;
                tracing::warn!(
                    "slot {host_id} is unreadable ({why}); taking it over above generation {above}"
                );
                above
            }
        };
        let slot = HostSlot {
            host_id,
            state: SlotState::Joined,
            host_generation: prev_generation + 1,
            incarnation: Uuid::new_v4(),
            renewal: 0,
            name: name.to_string(),
            address: address.to_string(),
        };
        match ds.write_before(
            ds.slot_rec(host_id),
            &slot.encode(ds.uuid()),
            Some(t_read + sb.io_timeout()),
        ) {
            Ok(()) => {}
            Err(Error::LeaseLost { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        if clock.now().saturating_sub(t_read) > sb.io_timeout() {
            // Too slow: a concurrent joiner's checks assume we wrote within io_timeout.
            return Ok(None);
        }
        clock.sleep(2 * sb.io_timeout());
        if clock.now().saturating_sub(t_read) > 2 * sb.io_timeout() + sb.io_timeout() {
            // We were held up (stopped, starved) long enough that our slot write may
            // already look old to others: it cannot count as a fresh first renewal.
            return Ok(None);
        }
        match ds.read_slot(host_id)? {
            // Our slot write was issued no earlier than t_read: it counts as the first renewal.
            Decoded::Valid(s) if s.incarnation == slot.incarnation => Ok(Some((slot, t_read))),
            _ => Ok(None),
        }
    }

    /// Our host id and generation.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    pub fn datastore(&self) -> &Arc<Datastore> {
        &self.ds
    }

    /// Issue time of the last good renewal (the join's slot write at first): the watchdog
    /// deadline runs from here.
    pub fn last_good(&self) -> Duration {
        *self.shared.last_good.lock().expect("lease state")
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost.lock().expect("lease state").clone()
    }

    /// Fails if the lease is lost or has gone `8 × io_timeout` without a good renewal.
    pub fn check(&self) -> Result<()> {
        let expired = self.shared.enforce
            && self
                .ds
                .clock()
                .now()
                .saturating_sub(*self.shared.last_good.lock().expect("lease state"))
                > self.ds.superblock().fence_after();
        match self.lost() {
            Some(detail) => Err(Error::LeaseLost {
                object: self.ds.path().to_path_buf(),
                detail,
            }),
            None if expired => Err(Error::LeaseLost {
                object: self.ds.path().to_path_buf(),
                detail: "no good renewal within 8 × io_timeout".into(),
            }),
            None => Ok(()),
        }
    }

    /// Stops renewing and frees the slot. Refused while a lock record still names this
    /// host: a free slot makes every hold of ours invalid at once, while whoever uses
    /// that lock may still be writing (release the locks first, or drop the lease and let
    /// the slot be seen dead after host_dead).
    pub fn leave(mut self) -> Result<()> {
        let held: Vec<String> = crate::locks::list(&self.ds)?
            .into_iter()
            .filter(|e| e.lock.holders.contains(&self.owner))
            .map(|e| e.lock.object)
            .collect();
        if !held.is_empty() {
            return Err(Error::Invalid {
                object: self.ds.path().to_path_buf(),
                detail: format!(
                    "cannot leave while this host holds lock(s) {held:?}: release them first"
                ),
            });
        }
        self.stop_thread();
        let mut slot = self.shared.slot.lock().expect("lease state").clone();
        match self.ds.read_slot(self.owner.host_id)? {
            Decoded::Valid(s) if s.incarnation == slot.incarnation => {}
            _ => {
                return Err(Error::LeaseLost {
                    object: self.ds.path().to_path_buf(),
                    detail: "the slot was taken over before we left".into(),
                })
            }
        }
        slot.state = SlotState::Free;
        slot.renewal += 1;
        let r = self.ds.write(
            self.ds.slot_rec(self.owner.host_id),
            &slot.encode(self.ds.uuid()),
        );
        // Without a lease nothing more is written through this datastore handle.
        if self.shared.enforce {
            self.ds.set_write_deadline(Some(Duration::ZERO));
        }
        r
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        // Without `leave`, the slot simply stops being renewed: others see it dead later.
        self.stop_thread();
    }
}

/// A ballot of ours left torn by an earlier incarnation that crashed mid-write would make
/// every other host's Paxos round abort until we run one: blank it now (unreadable, it
/// carried nothing anyone could have adopted).
fn repair_own_ballot(ds: &Datastore, host_id: u32) {
    let rec = ds.superblock().ballot_start + host_id as u64 - 1;
    if let Ok(b) = ds.read(rec) {
        if let Decoded::Unknown(why) = crate::format::Ballot::decode(&b, ds.uuid()) {
            tracing::warn!("our volume-lease ballot was unreadable ({why}); clearing it");
            let _ = ds.write(rec, &crate::format::Ballot::default().encode(ds.uuid()));
        }
    }
}

/// The highest host generation of `host_id` that any lock record, ballot or the
/// volume-lease leader names (0 if none). Refused while a lock record is unreadable: it
/// could name a higher one.
fn highest_generation_named(ds: &Datastore, host_id: u32) -> Result<u64> {
    let mut high = 0;
    let sb = ds.superblock();
    let torn = ds
        .read_many(sb.lock_start, sb.lock_count as u64)?
        .iter()
        .filter(|b| {
            matches!(
                crate::format::LockRecord::decode(b, ds.uuid()),
                Decoded::Unknown(_)
            )
        })
        .count();
    if torn > 0 {
        return Err(Error::Invalid {
            object: ds.path().to_path_buf(),
            detail: format!(
                "slot {host_id} is unreadable and {torn} lock record(s) too: the generation to \
                 take over from is unknown; run `ferry datastore check --repair` first"
            ),
        });
    }
    for b in ds.read_many(sb.ballot_start, sb.max_hosts as u64)? {
        if let Decoded::Valid(b) = crate::format::Ballot::decode(&b, ds.uuid()) {
            if let Some(o) = b.inp.filter(|o| o.host_id == host_id) {
                high = high.max(o.generation);
            }
        }
    }
    for e in crate::locks::list(ds)? {
        for h in e.lock.holders.iter().filter(|h| h.host_id == host_id) {
            high = high.max(h.generation);
        }
    }
    if let Decoded::Valid(l) = crate::format::Leader::decode(&*ds.read(sb.leader_rec)?, ds.uuid()) {
        if l.owner.host_id == host_id {
            high = high.max(l.owner.generation);
        }
    }
    Ok(high)
}

fn renew_loop(ds: &Datastore, sh: &Shared, pet: PetFn) {
    let sb = ds.superblock();
    let clock = ds.clock();
    let mut next = clock.now() + sb.renew_interval();
    while !sh.stop.load(Ordering::SeqCst) {
        let now = clock.now();
        if now < next {
            clock.sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        next = now + sb.renew_interval();
        renew_once(ds, sh, &pet);
        if sh.lost.lock().expect("lease state").is_some() {
            return;
        }
    }
}

/// One renewal: read the slot (it must still be ours), write it with the counter raised.
///
/// A renewal counts (moves `last_good`, the write deadline and the watchdog on) only if
/// its write completed within `io_timeout` of its issue: one that lands later may land
/// after other hosts have seen the slot unchanged for `host_dead`, and must not extend a
/// lease they may already have broken. Its write is refused once the deadline passed.
fn renew_once(ds: &Datastore, sh: &Shared, pet: &PetFn) {
    let sb = ds.superblock();
    let issue = ds.clock().now();
    let since_good = issue.saturating_sub(*sh.last_good.lock().expect("lease state"));
    if sh.enforce && since_good > sb.fence_after() {
        lose(
            ds,
            sh,
            format!("no good renewal for {:.1}s", since_good.as_secs_f64()),
        );
        return;
    }
    let mut slot = sh.slot.lock().expect("lease state").clone();
    match ds.read_slot(slot.host_id) {
        Ok(Decoded::Valid(s)) if s.incarnation == slot.incarnation => {}
        Ok(_) => {
            lose(
                ds,
                sh,
                format!("slot {} was taken over by another host", slot.host_id),
            );
            return;
        }
        Err(e) => {
            tracing::warn!("renewal read failed: {e}");
            return;
        }
    }
    slot.renewal += 1;
    match ds.write(ds.slot_rec(slot.host_id), &slot.encode(ds.uuid())) {
        Ok(()) => {
            let took = ds.clock().now().saturating_sub(issue);
            *sh.slot.lock().expect("lease state") = slot;
            if took > sb.io_timeout() && sh.enforce {
                tracing::warn!(
                    "renewal took {:.1}s (more than io_timeout): not counted",
                    took.as_secs_f64()
                );
                return;
            }
            *sh.last_good.lock().expect("lease state") = issue;
            if sh.enforce {
                ds.set_write_deadline(Some(issue + sb.fence_after()));
            }
            pet(issue);
        }
        Err(e) => tracing::warn!("renewal write failed: {e}"),
    }
}

fn lose(ds: &Datastore, sh: &Shared, why: String) {
    tracing::error!("host lease lost: {why}");
    // Nothing more is written under a lost lease.
    ds.set_write_deadline(Some(Duration::ZERO));
    *sh.lost.lock().expect("lease state") = Some(why);
}
