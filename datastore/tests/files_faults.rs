//! Datastore files when metadata writes fail: a commit is either done (all of it, now or
//! before anything else changes) or known not to have happened, and memory follows what
//! the disk says, never the other way round.
//!
//! Host "a" writes its records through a device wrapper that fails chosen writes with EIO
//! on command; host "b" has a plain handle on the same image.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use datastore::device::{Device, RecordIo};
use datastore::files::{self, Session};
use datastore::format::Block;
use datastore::hostlease::HostLease;
use datastore::{check, Datastore, LockMode, Profile};
use diskfmt::{BlockDev, Provisioning, WriteFlags};

const MIB: u64 = 1 << 20;

type Pick = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// Record I/O that fails the writes `pick` chooses while armed.
struct Flaky {
    inner: Device,
    armed: AtomicBool,
    pick: Mutex<Pick>,
    /// Once a write failed, reads of the records it picks fail too (a path gone).
    reads_follow: AtomicBool,
    failed_once: AtomicBool,
    /// A failing write lands its first 512 bytes (a torn write) before it fails.
    tear: AtomicBool,
}

impl std::fmt::Debug for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flaky").field("inner", &self.inner).finish()
    }
}

impl Flaky {
    fn fails(&self, idx: u64) -> bool {
        let f = self.armed.load(Ordering::SeqCst) && (self.pick.lock().unwrap())(idx);
        if f {
            self.failed_once.store(true, Ordering::SeqCst);
        }
        f
    }

    fn read_fails(&self, start: u64, n: u64) -> bool {
        self.reads_follow.load(Ordering::SeqCst)
            && self.failed_once.load(Ordering::SeqCst)
            && self.armed.load(Ordering::SeqCst)
            && (start..start + n).any(|i| (self.pick.lock().unwrap())(i))
    }

