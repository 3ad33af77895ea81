//! The lease and lock protocol under the deterministic simulator (`sim/`): seeded chaos
//! runs with every fault at once, a fault-free liveness run, and one directed scenario
//! per race found in review. A failing run prints its seed; `FERRY_SIM_SEED=N` replays
//! exactly that run, `FERRY_SIM_SEEDS=N` runs N chaos seeds (CI runs a fixed budget;
//! `FERRY_SOAK=1` runs many more).

mod sim;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use datastore::format::Block;
use datastore::hostlease::{HostLease, JoinOptions};
use datastore::paxos::VolumeLease;
use datastore::{locks, Datastore, Error, LockMode, Observer, Profile};
use sim::{Faults, Hook, World};

/// A record in the data area the workloads write inside their critical sections.
const SCRATCH: u64 = 60_000;
const DEVICE: u64 = 512 << 20;

/// Formats the simulated device (test profile: io_timeout 1 s, host_dead 10 s).
fn format(w: &World, hosts: u32) {
    let io = w.io(0);
    let sb = Datastore::format(io.as_ref(), DEVICE, "sim", hosts, Profile::Test).unwrap();
    w.set_fence_after(sb.fence_after());
}

/// Opens host `h`'s view of the datastore.
fn open(w: &World, h: usize) -> Arc<Datastore> {
    Arc::new(Datastore::open_with(w.io(h), w.clock(h)).expect("open the simulated datastore"))
}

/// Joins as `name` (retrying while the run lasts) and starts a renewer actor.
fn join(w: &World, h: usize, ds: &Arc<Datastore>, name: &str) -> Option<(Arc<HostLease>, Renewer)> {
    let opts = JoinOptions {
        enforce: true,
        renewal_thread: false,
    };
    let lease = loop {
        match HostLease::join_with(Arc::clone(ds), name, "", w.pet(h), opts) {
            Ok(l) => break Arc::new(l),
            Err(e) => {
                w.note(&format!("join failed: {e}"));
                if w.ending() {
                    return None;
                }
                ds.clock().sleep(Duration::from_secs(1));
            }
        }
    };
    w.note(&format!("joined as {:?}", lease.owner()));
    w.count("joins");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let (l2, s2, d2, c2) = (
        Arc::clone(&lease),
        Arc::clone(&stop),
        Arc::clone(&stopped),
        Arc::clone(ds.clock()),
    );
    let every = ds.superblock().renew_interval();
    w.spawn(h, "renewer", move || {
        while !s2.load(Ordering::SeqCst) {
            c2.sleep(every);
            if s2.load(Ordering::SeqCst) || !l2.renew_now() {
                break;
            }
        }
        d2.store(true, Ordering::SeqCst);
    });
    Some((lease, Renewer { stop, stopped }))
}

