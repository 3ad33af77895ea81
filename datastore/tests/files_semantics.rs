//! Datastore file semantics between two hosts (each its own handle on one image): lock
//! modes on open, names, folders, rename rules, running out of space.

use std::path::PathBuf;
use std::sync::Arc;

use datastore::files::{self, Session};
use datastore::hostlease::HostLease;
use datastore::{check, Datastore, Error, LockMode, Profile};
use diskfmt::{BlockDev, ErrorKind, Provisioning, WriteFlags};

const MIB: u64 = 1 << 20;

struct Hosts {
    _dir: tempfile::TempDir,
    image: PathBuf,
    hosts: Vec<(HostLease, Arc<Session>)>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (l, _) in self.hosts.drain(..) {
            let _ = l.leave();
        }
    }
}

fn hosts(size: u64, names: &[&str]) -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let dev = datastore::device::Device::open(&image).unwrap();
    Datastore::format(&dev, dev.size(), "sem", 4, Profile::Test).unwrap();
    let joins: Vec<_> = names
        .iter()
        .map(|n| {
            let (image, n) = (image.clone(), n.to_string());
            std::thread::spawn(move || {
                let ds = Arc::new(Datastore::open(&image).unwrap());
                let lease = HostLease::join(Arc::clone(&ds), &n, "", Box::new(|_| {})).unwrap();
                let s = Session::start(ds, lease.owner()).unwrap();
                (lease, s)
            })
        })
        .collect();
    Hosts {
        _dir: dir,
        image,
        hosts: joins.into_iter().map(|j| j.join().unwrap()).collect(),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn held_by(e: Error, who: &str) {
    match e {
        Error::LockHeld {
            holders, object, ..
        } => {
            assert!(holders.contains(who), "{holders}");
            assert!(object.contains(":/"), "the error names the file: {object}");
        }
        e => panic!("expected a lock conflict naming {who}, got {e}"),
    }
}

#[test]
fn exclusive_shared_and_multi_writer_opens_across_hosts() {
    let h = hosts(256 * MIB, &["ha", "hb"]);
    let (a, b) = (&h.hosts[0].1, &h.hosts[1].1);
    rt().block_on(async {
        let f = a
            .create("/disk", 8 * MIB, Provisioning::Thin)
            .await
            .unwrap();
        // Exclusive on one host: no open for write, nor shared, on another.
        held_by(
            b.open("/disk", LockMode::Exclusive).await.unwrap_err(),
            "ha",
        );
        held_by(b.open("/disk", LockMode::Shared).await.unwrap_err(), "ha");
        // Nor a delete or a rename.
        held_by(b.remove("/disk").await.unwrap_err(), "ha");
        held_by(b.rename("/disk", "/other").await.unwrap_err(), "ha");
        f.write(0, &[7u8; 4096], WriteFlags::NONE).await.unwrap();
        f.close().await.unwrap();

        // Shared readers on both hosts; they cannot write; exclusive waits for them.
        let ra = a.open("/disk", LockMode::Shared).await.unwrap();
        let rb = b.open("/disk", LockMode::Shared).await.unwrap();
        let mut buf = [0u8; 4096];
        rb.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, [7u8; 4096]);
        assert!(!rb.writable());
        let e = rb.write(0, &buf, WriteFlags::NONE).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        rb.close().await.unwrap();
        held_by(
            b.open("/disk", LockMode::Exclusive).await.unwrap_err(),
            "ha",
        );
        ra.close().await.unwrap();

        // Multi-writer needs eager-thick (blocks that never move).
        match b.open("/disk", LockMode::MultiWriter).await {
            Err(Error::Invalid { detail, .. }) => {
                assert!(detail.contains("eager-thick"), "{detail}")
            }
            r => panic!("multi-writer on a thin file: {r:?}"),
        }
        a.create("/shared", 4 * MIB, Provisioning::EagerThick)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let wa = a.open("/shared", LockMode::MultiWriter).await.unwrap();
        let wb = b.open("/shared", LockMode::MultiWriter).await.unwrap();
        // No exclusive open next to multi-writers (here: b's own handle refuses it first).
        match b.open("/shared", LockMode::Exclusive).await {
            Err(Error::Invalid { detail, .. }) => {
                assert!(detail.contains("already open on this host"), "{detail}")
            }
            r => panic!("exclusive next to a multi-writer: {r:?}"),
        }
        // Concurrent writers to different ranges, each sees the other's data.
        let (x, y) = (vec![0xaau8; 65536], vec![0xbbu8; 65536]);
        let (r1, r2) = tokio::join!(
            wa.write(MIB, &x, WriteFlags::NONE),
            wb.write(2 * MIB + 512, &y, WriteFlags::NONE)
        );
        r1.unwrap();
        r2.unwrap();
        wa.flush().await.unwrap();
        wb.flush().await.unwrap();
        let mut got = vec![0u8; 65536];
        wa.read(2 * MIB + 512, &mut got).await.unwrap();
        assert_eq!(got, y);
        wb.read(MIB, &mut got).await.unwrap();
        assert_eq!(got, x);
        assert!(
            wa.grow(8 * MIB).await.is_err(),
            "grow needs an exclusive open"
        );
        wa.close().await.unwrap();
        wb.close().await.unwrap();
        // Both hosts' marks were merged: the data reads back, and block status shows it.
        let ro = files::DsFile::open_readonly(&h.image, "/shared").unwrap();
        let ext = ro.block_status(0, 4 * MIB).await.unwrap();
        let data: u64 = ext
            .iter()
            .filter(|e| e.kind == diskfmt::ExtentKind::Data)
            .map(|e| e.length)
            .sum();
        assert_eq!(data, 65536 + 69632, "{ext:?}");
    });
    let ds = Datastore::open(&h.image).unwrap();
    let r = check::check(&ds).unwrap();
    assert!(r.clean(), "{r:#?}");
}

