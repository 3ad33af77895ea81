//! The mirror engine against real raw image files: a model-based property test with
//! concurrent guest writes (aligned and unaligned), zeroes, discards and injected target
//! failures during the copy; the frozen-copier rule; thin/thick conversions; target
//! failures and hangs that never fail the guest; cancel.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine, EngineKind, Extent, IoFuture, Provisioning, WriteFlags};
use mirror::{Mirror, Options, Phase};
use proptest::prelude::*;

/// A target wrapper that can fail, hang or count what reaches it.
#[derive(Debug)]
struct Flaky {
    inner: Arc<dyn BlockDev>,
    /// Fail this many of the next writes.
    fail: AtomicU32,
    /// Fail every n-th write (0: never).
    fail_every: AtomicU32,
    writes: AtomicU32,
    /// Hold writes until cleared.
    hang: AtomicBool,
    /// A failing write first applies the first half of its request (a torn failure).
    partial: AtomicBool,
    /// A failing write fails only after this many ms (past a target timeout: late).
    fail_after_ms: AtomicU64,
    /// A mirror whose copier is frozen as each injected failure starts.
    freeze_on_fail: std::sync::OnceLock<Arc<Mirror>>,
    /// Injected failures that have ended (their part landed, their error returned).
    failed: AtomicU32,
    /// The next flush waits for `release_flush`, then fails.
    hold_one_flush: AtomicBool,
    release_flush: AtomicBool,
    /// Every flush takes this many ms longer.
    flush_delay_ms: AtomicU64,
    written_bytes: AtomicU64,
}

impl Flaky {
    fn new(inner: Arc<dyn BlockDev>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner,
            fail: AtomicU32::new(0),
            fail_every: AtomicU32::new(0),
            writes: AtomicU32::new(0),
            hang: AtomicBool::new(false),
            partial: AtomicBool::new(false),
            fail_after_ms: AtomicU64::new(0),
            freeze_on_fail: std::sync::OnceLock::new(),
            failed: AtomicU32::new(0),
            hold_one_flush: AtomicBool::new(false),
            release_flush: AtomicBool::new(false),
            flush_delay_ms: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
        })
    }

    /// Runs a request through the gate; a failing one may land in part, and late.
    async fn request<'a, F>(&'a self, offset: u64, len: u64, apply: F) -> diskfmt::Result<()>
    where
        F: Fn(u64) -> IoFuture<'a, ()>,
    {
        match self.gate(offset).await {
            Ok(()) => apply(len).await,
            Err(e) => {
                if let Some(m) = self.freeze_on_fail.get() {
                    m.freeze_copier(true);
                }
                let late = self.fail_after_ms.load(Ordering::SeqCst);
                if late > 0 {
                    tokio::time::sleep(Duration::from_millis(late)).await;
                }
                let half = (len / 2) & !511;
                if self.partial.load(Ordering::SeqCst) && half > 0 {
                    let _ = apply(half).await;
                }
                self.failed.fetch_add(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    async fn gate(&self, offset: u64) -> diskfmt::Result<()> {
        while self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let every = self.fail_every.load(Ordering::SeqCst);
        let forced = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |f| f.checked_sub(1))
            .is_ok();
        if forced || (every > 0 && n.is_multiple_of(every)) {
            return Err(diskfmt::Error::Io {
                object: "flaky".into(),
                op: "write",
                offset,
                err: std::io::Error::other("injected target failure"),
            });
        }
        Ok(())
    }
}

impl BlockDev for Flaky {
    fn name(&self) -> &Path {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn physical_block_size(&self) -> u32 {
        self.inner.physical_block_size()
    }
    fn writable(&self) -> bool {
        true
    }
    fn provisioning(&self) -> Provisioning {
        self.inner.provisioning()
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.inner.read(offset, buf)
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.request(offset, buf.len() as u64, |n| {
                self.written_bytes.fetch_add(n, Ordering::SeqCst);
                self.inner.write(offset, &buf[..n as usize], flags)
            })
            .await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let delay = self.flush_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if self.hold_one_flush.swap(false, Ordering::SeqCst) {
                while !self.release_flush.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return Err(diskfmt::Error::Io {
                    object: "flaky".into(),
                    op: "flush",
                    offset: 0,
                    err: std::io::Error::other("injected flush failure"),
                });
            }
            self.inner.flush().await
        })
    }
    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.request(offset, length, |n| {
                self.inner.write_zeroes(offset, n, may_unmap)
            })
            .await
        })
    }
    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.request(offset, length, |n| self.inner.discard(offset, n))
                .await
        })
    }
    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        self.inner.block_status(offset, length)
    }
}