struct Renewer {
    stop: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

/// Stops the renewer and leaves the datastore cleanly.
fn leave(ds: &Datastore, lease: Arc<HostLease>, r: Renewer) {
    r.stop.store(true, Ordering::SeqCst);
    while !r.stopped.load(Ordering::SeqCst) {
        ds.clock().sleep(Duration::from_millis(100));
    }
    if let Ok(l) = Arc::try_unwrap(lease) {
        let _ = l.leave();
    }
}

fn scratch(w: &World, ds: &Datastore, tag: &str) -> Result<(), Error> {
    let mut b = Block::zeroed();
    b.0[..tag.len()].copy_from_slice(tag.as_bytes());
    let r = ds.write(SCRATCH, &b);
    if let Err(e) = &r {
        w.note(&format!("scratch write refused: {e}"));
    }
    r
}

/// Where object `n`'s value lives: a record its exclusive holder changes only through
/// its journal.
const VALUE: u64 = 60_100;

fn encode_value(v: u64) -> Box<Block> {
    let mut b = Block::zeroed();
    b.0[..8].copy_from_slice(b"FERRYVAL");
    b.0[8..16].copy_from_slice(&v.to_le_bytes());
    let crc = crc32c::crc32c(&b.0[..16]);
    b.0[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Object `n`'s value as read (0: never written; None: unreadable).
fn read_value(ds: &Datastore, n: u64) -> Option<Result<u64, Error>> {
    let b = match ds.read(VALUE + n) {
        Ok(b) => b,
        Err(e) => return Some(Err(e)),
    };
    if b.0.iter().all(|&x| x == 0) {
        return Some(Ok(0));
    }
    let crc = u32::from_le_bytes(b.0[16..20].try_into().unwrap());
    (&b.0[..8] == b"FERRYVAL" && crc == crc32c::crc32c(&b.0[..16]))
        .then(|| Ok(u64::from_le_bytes(b.0[8..16].try_into().unwrap())))
}

/// A lock holder's view of object `n`'s value: whole (every transaction of an earlier
/// holder finished, none torn) and never behind one acknowledged to an earlier holder
/// (no transaction replayed after the lock changed hands).
fn check_value(w: &World, ds: &Datastore, obj: &str, n: u64) -> Option<u64> {
    match read_value(ds, n) {
        None => {
            w.violation(&format!(
                "{obj}: its value record is torn under a new holder"
            ));
            None
        }
        Some(Err(_)) => None, // this host crashed mid-read
        Some(Ok(v)) => {
            let acked = w.acked(obj);
            if v < acked {
                w.violation(&format!(
                    "{obj}: value {v} under a new holder, but {acked} was acknowledged"
                ));
            }
            Some(v)
        }
    }
}

/// The exclusive holder of `obj` adds one to its value through the journal.
fn step_value(w: &World, ds: &Datastore, me: datastore::Owner, obj: &str, n: u64) {
    let Some(v) = check_value(w, ds, obj, n) else {
        return;
    };
    let Ok(seq) = datastore::journal::last_seq(ds, me.host_id) else {
        return;
    };
    match datastore::journal::commit(ds, me, seq + 1, &[(VALUE + n, encode_value(v + 1))]) {
        Ok(()) => {
            w.ack(obj, v + 1);
            w.count("value committed");
        }
        Err(e) => w.note(&format!("{obj}: value commit failed: {e}")),
    }
}

/// One host's workload: join, then `ops` critical sections (the volume lease, or a lock
/// on one of two objects: exclusive, adding one to the object's value through the
/// journal, or shared, reading it), then leave. Rejoins after losing its lease.
fn workload(w: World, h: usize, ops: u32) {
    let ds = open(&w, h);
    let name = format!("host{h}");
    let mut done = 0;
    'rejoin: while done < ops && !w.ending() {
        let Some((lease, renewer)) = join(&w, h, &ds, &name) else {
            return;
        };
        let me = lease.owner();
        let mut obs = Observer::new(&ds);
        while done < ops && !w.ending() {
            if let Err(e) = lease.check() {
                w.note(&format!("lease lost ({e}); rejoining"));
                renewer.stop.store(true, Ordering::SeqCst);
                continue 'rejoin;
            }
            let hold = Duration::from_millis(w.random(1500));
            if w.random(3) == 0 {
                match VolumeLease::acquire(&ds, me, &mut obs, Duration::from_secs(14)) {
                    Ok(vl) => {
                        w.enter("volume-lease");
                        let _ = scratch(&w, &ds, &name);
                        ds.clock().sleep(hold);
                        w.leave("volume-lease");
                        let _ = vl.release();
                        w.count("volume-lease held");
                        done += 1;
                    }
                    Err(e) => {
                        w.note(&format!("volume lease: {e}"));
                        w.count("volume-lease failed");
                    }
                }
            } else {
                let n = w.random(2);
                let obj = format!("obj{n}");
                let mode = if w.random(3) == 0 {
                    LockMode::Shared
                } else {
                    LockMode::Exclusive
                };
                match locks::try_acquire(&ds, me, &mut obs, &obj, mode) {
                    Ok(_) => {
                        if mode == LockMode::Shared {
                            w.enter_shared(&obj);
                            check_value(&w, &ds, &obj, n);
                            ds.clock().sleep(hold);
                        } else {
                            w.enter(&obj);
                            let _ = scratch(&w, &ds, &name);
                            step_value(&w, &ds, me, &obj, n);
                            ds.clock().sleep(hold);
                        }
                        w.leave(&obj);
                        match locks::release(&ds, me, &mut obs, &obj) {
                            Ok(()) => w.count("lock held"),
                            Err(e) => w.note(&format!("release {obj}: {e}")),
                        }
                        done += 1;
                    }
                    Err(Error::LockHeld { .. }) => {
                        w.count("lock busy");
                        ds.clock().sleep(Duration::from_millis(300));
                    }
                    Err(e) => {
                        w.note(&format!("lock {obj}: {e}"));
                        w.count("lock failed");
                    }
                }
            }
        }
        leave(&ds, lease, renewer);
        w.count("left");
        return;
    }
}

fn chaos_run(seed: u64, hosts: usize) -> sim::Report {
    let w = World::new(seed, hosts, Faults::chaos(), Duration::from_secs(240));
    format(&w, hosts as u32 + 1);
    for h in 0..hosts {
        let w2 = w.clone();
        w.on_restart(h, move || workload(w2.clone(), h, 1000));
        let w2 = w.clone();
        w.spawn(h, "host", move || workload(w2, h, 1000));
    }
    w.run(seed)
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("FERRY_SIM_SEED") {
        return vec![s.parse().expect("FERRY_SIM_SEED is a number")];
    }
    let n = std::env::var("FERRY_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var("FERRY_SOAK").is_ok() {
            2000
        } else {
            40
        });
    (1..=n).collect()
}

#[test]
fn chaos_never_breaks_mutual_exclusion() {
    let mut totals = std::collections::BTreeMap::new();
    for seed in seeds() {
        let r = chaos_run(seed, 3);
        r.assert_ok();
        for (k, v) in &r.counters {
            *totals.entry(k.clone()).or_insert(0u64) += v;
        }
        *totals.entry("fenced".into()).or_insert(0) += r.fenced;
        *totals.entry("crashes".into()).or_insert(0) += r.crashes;
    }
    eprintln!("chaos totals: {totals:?}");
    // The runs did real work, and faults really happened.
    assert!(
        totals.get("lock held").copied().unwrap_or(0) > 0,
        "{totals:?}"
    );
    assert!(
        totals.get("volume-lease held").copied().unwrap_or(0) > 0,
        "{totals:?}"
    );
}

#[test]
fn without_faults_every_request_succeeds() {
    for seed in 1..=5 {
        let w = World::new(seed, 3, Faults::none(), Duration::from_secs(600));
        format(&w, 4);
        for h in 0..3 {
            let w2 = w.clone();
            w.spawn(h, "host", move || workload(w2, h, 20));
        }
        let r = w.run(seed);
        r.assert_ok();
        let held = r.counters.get("lock held").copied().unwrap_or(0)
            + r.counters.get("volume-lease held").copied().unwrap_or(0);
        assert_eq!(
            held,
            60,
            "seed {seed}: {:?}\n{}",
            r.counters,
            r.trace.join("\n")
        );
        assert_eq!(r.counters.get("left"), Some(&3), "{:?}", r.counters);
        assert_eq!(
            r.counters.get("volume-lease failed"),
            None,
            "{:?}",
            r.counters
        );
        assert_eq!(r.counters.get("lock failed"), None, "{:?}", r.counters);
    }
}

/// The checker itself can fail: a host that ignores its lease (keeps writing after its
/// deadline and is never fenced) is caught.
#[test]
fn negative_control_the_checker_catches_a_write_past_the_deadline() {
    let w = World::new(1, 1, Faults::none(), Duration::from_secs(60));
    format(&w, 2);
    w.set_fence_delay(0, None);
    let w2 = w.clone();
    w.spawn(0, "host", move || {
        let ds = open(&w2, 0);
        let (lease, _r) = join(&w2, 0, &ds, "h0").unwrap();
        // Stop renewing, and write straight to the device past the deadline.
        _r.stop.store(true, Ordering::SeqCst);
        ds.clock().sleep(Duration::from_secs(20));
        let io = w2.io(0);
        let _ = io.write(SCRATCH, &Block::zeroed());
        drop(lease);
    });
    let r = w.run(1);
    assert!(
        r.violations
            .iter()
            .any(|v| v.contains("after its host's deadline")),
        "{r:?}"
    );
}

#[test]
fn negative_control_the_checker_catches_a_value_rolled_back_under_a_lock() {
    let w = World::new(2, 2, Faults::none(), Duration::from_secs(60));
    format(&w, 2);
    let w0 = w.clone();
    w.spawn(0, "h0", move || {
        let ds = open(&w0, 0);
        let (lease, r) = join(&w0, 0, &ds, "h0").unwrap();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, lease.owner(), &mut obs, "obj0", LockMode::Exclusive).unwrap();
        w0.enter("obj0");
        step_value(&w0, &ds, lease.owner(), "obj0", 0);
        w0.leave("obj0");
        locks::release(&ds, lease.owner(), &mut obs, "obj0").unwrap();
        // An old image of the value lands after the lock was given up.
        w0.io(0).write(VALUE, &encode_value(0)).unwrap();
        leave(&ds, lease, r);
    });
    let w1 = w.clone();
    w.spawn(1, "h1", move || {
        w1.clock(1).sleep(Duration::from_secs(20));
        let ds = open(&w1, 1);
        let (lease, r) = join(&w1, 1, &ds, "h1").unwrap();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, lease.owner(), &mut obs, "obj0", LockMode::Shared).unwrap();
        w1.enter_shared("obj0");
        check_value(&w1, &ds, "obj0", 0);
        w1.leave("obj0");
        let _ = locks::release(&ds, lease.owner(), &mut obs, "obj0");
        leave(&ds, lease, r);
    });
    let r = w.run(2);
    assert!(
        r.violations.iter().any(|v| v.contains("was acknowledged")),
        "{r:?}"
    );
}

