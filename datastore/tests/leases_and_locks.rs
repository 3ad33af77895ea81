//! Host leases, the volume lease and object locks, several hosts in one process over one
//! image file (test profile: io_timeout 1 s). Fault and multi-process tests are in
//! `tests/tests/cluster.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datastore::clock::{Clock, ManualClock};
use datastore::device::{Device, RecordIo};
use datastore::format::{Block, SlotState};
use datastore::hostlease::HostLease;
use datastore::store::Liveness;
use datastore::{locks, Datastore, Error, LockMode, Observer, Profile};

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("lun.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = Device::open(&p).unwrap();
    Datastore::format(&dev, dev.size(), "t", 8, Profile::Test).unwrap();
    p
}

/// Joins hosts `names` concurrently (each join waits 2 × io_timeout).
fn join_all(path: &Path, names: &[&str]) -> Vec<HostLease> {
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let (p, n) = (path.to_path_buf(), n.to_string());
            std::thread::spawn(move || {
                let ds = Arc::new(Datastore::open(&p).unwrap());
                HostLease::join(ds, &n, "127.0.0.1:1", Box::new(|_| {})).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn lock_modes_handoff_and_racing_third_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let hosts = join_all(&path, &["h1", "h2", "h3"]);
    let ids: Vec<_> = hosts.iter().map(|h| h.owner()).collect();
    assert_eq!(
        ids.iter()
            .map(|o| o.host_id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );
    let ds: Vec<_> = hosts.iter().map(|h| Arc::clone(h.datastore())).collect();
    let mut obs: Vec<_> = ds.iter().map(|d| Observer::new(d)).collect();

    // Exclusive blocks everyone else, and the error names the holder.
    let v1 = locks::try_acquire(&ds[0], ids[0], &mut obs[0], "vm", LockMode::Exclusive).unwrap();
    for (i, mode) in [
        (1, LockMode::Exclusive),
        (2, LockMode::Shared),
        (1, LockMode::MultiWriter),
    ] {
        match locks::try_acquire(&ds[i], ids[i], &mut obs[i], "vm", mode) {
            Err(Error::LockHeld { holders, .. }) => assert!(holders.contains("h1"), "{holders}"),
            other => panic!("{mode:?} by host {i}: {other:?}"),
        }
    }
    // Handoff with the expected version succeeds; a racing third host with the same
    // (now stale) expectation fails cleanly, as does a stale retry.
    // Never to an incarnation the slot does not show (one above it is no host yet).
    let future = datastore::Owner {
        generation: ids[1].generation + 1,
        ..ids[1]
    };
    assert!(matches!(
        locks::handoff(&ds[0], ids[0], &mut obs[0], "vm", future, v1),
        Err(Error::Invalid { .. })
    ));
    let v2 = locks::handoff(&ds[0], ids[0], &mut obs[0], "vm", ids[1], v1).unwrap();
    assert!(v2 > v1);
    assert!(matches!(
        locks::handoff(&ds[2], ids[2], &mut obs[2], "vm", ids[2], v1),
        Err(Error::LockHeld { .. })
    ));
    assert!(matches!(
        locks::handoff(&ds[0], ids[0], &mut obs[0], "vm", ids[2], v1),
        Err(Error::LockHeld { .. })
    ));
    assert!(locks::try_acquire(&ds[0], ids[0], &mut obs[0], "vm", LockMode::Exclusive).is_err());
    locks::release(&ds[1], ids[1], &mut obs[1], "vm").unwrap();
    locks::try_acquire(&ds[2], ids[2], &mut obs[2], "vm", LockMode::Exclusive).unwrap();

    // Shared holders coexist and block exclusive; multi-writers coexist and block shared.
    locks::try_acquire(&ds[0], ids[0], &mut obs[0], "iso", LockMode::Shared).unwrap();
    locks::try_acquire(&ds[1], ids[1], &mut obs[1], "iso", LockMode::Shared).unwrap();
    assert!(locks::try_acquire(&ds[2], ids[2], &mut obs[2], "iso", LockMode::Exclusive).is_err());
    locks::try_acquire(
        &ds[0],
        ids[0],
        &mut obs[0],
        "shared-disk",
        LockMode::MultiWriter,
    )
    .unwrap();
    locks::try_acquire(
        &ds[1],
        ids[1],
        &mut obs[1],
        "shared-disk",
        LockMode::MultiWriter,
    )
    .unwrap();
    assert!(
        locks::try_acquire(&ds[2], ids[2], &mut obs[2], "shared-disk", LockMode::Shared).is_err()
    );

    let listed = locks::list(&ds[0]).unwrap();
    let iso = listed.iter().find(|e| e.lock.object == "iso").unwrap();
    assert_eq!(iso.lock.holders.len(), 2);
    // A host leaves only after releasing its locks (see
    // `leaving_is_refused_while_the_host_holds_a_lock`).
    for h in hosts {
        let d = Arc::clone(h.datastore());
        let me = h.owner();
        let mut o = Observer::new(&d);
        for x in locks::list(&d).unwrap() {
            if x.lock.holders.contains(&me) {
                locks::release(&d, me, &mut o, &x.lock.object).unwrap();
            }
        }
        h.leave().unwrap();
    }
    // After leaving, nothing of the departed hosts is held.
    let late = join_all(&path, &["h4"]);
    let d = Arc::clone(late[0].datastore());
    let mut o = Observer::new(&d);
    locks::try_acquire(&d, late[0].owner(), &mut o, "iso", LockMode::Exclusive).unwrap();
}

#[test]
fn a_second_live_host_with_the_same_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let first = join_all(&path, &["dup"]);
    let ds = Arc::new(Datastore::open(&path).unwrap());
    let started = std::time::Instant::now();
    match HostLease::join(ds, "dup", "", Box::new(|_| {})) {
        Err(Error::Exists { detail, .. }) => assert!(detail.contains("already live"), "{detail}"),
        other => panic!("second join: {other:?}"),
    }
    // Refused as soon as the first one renews, well before host_dead.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    drop(first);
}

#[test]
fn liveness_comes_only_from_the_clock_seam() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let hosts = join_all(&path, &["quiet"]);
    let host_id = hosts[0].owner().host_id;
    drop(hosts); // stops renewing, slot stays joined
    let clock = ManualClock::default();
    let ds = Datastore::open_with(
        Arc::new(Device::open(&path).unwrap()),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let mut obs = Observer::new(&ds);
    let state = |obs: &mut Observer| obs.observe(&ds).unwrap()[host_id as usize - 1].liveness;
    assert_eq!(state(&mut obs), Liveness::Live);
    // Real time passes (as would a wall-clock jump): nothing changes for lease logic.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state(&mut obs), Liveness::Live);
    clock.advance(ds.superblock().host_dead() - Duration::from_millis(1));
    assert_eq!(state(&mut obs), Liveness::Live);
    clock.advance(Duration::from_millis(2));
    assert_eq!(state(&mut obs), Liveness::Dead);
    let _ = clock.now();
}

#[test]
fn damaged_records_read_as_unknown_and_superblock_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let hosts = join_all(&path, &["a"]);
    let me = hosts[0].owner();
    let ds = Arc::clone(hosts[0].datastore());
    let sb = ds.superblock().clone();
    let dev = Device::open(&path).unwrap();
    let flip = |idx: u64, at: usize| {
        let mut b = Block::zeroed();
        dev.read(idx, &mut b).unwrap();
        b.0[at] ^= 0xff;
        dev.write(idx, &b).unwrap();
    };

    // A corrupt heartbeat slot is unknown, never free, and its owner still counts as live.
    flip(sb.hb_start + 5, 100);
    let mut obs = Observer::new(&ds);
    assert_eq!(obs.observe(&ds).unwrap()[5].liveness, Liveness::Unknown);

    // A corrupt lock record may be the object's own: the object counts as held (never a
    // second record for it).
    let mut o = Observer::new(&ds);
    locks::try_acquire(&ds, me, &mut o, "x", LockMode::Exclusive).unwrap();
    let rec = locks::list(&ds)
        .unwrap()
        .iter()
        .find(|e| e.lock.object == "x")
        .unwrap()
        .record;
    flip(rec, 40);
    assert!(locks::list(&ds)
        .unwrap()
        .iter()
        .all(|e| e.lock.object != "x"));
    match locks::try_acquire(&ds, me, &mut o, "x", LockMode::Exclusive) {
        Err(Error::LockHeld { mode, .. }) => assert!(mode.contains("unreadable"), "{mode}"),
        other => panic!("a damaged record was passed over: {other:?}"),
    }
    assert!(locks::list(&ds)
        .unwrap()
        .iter()
        .all(|e| e.lock.object != "x"));

    // A damaged superblock copy is recovered from the other one.
    flip(0, 50);
    let reopened = Datastore::open(&path).unwrap();
    assert_eq!(reopened.superblock(), &sb);
    let mut b = Block::zeroed();
    dev.read(0, &mut b).unwrap();
    assert!(matches!(
        datastore::format::Superblock::decode(&b),
        datastore::format::Decoded::Valid(_)
    ));
    // Both damaged: not a datastore any more, and it says so.
    flip(0, 50);
    flip(1, 50);
    let e = Datastore::open(&path).unwrap_err();
    assert!(e.to_string().contains("not a ferry datastore"), "{e}");
    let _ = SlotState::Free;
    drop(hosts);
}

#[test]
fn volume_lease_is_mutually_exclusive_under_contention() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let hosts = join_all(&path, &["p1", "p2", "p3", "p4"]);
    let inside = Arc::new(AtomicBool::new(false));
    let last_lver = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (ds, me) = (Arc::clone(h.datastore()), h.owner());
            let (inside, last_lver) = (Arc::clone(&inside), Arc::clone(&last_lver));
            std::thread::spawn(move || {
                let mut obs = Observer::new(&ds);
                for _ in 0..25 {
                    let vl = datastore::paxos::VolumeLease::acquire(
                        &ds,
                        me,
                        &mut obs,
                        Duration::from_secs(30),
                    )
                    .unwrap();
                    assert!(
                        !inside.swap(true, Ordering::SeqCst),
                        "two holders of the volume lease"
                    );
                    let prev = last_lver.swap(vl.lver(), Ordering::SeqCst);
                    assert!(
                        vl.lver() > prev,
                        "lease version went from {prev} to {}",
                        vl.lver()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                    inside.store(false, Ordering::SeqCst);
                    vl.release().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(last_lver.load(Ordering::SeqCst) >= 100);
    drop(hosts);
}

/// A joiner that read a slot long ago and was held up writes the generation it computed
/// then over a slot a later incarnation now holds. That late write must not make the
/// current holder's locks breakable; the holder must notice and stop.
#[test]
fn a_late_join_write_never_breaks_the_current_holders_locks() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    // Two incarnations in one slot: generation 2 is the current one.
    let first = join_all(&path, &["a"]).pop().unwrap();
    let slot = first.owner().host_id;
    first.leave().unwrap();
    let holder = join_all(&path, &["a"]).pop().unwrap();
    assert_eq!(holder.owner().host_id, slot);
    assert_eq!(holder.owner().generation, 2);
    let ds = Arc::clone(holder.datastore());
    let mut obs = Observer::new(&ds);
    locks::try_acquire(&ds, holder.owner(), &mut obs, "disk", LockMode::Exclusive).unwrap();

    // The late joiner's write: generation 1 (it read generation 0), another incarnation.
    let late = datastore::format::HostSlot {
        host_id: slot,
        state: SlotState::Joined,
        host_generation: 1,
        incarnation: uuid::Uuid::new_v4(),
        renewal: 0,
        name: "late".into(),
        address: String::new(),
    };
    ds.write(ds.slot_rec(slot), &late.encode(ds.uuid()))
        .unwrap();

    let other = join_all(&path, &["b"]).pop().unwrap();
    let ods = Arc::clone(other.datastore());
    let mut oobs = Observer::new(&ods);
    match locks::try_acquire(&ods, other.owner(), &mut oobs, "disk", LockMode::Exclusive) {
        Err(Error::LockHeld { .. }) => {}
        r => panic!("the holder's lock was breakable after a late join write: {r:?}"),
    }
    // The holder sees the foreign incarnation at its next renewal.
    let start = std::time::Instant::now();
    while holder.check().is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the holder did not notice its slot was overwritten"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_resumed_slot_keeps_its_locks_and_resuming_is_refused_too_late_or_for_another_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut hosts = join_all(&path, &["agent", "other"]);
    let other = hosts.pop().unwrap();
    let first = hosts.pop().unwrap();
    let me = first.owner();
    let incarnation = first.incarnation();
    let last_good = first.last_good();
    let d = Arc::clone(first.datastore());
    let mut obs = Observer::new(&d);
    locks::try_acquire(&d, me, &mut obs, "disk", LockMode::Exclusive).unwrap();
    drop(first); // the process "exits": no leave, the slot stays joined

    // Another incarnation (or a slot that is not ours) cannot be resumed.
    let ds = Arc::new(Datastore::open(&path).unwrap());
    let wrong = HostLease::resume(
        Arc::clone(&ds),
        me.host_id,
        uuid::Uuid::new_v4(),
        "",
        ds.clock().now(),
        Box::new(|_| {}),
    );
    assert!(matches!(wrong, Err(Error::LeaseLost { .. })), "{wrong:?}");
    // Too close to the fencing deadline: refused.
    let late = HostLease::resume(
        Arc::clone(&ds),
        me.host_id,
        incarnation,
        "",
        ds.clock().now() - ds.superblock().fence_after() + Duration::from_millis(500),
        Box::new(|_| {}),
    );
    assert!(matches!(late, Err(Error::LeaseLost { .. })), "{late:?}");
    // In time: same owner, renewing again, and its lock still counts.
    let pets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p2 = Arc::clone(&pets);
    let resumed = HostLease::resume(
        Arc::clone(&ds),
        me.host_id,
        incarnation,
        "10.0.0.9:7700",
        last_good,
        Box::new(move |t| p2.lock().unwrap().push(t)),
    )
    .unwrap();
    assert_eq!(resumed.owner(), me);
    assert!(
        !pets.lock().unwrap().is_empty(),
        "the resuming renewal petted nobody"
    );
    assert!(resumed.last_good() > last_good);
    let od = Arc::clone(other.datastore());
    let mut oobs = Observer::new(&od);
    let r = locks::try_acquire(&od, other.owner(), &mut oobs, "disk", LockMode::Exclusive);
    assert!(matches!(r, Err(Error::LockHeld { .. })), "{r:?}");
    // Renewals continue past host_dead: the other host never sees it dead.
    std::thread::sleep(ds.superblock().host_dead() + Duration::from_secs(1));
    resumed.check().unwrap();
    let v = oobs.observe(&od).unwrap()[me.host_id as usize - 1].clone();
    assert_eq!(v.liveness, Liveness::Live);
    assert_eq!(v.slot.unwrap().address, "10.0.0.9:7700");
    drop(other);
}

/// Regression: the observer once fingerprinted slots by the crc32c of the whole record,
/// which is the same constant for every valid record (each ends with the crc32c of the
/// rest), so a renewing host looked unchanged — and dead after `host_dead` — to anyone
/// who watched it that long, and its locks could be broken while it ran.
#[test]
fn a_renewing_host_stays_live_to_a_long_watching_observer_and_keeps_its_locks() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let hosts = join_all(&path, &["holder", "waiter"]);
    let (h, w) = (&hosts[0], &hosts[1]);
    let hd = Arc::clone(h.datastore());
    locks::try_acquire(
        &hd,
        h.owner(),
        &mut Observer::new(&hd),
        "vm",
        LockMode::Exclusive,
    )
    .unwrap();
    let wd = Arc::clone(w.datastore());
    let mut obs = Observer::new(&wd);
    let until = std::time::Instant::now() + wd.superblock().host_dead() * 3 / 2;
    while std::time::Instant::now() < until {
        let v = obs.observe(&wd).unwrap()[h.owner().host_id as usize - 1].clone();
        assert_eq!(v.liveness, Liveness::Live, "{v:?}");
        assert!(
            v.unchanged_ms <= 2 * wd.superblock().renew_interval().as_millis() as u64 + 1000,
            "{v:?}"
        );
        let r = locks::try_acquire(&wd, w.owner(), &mut obs, "vm", LockMode::Exclusive);
        assert!(matches!(r, Err(Error::LockHeld { .. })), "{r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A torn lock record counts as held (it may be the object's own), and `check --repair`
/// clears it only once no other host is live.
#[test]
fn a_torn_lock_record_is_held_until_repair_clears_it_with_nobody_else_live() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut hosts = join_all(&path, &["a", "b"]);
    let b = hosts.pop().unwrap();
    let a = hosts.pop().unwrap();
    let (da, db) = (Arc::clone(a.datastore()), Arc::clone(b.datastore()));
    let (mut oa, mut ob) = (Observer::new(&da), Observer::new(&db));
    locks::try_acquire(&da, a.owner(), &mut oa, "vm", LockMode::Exclusive).unwrap();
    let rec = locks::list(&da)
        .unwrap()
        .into_iter()
        .find(|e| e.lock.object == "vm")
        .unwrap()
        .record;
    // Tear it: one 512-byte sector of another write.
    let dev = Device::open(&path).unwrap();
    let mut blk = Block::zeroed();
    dev.read(rec, &mut blk).unwrap();
    blk.0[1024..1536].fill(0xAB);
    dev.write(rec, &blk).unwrap();
    match locks::try_acquire(&db, b.owner(), &mut ob, "vm", LockMode::Exclusive) {
        Err(Error::LockHeld { mode, .. }) => assert!(mode.contains("unreadable"), "{mode}"),
        other => panic!("a torn record was taken for a free one: {other:?}"),
    }
    let session = datastore::files::Session::start(Arc::clone(&db), b.owner()).unwrap();
    let report = datastore::check::check(&db).unwrap();
    assert_eq!(report.torn_lock_records, vec![rec]);
    // Host a is live: it may hold what the record held.
    match datastore::check::repair(&session) {
        Err(Error::Invalid { detail, .. }) => assert!(detail.contains("live now: a"), "{detail}"),
        other => panic!("repair cleared a record a live host may hold: {other:?}"),
    }
    // Host a goes away without a word; once it is seen dead, repair clears the record.
    drop(a);
    let r = datastore::check::repair(&session).unwrap();
    assert!(
        r.repaired
            .iter()
            .any(|d| d.contains("cleared 1 unreadable lock record")),
        "{r:?}"
    );
    assert!(r.torn_lock_records.is_empty(), "{r:?}");
    locks::try_acquire(&db, b.owner(), &mut ob, "vm", LockMode::Exclusive).unwrap();
}

/// A superblock whose timings break the safety rules (here a fence margin shorter than
/// io_timeout) is refused at open, naming the rule.
#[test]
fn a_superblock_with_unsafe_timings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let dev = Device::open(&path).unwrap();
    let mut sb = Datastore::open(&path).unwrap().superblock().clone();
    sb.fence_margin_ms = 100;
    for copy in [datastore::format::SUPER_A, datastore::format::SUPER_B] {
        dev.write(copy, &sb.encode(2)).unwrap();
    }
    match Datastore::open(&path) {
        Err(Error::Invalid { detail, .. }) => {
            assert!(detail.contains("safety rule"), "{detail}")
        }
        other => panic!("opened a datastore with unsafe timings: {other:?}"),
    }
}

/// Leaving frees the slot, which invalidates every hold of the host at once: refused while
/// a lock record still names it.
#[test]
fn leaving_is_refused_while_the_host_holds_a_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut hosts = join_all(&path, &["solo"]);
    let h = hosts.pop().unwrap();
    let d = Arc::clone(h.datastore());
    let mut o = Observer::new(&d);
    locks::try_acquire(&d, h.owner(), &mut o, "x", LockMode::Exclusive).unwrap();
    match h.leave() {
        Err(Error::Invalid { detail, .. }) => {
            assert!(detail.contains("release them first"), "{detail}")
        }
        other => panic!("left while holding a lock: {other:?}"),
    }
}