fn engine() -> Engine {
    Engine::new(EngineKind::Pread).unwrap()
}

async fn raw(dir: &Path, name: &str, size: u64, p: Provisioning) -> Arc<RawImage> {
    Arc::new(
        RawImage::create(&dir.join(name), size, p, true, false, engine())
            .await
            .unwrap(),
    )
}

async fn read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        dev.read(i as u64 * (1 << 20), c).await.unwrap();
    }
    v
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (off + i).wrapping_mul(131).wrapping_add(seed as u64) as u8 | 1)
        .collect()
}

fn small_opts() -> Options {
    Options {
        grain: 64 << 10,
        chunk: 256 << 10,
        in_flight: 4,
        speed: Some(32 << 20),
        target_timeout: Duration::from_secs(5),
        max_retries: 1000,
        target_zeroed: true,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    Pause,
}

const SIZE: u64 = 8 << 20;

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..SIZE - 70_000, 1..70_000u64),
        (0..SIZE / 512 - 600, 1..512u64).prop_map(|(b, n)| (b * 512, n * 512)),
        (0..SIZE / 65536 - 8, 1..8u64).prop_map(|(b, n)| (b * 65536, n * 65536)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (range(), any::<u8>(), any::<bool>())
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed, fua }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Pause),
    ]
}

/// Applies a batch concurrently through the mirror (arrival order = batch order) and to
/// the model in the same order.
async fn run_batch(dev: &Arc<Mirror>, model: &mut [u8], batch: &[Op]) {
    let mut futs = Vec::new();
    for op in batch {
        let dev = Arc::clone(dev);
        match op.clone() {
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let data = fill(seed, off, len);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                let f = if fua {
                    WriteFlags::FUA
                } else {
                    WriteFlags::NONE
                };
                futs.push(Box::pin(async move { dev.write(off, &data, f).await })
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>);
            }
            Op::Zero { off, len, unmap } => {
                model[off as usize..(off + len) as usize].fill(0);
                futs.push(Box::pin(
                    async move { dev.write_zeroes(off, len, unmap).await },
                ));
            }
            Op::Discard { off, len } => {
                model[off as usize..(off + len) as usize].fill(0);
                futs.push(Box::pin(async move { dev.discard(off, len).await }));
            }
            Op::Flush => futs.push(Box::pin(async move { dev.flush().await })),
            Op::Pause => futs.push(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(())
            })),
        }
    }
    for r in futures::future::join_all(futs).await {
        r.expect("a guest request through the mirror failed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Random concurrent guest I/O during the copy, with every 7th (or so) target write
    /// failing, some after applying half of their request: after the pivot, target ==
    /// source == model.
    #[test]
    fn after_complete_the_target_equals_the_source(
        prefill in proptest::collection::vec((0..SIZE / 65536, 1..6u64, any::<u8>()), 0..12),
        batches in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..14),
        fail_every in prop_oneof![Just(0u32), 5..15u32],
        torn_failures in any::<bool>(),
        target_thin in any::<bool>(),
    ) {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
            let tp = if target_thin { Provisioning::Thin } else { Provisioning::LazyThick };
            let tgt = raw(dir.path(), "tgt", SIZE, tp).await;
            let mut model = vec![0u8; SIZE as usize];
            for (b, n, seed) in prefill {
                let off = b * 65536;
                let len = (n * 65536).min(SIZE - off) - 777;
                let data = fill(seed, off, len);
                src.write(off, &data, WriteFlags::NONE).await.unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            let flaky = Flaky::new(tgt.clone());
            flaky.fail_every.store(fail_every, Ordering::SeqCst);
            flaky.partial.store(torn_failures, Ordering::SeqCst);
            let m = Mirror::start(src.clone(), flaky.clone(), small_opts()).unwrap();
            for b in &batches {
                run_batch(&m, &mut model, b).await;
            }
            flaky.fail_every.store(0, Ordering::SeqCst);
            tokio::time::timeout(Duration::from_secs(60), m.wait_ready()).await.unwrap().unwrap();
            let p = m.prepare_pivot(Duration::from_secs(10)).await.unwrap();
            p.commit().unwrap();
            assert_eq!(m.phase(), Phase::Done);
            let s = read_all(&*src).await;
            let t = read_all(&*tgt).await;
            assert!(s == model, "the source differs from the model");
            assert_eq!(blake3::hash(&t), blake3::hash(&s), "target != source");
            // After the pivot the mirror serves the target.
            run_batch(&m, &mut model, &[Op::Write { off: 4096, len: 8192, seed: 9, fua: false }]).await;
            assert_eq!(read_all(&*tgt).await, model);
        });
    }
}