/// Item: a delayed joiner must not take a live host's slot. Host 0 observes slot 1 free,
/// then stalls before taking it; host 1 joins slot 1 meanwhile and takes a lock; host 2
/// then tries the lock. Today's join writes a new generation over host 1, and host 2
/// breaks the lock of a live host.
#[test]
fn a_delayed_joiner_never_takes_a_live_hosts_slot() {
    let w = World::new(7, 3, Faults::none(), Duration::from_secs(60));
    format(&w, 3);
    // Host 2 joins first (slot 1), so hosts 0 and 1 both see slot 2 as the free one.
    let w2 = w.clone();
    w.spawn(2, "host", move || {
        let ds = open(&w2, 2);
        let (lease, _r) = join(&w2, 2, &ds, "h2").unwrap();
        let me = lease.owner();
        let mut obs = Observer::new(&ds);
        // Host 1 takes the lock at about 6 s; poll from 6.5 s on.
        ds.clock().sleep(Duration::from_millis(6500));
        for _ in 0..60 {
            if locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive).is_ok() {
                w2.enter("vm");
                let _ = scratch(&w2, &ds, "h2");
                w2.leave("vm");
                return;
            }
            ds.clock().sleep(Duration::from_millis(500));
        }
    });
    let w0 = w.clone();
    w.spawn(0, "host", move || {
        let ds = open(&w0, 0);
        ds.clock().sleep(Duration::from_millis(3500));
        // Stall once, at the first single-slot read: between observing and taking.
        let mut armed = true;
        w0.script(Box::new(move |h| match h {
            Hook::Read { n: 1, start } if armed && (16..19).contains(start) => {
                armed = false;
                Some(Duration::from_secs(4))
            }
            _ => None,
        }));
        let _ = join(&w0, 0, &ds, "h0");
        ds.clock().sleep(Duration::from_secs(20));
    });
    let w1 = w.clone();
    w.spawn(1, "host", move || {
        let ds = open(&w1, 1);
        ds.clock().sleep(Duration::from_millis(4000));
        let (lease, _r) = join(&w1, 1, &ds, "h1").unwrap();
        let me = lease.owner();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive).unwrap();
        w1.enter("vm");
        w1.note("holds vm");
        // Hold it, writing now and then, as a VM does until its host is fenced.
        for _ in 0..20 {
            ds.clock().sleep(Duration::from_secs(1));
            let _ = scratch(&w1, &ds, "h1");
        }
        w1.leave("vm");
        drop(lease);
    });
    w.run(7).assert_ok();
}