#[test]
fn names_folders_and_renames() {
    let h = hosts(128 * MIB, &["hn"]);
    let s = &h.hosts[0].1;
    rt().block_on(async {
        for bad in ["a//b", "/a/../b", "./a", "/..", &"x".repeat(256), "a\nb"] {
            match s.create(bad, MIB, Provisioning::Thin).await {
                Err(Error::Invalid { detail, .. }) => assert!(detail.contains("path"), "{detail}"),
                r => panic!("{bad:?} was accepted: {r:?}"),
            }
        }
        assert!(matches!(
            s.create("/nofolder/f", MIB, Provisioning::Thin).await,
            Err(Error::NotFound { .. })
        ));
        s.mkdir("/vm1").unwrap();
        assert!(matches!(s.mkdir("/vm1"), Err(Error::Exists { .. })));
        s.mkdir("/vm1/sub").unwrap();
        let name = "ä".repeat(127); // 254 bytes of UTF-8: allowed
        s.create(&format!("/vm1/{name}"), MIB, Provisioning::LazyThick)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        assert!(matches!(
            s.create(&format!("/vm1/{name}"), MIB, Provisioning::Thin)
                .await,
            Err(Error::Exists { .. })
        ));
        assert!(matches!(
            s.create("/vm1/odd", 1000, Provisioning::Thin).await,
            Err(Error::Invalid { .. })
        ));
        // A folder cannot move into itself; a non-empty folder cannot be removed.
        assert!(matches!(
            s.rename("/vm1", "/vm1/sub/x").await,
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(s.remove("/vm1").await, Err(Error::Invalid { .. })));
        s.rename(&format!("/vm1/{name}"), "/vm1/sub/disk")
            .await
            .unwrap();
        s.rename("/vm1", "/vm2").await.unwrap();
        let listed = files::list(s.datastore(), "/vm2/sub").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, "/vm2/sub/disk");
        assert_eq!(listed[0].size, MIB);
        assert_eq!(listed[0].allocated_bytes, MIB);
        s.remove("/vm2/sub/disk").await.unwrap();
        s.remove("/vm2/sub").await.unwrap();
        s.remove("/vm2").await.unwrap();
        assert!(files::list(s.datastore(), "/").unwrap().is_empty());
    });
    let r = check::check(s.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
}

#[test]
fn running_out_of_space_is_a_clean_no_space_error() {
    let h = hosts(96 * MIB, &["hs", "ht"]);
    let (a, b) = (&h.hosts[0].1, &h.hosts[1].1);
    let free = a.space().unwrap().free_blocks;
    rt().block_on(async {
        // A thick file larger than the datastore cannot be created, and leaves nothing.
        let e = a
            .create("/huge", (free + 8) * MIB, Provisioning::LazyThick)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NoSpace { .. }), "{e}");
        assert!(files::list(a.datastore(), "/").unwrap().is_empty());
        assert_eq!(a.space().unwrap().free_blocks, free);
        // A thin file fills up: the write that finds no block gets NoSpace.
        let f = a
            .create("/fill", (free + 8) * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let chunk = vec![0x5au8; MIB as usize];
        let mut written = 0u64;
        let err = loop {
            match f.write(written * MIB, &chunk, WriteFlags::NONE).await {
                Ok(()) => written += 1,
                Err(e) => break e,
            }
            assert!(written <= free, "wrote more blocks than were free");
        };
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{err}");
        f.flush().await.unwrap();
        // Everything written before is intact; the other host cannot allocate either.
        let mut back = vec![0u8; MIB as usize];
        f.read((written - 1) * MIB, &mut back).await.unwrap();
        assert_eq!(back, chunk);
        let g = b
            .create("/small", 4 * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let e = g.write(0, &chunk, WriteFlags::NONE).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        f.close().await.unwrap();
        let r = check::check(a.datastore()).unwrap();
        assert!(r.clean(), "{r:#?}");
        // Deleting frees the space, and the other host can write again.
        a.remove("/fill").await.unwrap();
        g.write(0, &chunk, WriteFlags::FUA).await.unwrap();
        g.close().await.unwrap();
    });
    let r = check::check(a.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
    assert!(r.free_blocks > free / 2, "{r:#?}");
}

/// Space freed is space another write can use: a host's own frees not committed yet are
/// committed when a writer runs short, and the clusters a host frees blocks in are given
/// back (it keeps one with free blocks), so another live host can use them.
#[test]
fn freed_space_is_reachable_by_this_host_and_by_others() {
    let h = hosts(128 * MIB, &["hu", "hv"]);
    let (a, b) = (&h.hosts[0].1, &h.hosts[1].1);
    let bpc = a.datastore().superblock().blocks_per_cluster as u64;
    let free = a.space().unwrap().free_blocks;
    rt().block_on(async {
        let f = a
            .create("/fill", (free + 8) * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let chunk = vec![0x6bu8; MIB as usize];
        let mut written = 0u64;
        while f
            .write(written * MIB, &chunk, WriteFlags::NONE)
            .await
            .is_ok()
        {
            written += 1;
        }
        f.flush().await.unwrap();
        // A discard, then a write, with no flush between: the write gets the block.
        f.discard(0, MIB).await.unwrap();
        f.write(written * MIB, &chunk, WriteFlags::NONE)
            .await
            .expect("a block freed but not committed yet is found by the next writer");
        // Every other block of four clusters' worth freed: the other host can use all of
        // it but at most one cluster's worth.
        let span = (4 * bpc).min(written);
        for i in (1..span).step_by(2) {
            f.discard(i * MIB, MIB).await.unwrap();
        }
        f.flush().await.unwrap();
        let freed = (1..span).step_by(2).count() as u64;
        let g = b
            .create("/other", (freed + 8) * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let mut got = 0u64;
        while g.write(got * MIB, &chunk, WriteFlags::NONE).await.is_ok() {
            got += 1;
        }
        assert!(
            got + bpc + 1 >= freed,
            "the other host wrote {got} of {freed} freed blocks (clusters of {bpc})"
        );
        g.close().await.unwrap();
        f.close().await.unwrap();
    });
    let r = check::check(a.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
}

#[test]
fn check_finds_leaks_and_damage_and_repair_frees_leaks() {
    use datastore::filerec::{ClusterRec, Descriptor};
    use datastore::format::Decoded;
    let h = hosts(128 * MIB, &["hr"]);
    let s = &h.hosts[0].1;
    rt().block_on(async {
        let f = s
            .create("/f", 4 * MIB, Provisioning::LazyThick)
            .await
            .unwrap();
        f.close().await.unwrap();
    });
    let ds = Datastore::open(&h.image).unwrap();
    assert!(check::check(&ds).unwrap().clean());
    let sb = ds.superblock().clone();
    // Leak: mark the last block of the last cluster used in an unowned cluster.
    let c = sb.cluster_count - 1;
    let rec = sb.cluster_start + 2 * c as u64;
    let Decoded::Valid((mut cr, g)) =
        ClusterRec::decode(&ds.read(rec).unwrap(), ds.uuid(), false, c)
    else {
        panic!("cluster record");
    };
    let last = sb.cluster_blocks(c) - 1;
    assert!(!cr.get(last));
    cr.set(last, true);
    ds.write(rec, &cr.encode(ds.uuid(), false, g + 1)).unwrap();
    let r = check::check(&ds).unwrap();
    assert_eq!(
        r.leaked_blocks,
        vec![c as u64 * sb.blocks_per_cluster as u64 + last as u64]
    );
    assert!(r.problems.is_empty(), "{r:#?}");
    let r = check::repair(s).unwrap();
    assert!(r.clean(), "{r:#?}");
    assert_eq!(r.repaired.len(), 1, "{r:#?}");
    // Damage that needs a person: a file whose block is marked free; repair refuses.
    let (d, _) = files::Table::read(&ds).unwrap().get(1).unwrap().clone();
    let Decoded::Valid((d2, g2)) =
        Descriptor::decode(&ds.read(sb.desc_start + 1).unwrap(), ds.uuid())
    else {
        panic!("descriptor");
    };
    assert_eq!(d, d2);
    let mb = d.maps[0].block;
    let (mc, mi) = (
        (mb / sb.blocks_per_cluster as u64) as u32,
        (mb % sb.blocks_per_cluster as u64) as u32,
    );
    let rec = sb.cluster_start + 2 * mc as u64;
    let Decoded::Valid((mut cr, g)) =
        ClusterRec::decode(&ds.read(rec).unwrap(), ds.uuid(), false, mc)
    else {
        panic!("cluster record");
    };
    cr.set(mi, false);
    ds.write(rec, &cr.encode(ds.uuid(), false, g + 1)).unwrap();
    let r = check::check(&ds).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("marked free")),
        "{r:#?}"
    );
    assert!(check::repair(s).is_err());
    let _ = g2;
}

/// Repair needs a consistent cut: it refuses while another host is live (naming it),
/// waits out host_dead for a host that stopped renewing (a crashed one is seen dead, not
/// live), and runs at once when every other slot is free.
#[test]
fn repair_refuses_while_another_host_is_live_and_sees_a_crashed_host_dead() {
    use datastore::hostlease::JoinOptions;
    let h = hosts(128 * MIB, &["hl", "hm"]);
    let (a, b) = (&h.hosts[0].1, &h.hosts[1].1);
    rt().block_on(async {
        let f = a.create("/f", 8 * MIB, Provisioning::Thin).await.unwrap();
        f.write(0, &vec![1u8; MIB as usize], WriteFlags::FUA)
            .await
            .unwrap();
        f.close().await.unwrap();
    });
    let t = std::time::Instant::now();
    let e = check::repair(b).unwrap_err();
    assert!(e.to_string().contains("hl (host "), "{e}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(12),
        "{:?}",
        t.elapsed()
    );
    // A host that joined and stopped renewing (crashed): seen dead after host_dead.
    let ds = Arc::new(Datastore::open(&h.image).unwrap());
    let crashed = HostLease::join_with(
        Arc::clone(&ds),
        "hz",
        "",
        Box::new(|_| {}),
        JoinOptions {
            renewal_thread: false,
            ..JoinOptions::default()
        },
    )
    .unwrap();
    std::mem::forget(crashed);
    let mut h = h;
    let (la, _) = h.hosts.remove(0);
    la.leave().unwrap();
    let b = &h.hosts[0].1;
    let t = std::time::Instant::now();
    let r = check::repair(b).unwrap();
    assert!(r.clean(), "{r:#?}");
    let host_dead = ds.superblock().host_dead();
    assert!(t.elapsed() >= host_dead, "waited {:?}", t.elapsed());
}

/// A pointer record that cannot be read is damage that needs a person: the blocks it
/// maps are not holes, not leaks, and repair never frees them.
#[test]
fn a_damaged_pointer_record_is_damage_not_holes() {
    let h = hosts(128 * MIB, &["hp"]);
    let s = &h.hosts[0].1;
    rt().block_on(async {
        let f = s.create("/f", 8 * MIB, Provisioning::Thin).await.unwrap();
        f.write(0, &vec![0x3cu8; 2 * MIB as usize], WriteFlags::FUA)
            .await
            .unwrap();
        f.close().await.unwrap();
    });
    let ds = Datastore::open(&h.image).unwrap();
    assert!(check::check(&ds).unwrap().clean());
    let (d, _) = files::Table::read(&ds).unwrap().get(1).unwrap().clone();
    let rec = ds.superblock().block_record(d.maps[0].block);
    let mut b = ds.read(rec).unwrap();
    // Bit rot in the first entry's written bits: the record's checksum no longer matches.
    b.0[datastore::filerec::ptr::ENTRIES + 8] ^= 0xff;
    ds.write(rec, &b).unwrap();
    let r = check::check(&ds).unwrap();
    assert!(r.leaked_blocks.is_empty(), "{r:#?}");
    assert!(
        r.problems.iter().any(|p| p.contains("pointer record 0")),
        "{r:#?}"
    );
    assert!(check::repair(s).is_err());
    assert!(files::stat(&ds, "/f").is_err());
}

/// An eager-thick file's new blocks join it only once they are zeroed: a commit of
/// another file during the zeroing, then a crash, must never leave blocks whose unwritten
/// parts show an earlier file's data.
#[test]
fn eager_thick_blocks_join_the_file_only_once_zeroed() {
    let h = hosts(1024 * MIB, &["he"]);
    let s = &h.hosts[0].1;
    rt().block_on(async {
        // Old data in the free blocks.
        let junk = s
            .create("/junk", 640 * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let chunk = vec![0xeeu8; 8 * MIB as usize];
        for i in 0..80 {
            junk.write(i * 8 * MIB, &chunk, WriteFlags::NONE)
                .await
                .unwrap();
        }
        junk.close().await.unwrap();
        s.remove("/junk").await.unwrap();
        let other = s.create("/other", MIB, Provisioning::Thin).await.unwrap();
        let e = std::sync::Arc::new(s.create("/e", MIB, Provisioning::EagerThick).await.unwrap());
        let e2 = std::sync::Arc::clone(&e);
        let grow = tokio::spawn(async move { e2.grow(600 * MIB).await });
        // Commits of another file while the zeroing runs; "crash" (stop the grow) as
        // soon as the committed size shows the new blocks.
        loop {
            other.write(0, &[1u8; 4096], WriteFlags::FUA).await.unwrap();
            let size = files::stat(s.datastore(), "/e").unwrap().size;
            if size > MIB {
                grow.abort();
                break;
            }
            if grow.is_finished() {
                break;
            }
        }
        let _ = grow.await;
        drop(e);
        other.close().await.unwrap();
        // Whatever size it has now, every block of it reads zeros around a small write.
        let e = s.open("/e", LockMode::Exclusive).await.unwrap();
        let size = e.size();
        let mut back = vec![0u8; 4096];
        let mut off = MIB;
        while off < size {
            e.write(off, &[9u8; 512], WriteFlags::NONE).await.unwrap();
            e.read(off, &mut back).await.unwrap();
            assert!(back[..512].iter().all(|&x| x == 9));
            assert!(
                back[512..].iter().all(|&x| x == 0),
                "block at {off} of {size} shows old data after a small write"
            );
            off += 7 * MIB;
        }
        e.close().await.unwrap();
    });
}

#[test]
fn concurrent_first_writes_claim_only_the_space_they_need() {
    // Nearly all of a small datastore, written by many concurrent first writes: one
    // claim serves them all (a claim per writer would run out of clusters and fail).
    let h = hosts(96 * MIB, &["hc"]);
    let s = &h.hosts[0].1;
    let free = s.space().unwrap().free_blocks;
    let n = free - 2; // one map block, one spare
    rt().block_on(async {
        let f = s
            .create("/fresh", n * MIB, Provisioning::Thin)
            .await
            .unwrap();
        let writes: Vec<_> = (0..n)
            .map(|i| {
                let f = &f;
                async move {
                    f.write(i * MIB + 8192, &[i as u8; 4096], WriteFlags::NONE)
                        .await
                }
            })
            .collect();
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        f.close().await.unwrap();
    });
    let r = check::check(s.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
    assert_eq!(r.used_blocks, n + 1);
}

/// A host's own open handle refuses the host too: no remove, rename or second writable
/// open of a file it has open, and two read-only handles keep the lock until both close.
#[test]
fn a_hosts_own_open_handle_refuses_remove_rename_and_a_second_writer() {
    let h = hosts(256 * MIB, &["ha", "hb"]);
    let (a, b) = (&h.hosts[0].1, &h.hosts[1].1);
    rt().block_on(async {
        let f = a
            .create("/disk", 8 * MIB, Provisioning::Thin)
            .await
            .unwrap();
        f.write(0, &[7u8; 4096], WriteFlags::NONE).await.unwrap();
        let open_here = |e: Error| match e {
            Error::Invalid { detail, .. } => {
                assert!(detail.contains("open on this host"), "{detail}")
            }
            e => panic!("expected a refusal naming the open handle, got {e}"),
        };
        // Today the delete succeeds and frees the blocks the handle still writes into.
        open_here(a.remove("/disk").await.unwrap_err());
        open_here(a.rename("/disk", "/moved").await.unwrap_err());
        open_here(a.open("/disk", LockMode::Exclusive).await.unwrap_err());
        open_here(a.open("/disk", LockMode::Shared).await.unwrap_err());
        // The handle still works, and the lock still keeps the other host out.
        f.write(4096, &[8u8; 4096], WriteFlags::NONE).await.unwrap();
        held_by(b.open("/disk", LockMode::Shared).await.unwrap_err(), "ha");
        f.close().await.unwrap();

        // Two read-only handles on one host: closing one keeps the lock.
        let r1 = a.open("/disk", LockMode::Shared).await.unwrap();
        let r2 = a.open("/disk", LockMode::Shared).await.unwrap();
        r1.close().await.unwrap();
        held_by(
            b.open("/disk", LockMode::Exclusive).await.unwrap_err(),
            "ha",
        );
        let mut buf = [0u8; 4096];
        r2.read(4096, &mut buf).await.unwrap();
        assert_eq!(buf, [8u8; 4096]);
        r2.close().await.unwrap();
        b.open("/disk", LockMode::Exclusive)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        a.remove("/disk").await.unwrap();
    });
}

/// I/O fencing on the data path: past the host lease deadline a file write (data and
/// zeroes) is refused with EIO before it is submitted, and nothing of it lands.
#[test]
fn file_writes_past_the_lease_deadline_are_refused() {
    let h = hosts(256 * MIB, &["ha"]);
    let a = &h.hosts[0].1;
    rt().block_on(async {
        let f = a
            .create("/disk", 8 * MIB, Provisioning::Thin)
            .await
            .unwrap();
        f.write(0, &[1u8; 4096], WriteFlags::NONE).await.unwrap();
        f.flush().await.unwrap();
        // The lease's deadline passes (as after a freeze): every write is refused.
        let ds = Arc::clone(a.datastore());
        let kept = ds.write_deadline();
        ds.set_write_deadline(Some(std::time::Duration::ZERO));
        let e = f
            .write(0, &[2u8; 4096], WriteFlags::NONE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(f.write_zeroes(0, 4096, false).await.is_err());
        let e = f
            .write(MIB, &[3u8; 4096], WriteFlags::NONE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        ds.set_write_deadline(kept);
        let mut buf = [0u8; 4096];
        f.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, [1u8; 4096], "a fenced write landed");
        f.read(MIB, &mut buf).await.unwrap();
        assert_eq!(buf, [0u8; 4096], "a fenced write landed");
        f.close().await.unwrap();
    });
}