#[test]
fn with_the_copier_frozen_after_ready_every_acknowledged_write_is_on_the_target() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        src.write(0, &fill(1, 0, 3 << 20), WriteFlags::NONE)
            .await
            .unwrap();
        let m = Mirror::start(src.clone(), tgt.clone(), small_opts()).unwrap();
        m.wait_ready().await.unwrap();
        m.freeze_copier(true);
        for i in 0..64u64 {
            let off = (i * 130_001) % (SIZE - 5000);
            let data = fill(i as u8, off, 4000 + i);
            m.write(off, &data, WriteFlags::NONE).await.unwrap();
            // Acknowledged: already on the target, with nothing left for the copier.
            let mut back = vec![0u8; data.len()];
            tgt.read(off, &mut back).await.unwrap();
            assert_eq!(back, data, "write {i} at {off} is not on the target");
        }
        m.write_zeroes(0, 1 << 20, true).await.unwrap();
        let mut back = vec![1u8; 1 << 20];
        tgt.read(0, &mut back).await.unwrap();
        assert!(back.iter().all(|b| *b == 0));
        assert_eq!(m.progress().dirty_bytes, 0);
        assert_eq!(read_all(&*src).await, read_all(&*tgt).await);
        m.cancel().await;
    });
}

async fn convert(from: Provisioning, to: Provisioning, data: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 << 20;
    let src = raw(dir.path(), "src", size, from).await;
    let tgt = raw(dir.path(), "tgt", size, to).await;
    // Data scattered over the disk, some of it written zeros.
    for i in 0..data / (256 << 10) {
        let off = i * (size / (data / (256 << 10)));
        src.write(off, &fill(i as u8, off, 256 << 10), WriteFlags::NONE)
            .await
            .unwrap();
    }
    src.write(size - (1 << 20), &vec![0u8; 1 << 20], WriteFlags::NONE)
        .await
        .unwrap();
    let mut o = small_opts();
    o.speed = None;
    let m = Mirror::start(src.clone(), tgt.clone(), o).unwrap();
    m.wait_ready().await.unwrap();
    m.prepare_pivot(Duration::from_secs(5))
        .await
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(read_all(&*src).await, read_all(&*tgt).await);
    (
        src.allocated_bytes().unwrap(),
        tgt.allocated_bytes().unwrap(),
    )
}

#[test]
fn thin_stays_thin_and_thick_targets_end_fully_allocated() {
    runtime().block_on(async {
        let size = 64u64 << 20;
        let (s, t) = convert(Provisioning::Thin, Provisioning::Thin, 4 << 20).await;
        assert!(t as f64 <= 1.05 * s as f64, "thin→thin: {t} > 1.05 × {s}");
        let (_, t) = convert(Provisioning::Thin, Provisioning::EagerThick, 4 << 20).await;
        assert!(t >= size, "thin→eager: {t} < {size}");
        let (_, t) = convert(Provisioning::Thin, Provisioning::LazyThick, 4 << 20).await;
        assert!(t >= size, "thin→lazy: {t} < {size}");
        // Thick → thin: only the data (not the zeros) is allocated on the target.
        let (s, t) = convert(Provisioning::EagerThick, Provisioning::Thin, 4 << 20).await;
        assert!(s >= size);
        assert!(
            t <= (4 << 20) + (1 << 20),
            "eager→thin: {t} bytes allocated"
        );
    });
}