/// Record layout of a 3-host simulated datastore (see `Superblock::layout`).
const HB: std::ops::Range<u64> = 16..19;
const LOCK_TABLE: std::ops::Range<u64> = 32..32 + 1024;

/// Host 1 holds a lock and renews normally; host 2 polls for it.
fn holder(w: &World, h: usize, hold: Duration) {
    let ds = open(w, h);
    let (lease, _r) = join(w, h, &ds, &format!("h{h}")).unwrap();
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive).unwrap();
    w.enter("vm");
    let until = w.now() + hold;
    while w.now() < until {
        ds.clock().sleep(Duration::from_millis(700));
        let _ = scratch(w, &ds, "holder");
    }
    w.leave("vm");
}

fn poller(w: &World, h: usize, polls: u32) {
    let ds = open(w, h);
    let (lease, _r) = join(w, h, &ds, &format!("h{h}")).unwrap();
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    for _ in 0..polls {
        if lease.check().is_err() {
            return;
        }
        let r = locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive);
        if let Err(e) = &r {
            w.note(&format!("{e}"));
        }
        if r.is_ok() {
            w.enter("vm");
            let _ = scratch(w, &ds, "poller");
            ds.clock().sleep(Duration::from_secs(5));
            w.leave("vm");
            return;
        }
        ds.clock().sleep(Duration::from_millis(500));
    }
}

/// Item: an observer must not count its own stall as "unchanged" time. The poller is
/// stopped between reading the heartbeat slots and reading the clock, inside a lock
/// attempt; today it then sees the holder's slot unchanged for host_dead and breaks the
/// lock of a host that renewed all along.
#[test]
fn an_observers_own_stall_never_makes_a_live_host_dead() {
    let w = World::new(11, 3, Faults::none(), Duration::from_secs(60));
    format(&w, 3);
    let w1 = w.clone();
    w.spawn(1, "holder", move || holder(&w1, 1, Duration::from_secs(40)));
    let w2 = w.clone();
    w.spawn(2, "poller", move || {
        w2.clock(2).sleep(Duration::from_secs(5));
        // After a lock-table read, the next heartbeat read is the lock update's
        // observation: stall at the clock read that follows it (the 6th time).
        let (mut after_table, mut after_hb, mut seen) = (false, false, 0);
        w2.script(Box::new(move |h| {
            match h {
                Hook::Read { start, .. } if LOCK_TABLE.contains(start) => after_table = true,
                Hook::Read { start, n } if *start == HB.start && *n == 3 && after_table => {
                    after_table = false;
                    after_hb = true;
                }
                Hook::Now if after_hb => {
                    after_hb = false;
                    seen += 1;
                    if seen == 6 {
                        return Some(Duration::from_millis(9500));
                    }
                }
                Hook::Read { .. } => after_hb = false,
                _ => {}
            }
            None
        }));
        poller(&w2, 2, 60);
    });
    w.run(11).assert_ok();
}