    fn set(&self, pick: Option<Pick>) {
        match pick {
            Some(p) => {
                *self.pick.lock().unwrap() = p;
                self.armed.store(true, Ordering::SeqCst);
            }
            None => {
                self.armed.store(false, Ordering::SeqCst);
                self.failed_once.store(false, Ordering::SeqCst);
            }
        }
    }
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl RecordIo for Flaky {
    fn read(&self, idx: u64, buf: &mut Block) -> std::io::Result<()> {
        if self.read_fails(idx, 1) {
            return Err(eio());
        }
        self.inner.read(idx, buf)
    }

    fn write(&self, idx: u64, buf: &Block) -> std::io::Result<()> {
        if self.fails(idx) {
            if self.tear.load(Ordering::SeqCst) {
                let mut torn = Block::zeroed();
                self.inner.read(idx, &mut torn)?;
                torn.0[..512].copy_from_slice(&buf.0[..512]);
                self.inner.write(idx, &torn)?;
            }
            return Err(eio());
        }
        self.inner.write(idx, buf)
    }

    fn read_many(&self, start: u64, n: u64) -> std::io::Result<Vec<Box<Block>>> {
        if self.read_fails(start, n) {
            return Err(eio());
        }
        self.inner.read_many(start, n)
    }

    fn write_zeros(&self, start: u64, n: u64) -> std::io::Result<()> {
        self.inner.write_zeros(start, n)
    }

    fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> std::io::Result<()> {
        // Like a device: what comes before the failing record lands.
        for (i, b) in blocks.iter().enumerate() {
            if self.fails(start + i as u64) {
                return Err(eio());
            }
            self.inner.write(start + i as u64, b)?;
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

struct Bed {
    _dir: tempfile::TempDir,
    image: PathBuf,
    flaky: Arc<Flaky>,
    a: (Option<HostLease>, Arc<Session>),
    b: (Option<HostLease>, Arc<Session>),
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.flaky.set(None);
        for l in [self.a.0.take(), self.b.0.take()].into_iter().flatten() {
            let _ = l.leave();
        }
    }
}

fn bed(size: u64) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let dev = Device::open(&image).unwrap();
    Datastore::format(&dev, dev.size(), "faults", 4, Profile::Test).unwrap();
    let flaky = Arc::new(Flaky {
        inner: Device::open(&image).unwrap(),
        armed: AtomicBool::new(false),
        pick: Mutex::new(Box::new(|_| false)),
        reads_follow: AtomicBool::new(false),
        failed_once: AtomicBool::new(false),
        tear: AtomicBool::new(false),
    });
    let join = |ds: Datastore, name: &str| {
        let ds = Arc::new(ds);
        let lease = HostLease::join(Arc::clone(&ds), name, "", Box::new(|_| {})).unwrap();
        let s = Session::start(ds, lease.owner()).unwrap();
        (Some(lease), s)
    };
    let io: Arc<dyn RecordIo> = Arc::clone(&flaky) as Arc<dyn RecordIo>;
    let a = join(
        Datastore::open_with(io, Arc::new(datastore::clock::BootClock)).unwrap(),
        "fa",
    );
    let b = join(Datastore::open(&image).unwrap(), "fb");
    Bed {
        _dir: dir,
        image,
        flaky,
        a,
        b,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Whether record `idx` is a cluster inbox.
fn inbox_rec(ds: &Datastore) -> Pick {
    let sb = ds.superblock();
    let (start, n) = (sb.cluster_start, sb.cluster_count as u64);
    Box::new(move |idx| idx >= start && idx < start + 2 * n && (idx - start) % 2 == 1)
}

async fn fill(f: &files::DsFile, from: u64, blocks: u64, byte: u8) {
    let chunk = vec![byte; MIB as usize];
    for i in from..from + blocks {
        f.write(i * MIB, &chunk, WriteFlags::NONE).await.unwrap();
    }
    f.flush().await.unwrap();
}

/// A free of another host's block goes to that host's inbox. When the commit carrying it
/// lands in the journal but cannot be applied, it is done: finished before anything else
/// changes, and never sent again — a second send after the owner took the block back and
/// reused it would free a block in use.
#[test]
fn a_commit_that_lands_but_cannot_be_applied_is_done_and_never_sent_twice() {
    let bed = bed(512 * MIB);
    let (a, b) = (&bed.a.1, &bed.b.1);
    let bpc = b.datastore().superblock().blocks_per_cluster as u64;
    rt().block_on(async {
        // b writes a file in its own cluster; a opens it and discards its data block.
        let f = b.create("/f", 8 * MIB, Provisioning::Thin).await.unwrap();
        fill(&f, 0, 1, 0x11).await;
        f.close().await.unwrap();
        b.create("/r", MIB, Provisioning::Thin)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let f = a.open("/f", LockMode::Exclusive).await.unwrap();
        f.discard(0, MIB).await.unwrap();
        bed.flaky.set(Some(inbox_rec(a.datastore())));
        let e = f.flush().await.unwrap_err();
        eprintln!("the flush failed as the device did: {e}");
        bed.flaky.set(None);
        // The journal finishes it with a's next change (here: taking a read-only lock,
        // which commits nothing else).
        a.open("/r", LockMode::Shared)
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        // b runs out of its own clusters: it takes the freed block back and reuses it.
        let g = b
            .create("/g", 4 * bpc * MIB, Provisioning::Thin)
            .await
            .unwrap();
        fill(&g, 0, 2 * bpc, 0x22).await;
        // a's next commit must not send the free again ...
        f.flush().await.unwrap();
        f.close().await.unwrap();
        // ... or b's next claim would free the block its file now uses.
        fill(&g, 2 * bpc, 2 * bpc, 0x33).await;
        g.close().await.unwrap();
    });
    let r = check::check(b.datastore()).unwrap();
    assert!(r.problems.is_empty(), "{r:#?}");
    assert!(r.leaked_blocks.is_empty(), "{r:#?}");
}

/// A journal write that fails is read back: not on disk means not committed, and the
/// same changes commit with the next flush. Nothing is lost, nothing is half-done.
#[test]
fn a_journal_write_that_fails_commits_nothing_and_the_next_flush_commits_all() {
    let bed = bed(256 * MIB);
    let a = &bed.a.1;
    let jrec = a.datastore().superblock().journal_rec(a.owner().host_id);
    rt().block_on(async {
        let f = a.create("/f", 16 * MIB, Provisioning::Thin).await.unwrap();
        fill(&f, 0, 2, 0x41).await;
        let chunk = vec![0x42u8; MIB as usize];
        f.write(4 * MIB, &chunk, WriteFlags::NONE).await.unwrap();
        // The header lands, the images do not: a torn journal write.
        bed.flaky
            .set(Some(Box::new(move |idx| idx > jrec && idx < jrec + 300)));
        let r = f.flush().await;
        assert!(
            bed.flaky.failed_once.load(Ordering::SeqCst),
            "the journal write was attempted"
        );
        r.unwrap_err();
        bed.flaky.set(None);
        // Not committed: the committed view still has 2 blocks, also after a crash now
        // (a restarted host replays its journal: the header it finds has images of an
        // earlier transaction behind it, which must not be applied).
        let restarted = Arc::new(Datastore::open(&bed.image).unwrap());
        drop(Session::resume(Arc::clone(&restarted), a.owner()).unwrap());
        let r = check::check(&restarted).unwrap();
        assert!(r.clean(), "{r:#?}");
        let st = files::stat(a.datastore(), "/f").unwrap();
        assert_eq!(st.allocated_bytes, 2 * MIB, "{st:?}");
        f.flush().await.unwrap();
        let st = files::stat(a.datastore(), "/f").unwrap();
        assert_eq!(st.allocated_bytes, 3 * MIB, "{st:?}");
        let mut back = vec![0u8; MIB as usize];
        f.read(4 * MIB, &mut back).await.unwrap();
        assert_eq!(back, chunk);
        f.close().await.unwrap();
    });
    let r = check::check(a.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
}

/// A commit whose outcome cannot be known (the journal write failed and the journal
/// cannot be read back) stops the session: nothing more is changed and no lock is given
/// up. The host's next session settles the journal and finds a consistent datastore.
#[test]
fn a_commit_in_doubt_stops_the_session_and_keeps_its_locks() {
    let bed = bed(256 * MIB);
    let (a, b) = (&bed.a.1, &bed.b.1);
    let jrec = a.datastore().superblock().journal_rec(a.owner().host_id);
    rt().block_on(async {
        let f = a.create("/f", 16 * MIB, Provisioning::Thin).await.unwrap();
        fill(&f, 0, 2, 0x51).await;
        f.discard(0, MIB).await.unwrap();
        f.write(4 * MIB, &vec![0x52u8; MIB as usize], WriteFlags::NONE)
            .await
            .unwrap();
        bed.flaky.reads_follow.store(true, Ordering::SeqCst);
        bed.flaky
            .set(Some(Box::new(move |idx| idx >= jrec && idx < jrec + 300)));
        let e = f.flush().await.unwrap_err();
        eprintln!("{e}");
        // Stopped: the device works again, but this session changes nothing more.
        bed.flaky.set(None);
        let e = f
            .write(8 * MIB, &[7u8; 4096], WriteFlags::NONE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), diskfmt::ErrorKind::Io, "{e}");
        assert!(f.close().await.is_err(), "close gives up no lock");
        let e = a
            .create("/other", MIB, Provisioning::Thin)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
        // b cannot take the file: a still holds it.
        let e = b.open("/f", LockMode::Exclusive).await.unwrap_err();
        assert!(matches!(e, datastore::Error::LockHeld { .. }), "{e}");
        // The host's next session settles it; what was flushed before is there.
        let a2 = Session::resume(Arc::clone(a.datastore()), a.owner()).unwrap();
        let f = a2.open("/f", LockMode::Exclusive).await.unwrap();
        let mut back = vec![0u8; MIB as usize];
        f.read(MIB, &mut back).await.unwrap();
        assert_eq!(back, vec![0x51u8; MIB as usize]);
        f.close().await.unwrap();
        let g = b.open("/f", LockMode::Exclusive).await.unwrap();
        g.close().await.unwrap();
    });
    let r = check::check(b.datastore()).unwrap();
    assert!(r.problems.is_empty(), "{r:#?}");
}

/// Names change through the journal: a descriptor write torn by a failing device is
/// finished by the host's next change, never left unreadable (the file would vanish).
#[test]
fn a_torn_descriptor_write_is_finished_by_the_journal() {
    let bed = bed(128 * MIB);
    let a = &bed.a.1;
    let sb = a.datastore().superblock().clone();
    let descs = sb.desc_start + 1..sb.desc_start + sb.desc_count as u64;
    rt().block_on(async {
        a.mkdir("/keep").unwrap();
        bed.flaky.tear.store(true, Ordering::SeqCst);
        bed.flaky
            .set(Some(Box::new(move |idx| descs.contains(&idx))));
        assert!(a.mkdir("/d").is_err());
        bed.flaky.set(None);
        a.mkdir("/e").unwrap();
    });
    let names: Vec<String> = files::list(a.datastore(), "/")
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect();
    assert_eq!(names, ["/d", "/e", "/keep"]);
    let r = check::check(a.datastore()).unwrap();
    assert!(r.clean(), "{r:#?}");
}