#[test]
fn a_failing_target_never_fails_the_guest_and_fails_the_job_after_its_retries() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let flaky = Flaky::new(tgt.clone());
        let mut o = small_opts();
        o.max_retries = 3;
        let m = Mirror::start(src.clone(), flaky.clone(), o).unwrap();
        m.wait_ready().await.unwrap();
        flaky.fail.store(u32::MAX, Ordering::SeqCst);
        let mut model = vec![0u8; SIZE as usize];
        for i in 0..40u64 {
            let off = i * 200_000;
            let data = fill(3, off, 10_000);
            m.write(off, &data, WriteFlags::NONE).await.unwrap();
            model[off as usize..off as usize + 10_000].copy_from_slice(&data);
        }
        m.flush().await.unwrap();
        let p = tokio::time::timeout(Duration::from_secs(20), m.ended())
            .await
            .unwrap();
        assert!(
            matches!(p, Phase::Failed(ref e) if e.contains("source stays")),
            "{p:?}"
        );
        // The guest keeps going on the source.
        m.write(0, &fill(4, 0, 512), WriteFlags::NONE)
            .await
            .unwrap();
        model[..512].copy_from_slice(&fill(4, 0, 512));
        assert_eq!(read_all(&*src).await, model);
        assert!(m.prepare_pivot(Duration::from_secs(1)).await.is_err());
        m.finish().await;
    });
}

/// A bulk copy that fails after writing part of its range (at once, or late after the
/// target timeout) leaves those blocks written on the target: zeroing them afterwards
/// through the guest must still reach the target before the pivot.
#[test]
fn a_copy_that_fails_half_written_never_leaves_stale_data_on_the_target() {
    for late in [false, true] {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
            let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
            src.write(0, &fill(8, 0, 256 << 10), WriteFlags::NONE)
                .await
                .unwrap();
            let flaky = Flaky::new(tgt.clone());
            flaky.hang.store(true, Ordering::SeqCst);
            flaky.fail.store(1, Ordering::SeqCst);
            flaky.partial.store(true, Ordering::SeqCst);
            let mut o = small_opts();
            if late {
                o.target_timeout = Duration::from_millis(200);
                flaky.fail_after_ms.store(600, Ordering::SeqCst);
            }
            let m = Mirror::start(src.clone(), flaky.clone(), o).unwrap();
            // Freeze the copier the moment the first copy starts failing (half of it lands).
            flaky.freeze_on_fail.set(Arc::clone(&m)).unwrap();
            flaky.hang.store(false, Ordering::SeqCst);
            let t0 = Instant::now();
            while m.progress().target_errors == 0 || flaky.failed.load(Ordering::SeqCst) == 0 {
                assert!(t0.elapsed() < Duration::from_secs(10), "no copy failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The guest zeroes the range while it is still dirty: the source only.
            m.write_zeroes(0, 256 << 10, false).await.unwrap();
            m.freeze_copier(false);
            tokio::time::timeout(Duration::from_secs(10), m.wait_ready())
                .await
                .unwrap()
                .unwrap();
            m.prepare_pivot(Duration::from_secs(5))
                .await
                .unwrap()
                .commit()
                .unwrap();
            let (s, t) = (read_all(&*src).await, read_all(&*tgt).await);
            assert!(s.iter().all(|b| *b == 0));
            assert!(
                t == s,
                "late={late}: the target kept stale data at {:?}",
                t.iter().position(|b| *b != 0)
            );
        });
    }
}

/// A guest flush sent just before the pivot's hold fails during it, with the job at its
/// error limit: the job must stay completing, so a guest write arriving meanwhile waits
/// for the pivot and lands on the new disk. (It went to the source only and was
/// acknowledged; the commit then switched to a target without it.)
#[test]
fn a_failure_while_the_pivot_holds_io_never_reroutes_an_acknowledged_write() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let flaky = Flaky::new(tgt.clone());
        let mut o = small_opts();
        o.max_retries = 0;
        let m = Mirror::start(src.clone(), flaky.clone(), o).unwrap();
        m.wait_ready().await.unwrap();
        flaky.hold_one_flush.store(true, Ordering::SeqCst);
        let m2 = Arc::clone(&m);
        let guest_flush = tokio::spawn(async move { m2.flush().await });
        while flaky.hold_one_flush.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let p = m.prepare_pivot(Duration::from_secs(5)).await.unwrap();
        flaky.release_flush.store(true, Ordering::SeqCst);
        let _ = guest_flush.await.unwrap();
        assert_eq!(
            m.phase(),
            Phase::Completing,
            "the failure changed the routing"
        );
        let data = fill(3, 8192, 4096);
        let m3 = Arc::clone(&m);
        let d2 = data.clone();
        let write = tokio::spawn(async move { m3.write(8192, &d2, WriteFlags::NONE).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = p.commit();
        write.await.unwrap().unwrap();
        assert_eq!(m.phase(), Phase::Done);
        let mut back = vec![0u8; data.len()];
        tgt.read(8192, &mut back).await.unwrap();
        assert!(back == data, "an acknowledged write is not on the new disk");
    });
}