/// Item: a renewal that completes late must not extend the lease. The holder's renewer
/// issues a renewal just inside its deadline and the write lands 5 s later, after the
/// poller has seen the slot unchanged for host_dead and taken the lock; today the late
/// renewal still counts and moves the holder's deadline past that moment.
#[test]
fn a_late_renewal_never_extends_the_lease() {
    let w = World::new(13, 3, Faults::none(), Duration::from_secs(60));
    format(&w, 3);
    // The holder's processes do not die when fenced (stuck in uninterruptible I/O):
    // only its own lease bookkeeping keeps it from acting past its deadline.
    w.set_fence_delay(1, None);
    let w1 = w.clone();
    w.spawn(1, "holder", move || {
        // Only the renewer of this host is scripted: it is the next actor spawned.
        holder_with_slow_renewal(&w1, 1);
    });
    let w2 = w.clone();
    w.spawn(2, "poller", move || poller(&w2, 2, 80));
    w.run(13).assert_ok();
}

fn holder_with_slow_renewal(w: &World, h: usize) {
    let ds = open(w, h);
    let opts = JoinOptions {
        enforce: true,
        renewal_thread: false,
    };
    let lease = Arc::new(HostLease::join_with(Arc::clone(&ds), "h1", "", w.pet(h), opts).unwrap());
    let l2 = Arc::clone(&lease);
    let c2 = Arc::clone(ds.clock());
    let w2 = w.clone();
    let every = ds.superblock().renew_interval();
    w.spawn(h, "renewer", move || {
        let (mut sleeps, mut phase) = (0, 0);
        w2.script(Box::new(move |hook| match (hook, phase) {
            (Hook::Sleep, 0) => {
                sleeps += 1;
                if sleeps == 3 {
                    phase = 1;
                }
                None
            }
            // The renewal's issue time is read 5.8 s late ...
            (Hook::Now, 1) => {
                phase = 2;
                Some(Duration::from_millis(5800))
            }
            // ... and its write lands 5 s after it was submitted.
            (Hook::Write { .. }, 2) => {
                phase = 3;
                Some(Duration::from_secs(5))
            }
            _ => None,
        }));
        for _ in 0..10 {
            c2.sleep(every);
            if !l2.renew_now() {
                break;
            }
        }
    });
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive).unwrap();
    w.enter("vm");
    // Holds the lock (without writing), looking at its lease at 12.5 s and 19.5 s: the
    // late renewal lands in between.
    for pause in [10_500, 7_000, 5_000] {
        ds.clock().sleep(Duration::from_millis(pause));
        if lease.check().is_err() {
            break;
        }
    }
    w.leave("vm");
}

/// Item: one holder of the volume lease per process. Two tasks of one host take it
/// concurrently; today the second sees "owner == me" and takes it too.
#[test]
fn two_tasks_of_one_host_never_hold_the_volume_lease_at_once() {
    let w = World::new(17, 1, Faults::none(), Duration::from_secs(60));
    format(&w, 2);
    let w0 = w.clone();
    w.spawn(0, "host", move || {
        let ds = open(&w0, 0);
        let (lease, _r) = join(&w0, 0, &ds, "h0").unwrap();
        let me = lease.owner();
        let done = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for task in 0..2 {
            let (w, ds, done) = (w0.clone(), Arc::clone(&ds), Arc::clone(&done));
            w0.spawn(0, &format!("task{task}-"), move || {
                let mut obs = Observer::new(&ds);
                for _ in 0..10 {
                    let vl = VolumeLease::acquire(&ds, me, &mut obs, Duration::from_secs(14))
                        .expect("volume lease");
                    w.enter("volume-lease");
                    ds.clock().sleep(Duration::from_millis(w.random(300)));
                    w.leave("volume-lease");
                    vl.release().unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        while done.load(Ordering::SeqCst) < 2 {
            ds.clock().sleep(Duration::from_millis(200));
        }
        drop(lease);
    });
    w.run(17).assert_ok();
}

const LEADER: u64 = 19;
const BALLOTS: u64 = 20;

/// An actor of a host that never joins: it sleeps until `at`, then writes `image` (or, if
/// `None`, garbage that no record decodes: a write torn by a crash) to record `idx`.
fn rogue_write(w: &World, h: usize, at: Duration, idx: u64, image: Option<Box<Block>>) {
    let c = w.clock(h);
    let now = w.now();
    c.sleep(at.saturating_sub(now));
    let b = image.unwrap_or_else(|| {
        let mut b = Block::zeroed();
        b.0.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i * 7 + 3) as u8);
        b
    });
    w.io(h).write(idx, &b).unwrap();
    w.note(&format!("rogue write to record {idx}"));
}

/// A host that joins, takes the volume lease once at `at` (holding it 1 s), and then
/// stays joined and idle until `until`.
fn vl_once(w: &World, h: usize, at: Duration, until: Duration, leave_after: bool) {
    let ds = open(w, h);
    let (lease, r) = join(w, h, &ds, &format!("h{h}")).unwrap();
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    ds.clock().sleep(at.saturating_sub(w.now()));
    let vl = VolumeLease::acquire(&ds, me, &mut obs, Duration::from_secs(14)).unwrap();
    w.enter("volume-lease");
    ds.clock().sleep(Duration::from_secs(1));
    w.leave("volume-lease");
    vl.release().unwrap();
    w.note("released the volume lease");
    if leave_after {
        leave(&ds, lease, r);
        return;
    }
    ds.clock().sleep(until.saturating_sub(w.now()));
    drop(r);
}

/// A host that joins and must get the volume lease, starting at `at`, within 30 s.
fn vl_must_get(w: &World, h: usize, at: Duration) {
    let ds = open(w, h);
    let (lease, _r) = join(w, h, &ds, &format!("h{h}")).unwrap();
    let me = lease.owner();
    let mut obs = Observer::new(&ds);
    ds.clock().sleep(at.saturating_sub(w.now()));
    let vl = VolumeLease::acquire(&ds, me, &mut obs, Duration::from_secs(30))
        .expect("the volume lease must be free: every earlier holder released it");
    w.enter("volume-lease");
    w.leave("volume-lease");
    vl.release().unwrap();
    w.count("got it");
}

/// Item: a stale leader write must not wedge the volume lease. Host 0 holds instance 1;
/// a delayed write of that leader record (a helper's, here replayed by a rogue writer)
/// lands after host 1 held and released instance 2. Today every later attempt waits on
/// host 0, which is live but idle, and then on host 1: host 2 never gets the lease.
#[test]
fn a_stale_leader_write_never_wedges_the_volume_lease() {
    let w = World::new(19, 4, Faults::none(), Duration::from_secs(90));
    format(&w, 3);
    let w0 = w.clone();
    w.spawn(0, "a", move || {
        vl_once(
            &w0,
            0,
            Duration::from_secs(3),
            Duration::from_secs(80),
            false,
        )
    });
    let w1 = w.clone();
    w.spawn(1, "c", move || {
        vl_once(
            &w1,
            1,
            Duration::from_secs(6),
            Duration::from_secs(80),
            false,
        )
    });
    let w3 = w.clone();
    w.spawn(3, "rogue", move || {
        // Capture the leader while host 0 holds instance 1, write it back much later.
        let c = w3.clock(3);
        c.sleep(Duration::from_millis(3500));
        let mut b = Block::zeroed();
        w3.io(3).read(LEADER, &mut b).unwrap();
        rogue_write(&w3, 3, Duration::from_secs(12), LEADER, Some(b));
    });
    let w2 = w.clone();
    w.spawn(2, "d", move || vl_must_get(&w2, 2, Duration::from_secs(14)));
    let r = w.run(19);
    r.assert_ok();
    assert_eq!(r.counters.get("got it"), Some(&1), "{}", r.trace.join("\n"));
}

/// Item: a torn leader record (its writer crashed mid-write) must have a way out. Host 0
/// holds and releases the lease; then the leader record reads torn. Today nobody ever
/// sees the lease free again.
#[test]
fn a_torn_leader_record_never_wedges_the_volume_lease() {
    let w = World::new(23, 4, Faults::none(), Duration::from_secs(90));
    format(&w, 3);
    let w0 = w.clone();
    w.spawn(0, "a", move || {
        vl_once(
            &w0,
            0,
            Duration::from_secs(3),
            Duration::from_secs(80),
            false,
        )
    });
    let w3 = w.clone();
    w.spawn(3, "rogue", move || {
        rogue_write(&w3, 3, Duration::from_secs(6), LEADER, None)
    });
    let w2 = w.clone();
    w.spawn(2, "d", move || vl_must_get(&w2, 2, Duration::from_secs(8)));
    let r = w.run(23);
    r.assert_ok();
    assert_eq!(r.counters.get("got it"), Some(&1), "{}", r.trace.join("\n"));
}

/// Item: a torn ballot of a host that is gone must have a way out. Host 0 takes the lease
/// once and leaves; its ballot then reads torn. Today every Paxos round aborts on it.
#[test]
fn a_torn_ballot_of_a_gone_host_never_wedges_the_volume_lease() {
    let w = World::new(29, 4, Faults::none(), Duration::from_secs(90));
    format(&w, 3);
    let w0 = w.clone();
    w.spawn(0, "a", move || {
        vl_once(&w0, 0, Duration::from_secs(3), Duration::ZERO, true)
    });
    let w3 = w.clone();
    // Host 0 joins first: it holds slot 1, ballot record BALLOTS.
    w.spawn(3, "rogue", move || {
        rogue_write(&w3, 3, Duration::from_secs(8), BALLOTS, None)
    });
    let w2 = w.clone();
    w.spawn(2, "d", move || vl_must_get(&w2, 2, Duration::from_secs(10)));
    let r = w.run(29);
    r.assert_ok();
    assert_eq!(r.counters.get("got it"), Some(&1), "{}", r.trace.join("\n"));
}

/// Item: a torn heartbeat slot must not count as live forever. Host 0 takes a lock and
/// crashes; its slot then reads torn. Today host 1 never breaks the lock.
#[test]
fn a_torn_heartbeat_slot_of_a_crashed_host_goes_dead() {
    let w = World::new(31, 4, Faults::none(), Duration::from_secs(90));
    format(&w, 3);
    w.set_fence_delay(0, None);
    let w0 = w.clone();
    w.spawn(0, "holder", move || {
        let ds = open(&w0, 0);
        let (lease, _r) = join(&w0, 0, &ds, "h0").unwrap();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive).unwrap();
        ds.clock().sleep(Duration::from_secs(80));
    });
    let w3 = w.clone();
    w.spawn(3, "rogue", move || {
        w3.clock(3).sleep(Duration::from_secs(5));
        w3.crash_host(0);
        rogue_write(&w3, 3, Duration::from_secs(5), HB.start, None);
    });
    let w1 = w.clone();
    w.spawn(1, "poller", move || {
        w1.clock(1).sleep(Duration::from_secs(1));
        let ds = open(&w1, 1);
        let (lease, _r) = join(&w1, 1, &ds, "h1").unwrap();
        let mut obs = Observer::new(&ds);
        for _ in 0..80 {
            if locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive).is_ok() {
                w1.count("got it");
                return;
            }
            ds.clock().sleep(Duration::from_millis(500));
        }
    });
    let r = w.run(31);
    r.assert_ok();
    assert_eq!(r.counters.get("got it"), Some(&1), "{}", r.trace.join("\n"));
}