/// Disks that switch together are held together: each is held for the slowest disk's
/// final flush, not for the sum of every disk's (a second disk's wait and flush used to
/// extend the first disk's hold).
#[test]
fn disks_that_pivot_together_are_held_for_the_slowest_not_the_sum() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut mirrors = Vec::new();
        for i in 0..3 {
            let src = raw(dir.path(), &format!("src{i}"), SIZE, Provisioning::Thin).await;
            let tgt = raw(dir.path(), &format!("tgt{i}"), SIZE, Provisioning::Thin).await;
            let flaky = Flaky::new(tgt);
            flaky.flush_delay_ms.store(400, Ordering::SeqCst);
            mirrors.push(Mirror::start(src, flaky, small_opts()).unwrap());
        }
        let t = std::time::Instant::now();
        let pivots = mirror::prepare_pivots(&mirrors, Duration::from_secs(10))
            .await
            .unwrap();
        let held = t.elapsed();
        for p in pivots {
            p.commit().unwrap();
        }
        // Three flushes of 400 ms each: about 400 ms together, 1.2 s one after another.
        assert!(held < Duration::from_millis(1000), "held {held:?}");
        for m in &mirrors {
            assert_eq!(m.phase(), Phase::Done);
        }
    });
}

/// One disk of several that cannot be prepared: none pivots, every one is back to Ready.
#[test]
fn a_failed_disk_in_a_joint_pivot_leaves_every_disk_on_its_source() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut mirrors = Vec::new();
        let mut flakies = Vec::new();
        for i in 0..2 {
            let src = raw(dir.path(), &format!("src{i}"), SIZE, Provisioning::Thin).await;
            let tgt = raw(dir.path(), &format!("tgt{i}"), SIZE, Provisioning::Thin).await;
            let flaky = Flaky::new(tgt);
            flakies.push(flaky.clone());
            mirrors.push(Mirror::start(src, flaky, small_opts()).unwrap());
        }
        for m in &mirrors {
            m.wait_ready().await.unwrap();
        }
        // The second disk's final flush fails.
        flakies[1].hold_one_flush.store(true, Ordering::SeqCst);
        flakies[1].release_flush.store(true, Ordering::SeqCst);
        assert!(mirror::prepare_pivots(&mirrors, Duration::from_secs(5))
            .await
            .is_err());
        for m in &mirrors {
            assert_eq!(m.phase(), Phase::Ready);
        }
    });
}

/// A guest write to a region the bulk copy is working on goes to the source at once:
/// it never waits for the copy, whose target write may hang until the target timeout
/// (and the copies after it, each as long).
#[test]
fn a_hung_copy_never_holds_up_a_guest_write_to_its_region() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        src.write(0, &fill(1, 0, 4 << 20), WriteFlags::NONE)
            .await
            .unwrap();
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let flaky = Flaky::new(tgt.clone());
        flaky.hang.store(true, Ordering::SeqCst);
        let m = Mirror::start(src.clone(), flaky.clone(), small_opts()).unwrap();
        // The first copies are sent and hang on the target.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let data = fill(2, 4096, 4096);
        let t = std::time::Instant::now();
        m.write(4096, &data, WriteFlags::FUA).await.unwrap();
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(1000),
            "a guest write waited {took:?} behind a hung copy"
        );
        let mut back = vec![0u8; 4096];
        src.read(4096, &mut back).await.unwrap();
        assert_eq!(back, data);
        // The target comes back: the mirror converges with the write on both sides.
        flaky.hang.store(false, Ordering::SeqCst);
        m.wait_ready().await.unwrap();
        let p = m.prepare_pivot(Duration::from_secs(10)).await.unwrap();
        p.commit().unwrap();
        tgt.read(4096, &mut back).await.unwrap();
        assert_eq!(back, data, "the write is not on the target after the pivot");
        assert_eq!(read_all(&*src).await, read_all(&*tgt).await);
    });
}