/// Item: a dead host's journal is replayed under the same observation that breaks its
/// locks. Host 0 holds "vm" and commits a transaction to a record that lock protects (as
/// the file layer does: its own file's map, without the volume lease), then crashes
/// before applying it. Host 1 takes "vm" while stalled across the moment host 0 turns
/// dead, and rewrites that record: today it recovers with one observation (host 0 still
/// live: not replayed) and breaks the lock with the next (dead), so host 2's later
/// recovery replays host 0's old transaction over host 1's newer data.
#[test]
fn a_dead_hosts_journal_is_replayed_before_its_lock_is_broken() {
    const PROTECTED: u64 = SCRATCH + 1;
    const JOURNALS: u64 = 1056;
    let tagged = |tag: &str| {
        let mut b = Block::zeroed();
        b.0[..tag.len()].copy_from_slice(tag.as_bytes());
        b
    };
    let w = World::new(37, 4, Faults::none(), Duration::from_secs(60));
    format(&w, 3);
    w.set_fence_delay(0, None);
    let w0 = w.clone();
    w.spawn(0, "x", move || {
        let ds = open(&w0, 0);
        let (lease, _r) = join(&w0, 0, &ds, "x").unwrap();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive).unwrap();
        w0.enter("vm");
        // The journal write lands; the in-place write never does (the host crashes).
        w0.script(Box::new(move |h| match h {
            Hook::Write { idx } if *idx == PROTECTED => Some(Duration::from_secs(1000)),
            _ => None,
        }));
        let image = tagged("x-old");
        let _ = datastore::journal::commit(&ds, lease.owner(), 1, &[(PROTECTED, image)]);
    });
    let w3 = w.clone();
    w.spawn(3, "crash", move || {
        w3.clock(3).sleep(Duration::from_secs(5));
        w3.crash_host(0);
    });
    let w1 = w.clone();
    w.spawn(1, "y", move || {
        let ds = open(&w1, 1);
        let (lease, _r) = join(&w1, 1, &ds, "y").unwrap();
        let me = lease.owner();
        let mut obs = Observer::new(&ds);
        while w1.now() < Duration::from_secs(10) {
            obs.observe(&ds).unwrap();
            ds.clock().sleep(Duration::from_secs(1));
        }
        // Stall 6 s at the first read after the volume lease's journal recovery looked at
        // host 0's journal (host 1 reads its own journal too, when it releases the lease).
        let (mut after_journal, mut armed) = (false, true);
        w1.script(Box::new(move |h| match h {
            Hook::Read { start, .. } if *start == JOURNALS => {
                after_journal = true;
                None
            }
            Hook::Read { .. } if armed && after_journal => {
                armed = false;
                Some(Duration::from_secs(6))
            }
            _ => None,
        }));
        for _ in 0..60 {
            if locks::try_acquire(&ds, me, &mut obs, "vm", LockMode::Exclusive).is_ok() {
                w1.enter("vm");
                ds.write(PROTECTED, &tagged("y-new")).unwrap();
                w1.note("wrote y-new");
                ds.clock().sleep(Duration::from_secs(12));
                let now = ds.read(PROTECTED).unwrap();
                assert_eq!(
                    &now.0[..5],
                    b"y-new",
                    "host 0's old transaction was replayed over host 1's write"
                );
                w1.leave("vm");
                return;
            }
            ds.clock().sleep(Duration::from_millis(500));
        }
        panic!("host 1 never got the lock of a dead host");
    });
    let w2 = w.clone();
    w.spawn(2, "z", move || {
        let ds = open(&w2, 2);
        let (lease, _r) = join(&w2, 2, &ds, "z").unwrap();
        let mut obs = Observer::new(&ds);
        // Watch the slots from the start (host 0 is seen dead in time), then take the
        // volume lease once, which finishes the journals of dead hosts.
        while w2.now() < Duration::from_secs(22) {
            obs.observe(&ds).unwrap();
            ds.clock().sleep(Duration::from_secs(1));
        }
        let vl =
            VolumeLease::acquire(&ds, lease.owner(), &mut obs, Duration::from_secs(14)).unwrap();
        vl.release().unwrap();
    });
    w.run(37).assert_ok();
}