/// A cancelled job's pivot is refused: routing stays on the source.
#[test]
fn a_pivot_of_a_cancelled_mirror_is_refused() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let m = Mirror::start(src.clone(), tgt.clone(), small_opts()).unwrap();
        m.wait_ready().await.unwrap();
        let p = m.prepare_pivot(Duration::from_secs(5)).await.unwrap();
        let m2 = Arc::clone(&m);
        let cancel = tokio::spawn(async move { m2.cancel().await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(p.commit().is_err());
        cancel.await.unwrap();
        assert_eq!(m.phase(), Phase::Cancelled);
    });
}

/// Target failures fail the job only in a row: flush failures far apart, with target
/// requests answered between them, never fail an in-sync mirror (they added up for
/// the job's whole life).
#[test]
fn target_failures_far_apart_never_fail_a_mirror() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let flaky = Flaky::new(tgt.clone());
        flaky.release_flush.store(true, Ordering::SeqCst);
        let mut o = small_opts();
        o.max_retries = 1;
        let m = Mirror::start(src.clone(), flaky.clone(), o).unwrap();
        m.wait_ready().await.unwrap();
        for i in 0..4u64 {
            flaky.hold_one_flush.store(true, Ordering::SeqCst);
            m.flush().await.unwrap();
            m.write(i * 65536, &fill(4, i * 65536, 4096), WriteFlags::NONE)
                .await
                .unwrap();
            m.flush().await.unwrap();
        }
        assert_eq!(m.phase(), Phase::Ready, "{:?}", m.progress());
        assert_eq!(m.progress().target_errors, 4);
        m.cancel().await;
    });
}

#[test]
fn a_hung_target_write_times_out_without_failing_the_guest_and_is_resent_after_it_ends() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        let flaky = Flaky::new(tgt.clone());
        let mut o = small_opts();
        o.target_timeout = Duration::from_millis(300);
        let m = Mirror::start(src.clone(), flaky.clone(), o).unwrap();
        m.wait_ready().await.unwrap();
        flaky.hang.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        m.write(65536, &fill(5, 65536, 4096), WriteFlags::NONE)
            .await
            .unwrap();
        let waited = t0.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "the guest waited {waited:?}"
        );
        assert!(m.progress().dirty_bytes > 0);
        // A second write to the same range goes to the source only (the range is dirty).
        m.write(65536 + 512, &fill(6, 65536 + 512, 512), WriteFlags::NONE)
            .await
            .unwrap();
        flaky.hang.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), m.wait_ready())
            .await
            .unwrap()
            .unwrap();
        m.prepare_pivot(Duration::from_secs(5))
            .await
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(read_all(&*src).await, read_all(&*tgt).await);
        assert!(m.progress().target_errors >= 1);
    });
}

#[test]
fn cancel_leaves_the_source_authoritative() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let tgt = raw(dir.path(), "tgt", SIZE, Provisioning::Thin).await;
        src.write(0, &fill(7, 0, SIZE), WriteFlags::NONE)
            .await
            .unwrap();
        let mut o = small_opts();
        o.speed = Some(4 << 20);
        let m = Mirror::start(src.clone(), tgt.clone(), o).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = m.progress();
        assert_eq!(p.phase, "copying");
        assert!(p.done_bytes > 0 && p.done_bytes < SIZE, "{p:?}");
        m.cancel().await;
        assert_eq!(m.phase(), Phase::Cancelled);
        m.write(0, &fill(8, 0, 4096), WriteFlags::NONE)
            .await
            .unwrap();
        let mut b = vec![0u8; 4096];
        src.read(0, &mut b).await.unwrap();
        assert_eq!(b, fill(8, 0, 4096));
        tgt.read(0, &mut b).await.unwrap();
        assert_ne!(b, fill(8, 0, 4096));
        assert!(m.prepare_pivot(Duration::from_secs(1)).await.is_err());
    });
}

#[test]
fn mismatched_sizes_and_a_read_only_target_are_refused() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let src = raw(dir.path(), "src", SIZE, Provisioning::Thin).await;
        let small = raw(dir.path(), "small", SIZE / 2, Provisioning::Thin).await;
        let e = Mirror::start(src.clone(), small, small_opts()).unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
        let ro = Arc::new(RawImage::open(&dir.path().join("src"), false, engine()).unwrap());
        let e = Mirror::start(src.clone(), ro, small_opts()).unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    });
}