/// Item: a torn lock record is never taken for a free one. Host 0 holds "vm"; its record
/// then reads torn. Today host 1's probe skips the unreadable record, finds a blank one
/// after it, creates a second record for "vm" and takes it.
#[test]
fn a_torn_lock_record_is_never_taken_for_a_free_one() {
    let w = World::new(41, 4, Faults::none(), Duration::from_secs(40));
    format(&w, 3);
    let home = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w0 = w.clone();
    let h0 = Arc::clone(&home);
    w.spawn(0, "holder", move || {
        let ds = open(&w0, 0);
        let (lease, _r) = join(&w0, 0, &ds, "h0").unwrap();
        let mut obs = Observer::new(&ds);
        locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive).unwrap();
        let e = locks::list(&ds)
            .unwrap()
            .into_iter()
            .find(|e| e.lock.object == "vm")
            .unwrap();
        h0.store(e.record, Ordering::SeqCst);
        w0.enter("vm");
        ds.clock().sleep(Duration::from_secs(30));
        w0.leave("vm");
    });
    let w3 = w.clone();
    w.spawn(3, "rogue", move || {
        w3.clock(3).sleep(Duration::from_secs(4));
        let idx = home.load(Ordering::SeqCst);
        rogue_write(&w3, 3, Duration::from_secs(4), idx, None);
    });
    let w1 = w.clone();
    w.spawn(1, "taker", move || {
        let ds = open(&w1, 1);
        let (lease, _r) = join(&w1, 1, &ds, "h1").unwrap();
        let mut obs = Observer::new(&ds);
        ds.clock().sleep(Duration::from_secs(6));
        for _ in 0..20 {
            match locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive) {
                Ok(_) => {
                    w1.enter("vm");
                    w1.leave("vm");
                    return;
                }
                Err(e) => w1.note(&format!("{e}")),
            }
            ds.clock().sleep(Duration::from_millis(500));
        }
    });
    w.run(41).assert_ok();
}

/// Item: a lock record torn by a crash has a way out. Host 0 crashes while writing the
/// record of "vm" (holding the volume lease). Once it is dead, host 1 must get "vm", and
/// "vm" must still have exactly one record. Today host 1 skips the torn record and makes
/// a second one for the same object.
#[test]
fn a_lock_record_torn_by_a_crash_is_finished_and_the_lock_taken() {
    let w = World::new(43, 3, Faults::none(), Duration::from_secs(60));
    format(&w, 3);
    let w0 = w.clone();
    w.spawn(0, "x", move || {
        let ds = open(&w0, 0);
        let (lease, _r) = join(&w0, 0, &ds, "x").unwrap();
        let mut obs = Observer::new(&ds);
        ds.clock().sleep(Duration::from_secs(2));
        w0.script(Box::new(|h| match h {
            Hook::Write { idx } if LOCK_TABLE.contains(idx) => Some(Duration::MAX),
            _ => None,
        }));
        let _ = locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive);
    });
    let w1 = w.clone();
    w.spawn(1, "y", move || {
        let ds = open(&w1, 1);
        let (lease, _r) = join(&w1, 1, &ds, "y").unwrap();
        let mut obs = Observer::new(&ds);
        for _ in 0..80 {
            match locks::try_acquire(&ds, lease.owner(), &mut obs, "vm", LockMode::Exclusive) {
                Ok(_) => {
                    let n = locks::list(&ds)
                        .unwrap()
                        .iter()
                        .filter(|e| e.lock.object == "vm")
                        .count();
                    assert_eq!(n, 1, "\"vm\" has {n} lock records");
                    w1.count("got it");
                    return;
                }
                Err(e) => w1.note(&format!("{e}")),
            }
            ds.clock().sleep(Duration::from_millis(500));
        }
    });
    let r = w.run(43);
    r.assert_ok();
    assert_eq!(r.counters.get("got it"), Some(&1), "{}", r.trace.join("\n"));
}
