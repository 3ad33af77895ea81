//! Property tests: raw images (each provisioning) and qcow2 against an in-memory model,
//! on both I/O engines. Random writes (unaligned too), write_zeroes, discards and flushes;
//! after every sequence the image reads back exactly as the model, block status never
//! reports data as zero, and the content survives close and reopen.

use std::path::Path;

use diskfmt::image::CreateSpec;
use diskfmt::{qcow2, BlockDev, Engine, EngineKind, Format, Image, Provisioning, WriteFlags};
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        // Small, unaligned.
        (0..SIZE - 9000, 1..9000u64),
        // Block-aligned, up to 1.5 MiB (crosses engine buffers and clusters).
        (0..SIZE / 4096 - 400, 1..384u64).prop_map(|(b, n)| (b * 4096, n * 4096)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => (range(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (off + i).wrapping_mul(31).wrapping_add(seed as u64) as u8 | 1)
        .collect()
}

async fn apply(dev: &dyn BlockDev, model: &mut [u8], op: &Op) {
    match *op {
        Op::Write { off, len, seed } => {
            let data = fill(seed, off, len);
            dev.write(off, &data, WriteFlags::NONE).await.unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Op::Zero { off, len, unmap } => {
            dev.write_zeroes(off, len, unmap).await.unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard { off, len } => {
            dev.discard(off, len).await.unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Flush => dev.flush().await.unwrap(),
    }
}

async fn verify(dev: &dyn BlockDev, model: &[u8]) {
    let mut buf = vec![0u8; SIZE as usize];
    dev.read(0, &mut buf).await.unwrap();
    if let Some(i) = buf.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{}: first difference at byte {i}", dev.name().display());
    }
    for e in diskfmt::ops::extents(dev).await.unwrap() {
        if e.kind.reads_zero() {
            let r = &model[e.offset as usize..e.end() as usize];
            assert!(
                r.iter().all(|&b| b == 0),
                "{}: {e:?} reported as zero but holds data",
                dev.name().display()
            );
        }
    }
}

fn check(format: Format, provisioning: Provisioning, kind: EngineKind, ops: &[Op]) {
    check_with(format, provisioning, kind, ops, false)
}

fn check_with(
    format: Format,
    provisioning: Provisioning,
    kind: EngineKind,
    ops: &[Op],
    unordered: bool,
) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    rt.block_on(async {
        let engine = Engine::new(kind).unwrap();
        let spec = CreateSpec {
            format,
            size: SIZE,
            provisioning,
            qcow2: qcow2::CreateOptions::default(),
            overwrite: false,
            prefill: true,
        };
        let img = Image::create(&path, &spec, engine.clone()).await.unwrap();
        if let (true, Image::Qcow2(q)) = (unordered, &img) {
            q.enable_unordered_allocation();
        }
        let mut model = vec![0u8; SIZE as usize];
        for op in ops {
            apply(img.dev(), &mut model, op).await;
        }
        verify(img.dev(), &model).await;
        img.close().await.unwrap();
        let img = Image::open(&path, Some(format), false, engine)
            .await
            .unwrap();
        verify(img.dev(), &model).await;
        img.close().await.unwrap();
    });
    drop(dir);
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    }
}

macro_rules! model_test {
    ($name:ident, $fmt:expr, $prov:expr, $engine:expr) => {
        proptest! {
            #![proptest_config(cfg())]
            #[test]
            fn $name(ops in proptest::collection::vec(op(), 1..24)) {
                check($fmt, $prov, $engine, &ops);
            }
        }
    };
}

model_test!(
    raw_thin_uring_matches_model,
    Format::Raw,
    Provisioning::Thin,
    EngineKind::Uring
);
model_test!(
    raw_thin_pread_matches_model,
    Format::Raw,
    Provisioning::Thin,
    EngineKind::Pread
);
model_test!(
    raw_lazy_thick_matches_model,
    Format::Raw,
    Provisioning::LazyThick,
    EngineKind::Uring
);
model_test!(
    raw_eager_thick_matches_model,
    Format::Raw,
    Provisioning::EagerThick,
    EngineKind::Pread
);
model_test!(
    qcow2_thin_uring_matches_model,
    Format::Qcow2,
    Provisioning::Thin,
    EngineKind::Uring
);
model_test!(
    qcow2_thin_pread_matches_model,
    Format::Qcow2,
    Provisioning::Thin,
    EngineKind::Pread
);
model_test!(
    qcow2_lazy_thick_matches_model,
    Format::Qcow2,
    Provisioning::LazyThick,
    EngineKind::Uring
);

proptest! {
    #![proptest_config(cfg())]
    /// The conversion-target write path (clusters mapped before their data is written).
    #[test]
    fn qcow2_unordered_allocation_matches_model(ops in proptest::collection::vec(op(), 1..24)) {
        check_with(Format::Qcow2, Provisioning::Thin, EngineKind::Uring, &ops, true);
    }
}

/// Many concurrent unaligned writes sharing 512-byte blocks: each is a read-modify-write
/// of a block another write also rewrites. Without serialisation some would be lost.
#[test]
fn concurrent_unaligned_writes_in_shared_blocks_are_all_kept() {
    for kind in [EngineKind::Uring, EngineKind::Pread] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        rt.block_on(async {
            let engine = Engine::new(kind).unwrap();
            let img = std::sync::Arc::new(
                diskfmt::raw::RawImage::create(
                    &path,
                    1 << 20,
                    Provisioning::Thin,
                    true,
                    false,
                    engine,
                )
                .await
                .unwrap(),
            );
            let mut tasks = Vec::new();
            for i in 0..200u64 {
                let img = img.clone();
                tasks.push(tokio::spawn(async move {
                    let data = vec![(i % 251) as u8 + 1; 100];
                    img.write(i * 100, &data, WriteFlags::NONE).await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let mut buf = vec![0u8; 20000];
            img.read(0, &mut buf).await.unwrap();
            for i in 0..200usize {
                assert!(
                    buf[i * 100..i * 100 + 100]
                        .iter()
                        .all(|&b| b == (i % 251) as u8 + 1),
                    "{kind:?}: write {i} was lost"
                );
            }
        });
    }
}

/// A read future dropped before its completion must not free memory the kernel writes:
/// the engine keeps the buffer until the completion arrives, and later I/O still works.
#[test]
fn dropped_requests_leave_the_engine_consistent() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("img");
    rt.block_on(async {
        let engine = Engine::new(EngineKind::Uring).unwrap();
        let img = diskfmt::raw::RawImage::create(
            path,
            64 << 20,
            Provisioning::EagerThick,
            true,
            false,
            engine,
        )
        .await
        .unwrap();
        for round in 0..50u64 {
            let mut big = vec![0u8; 8 << 20];
            let fut = img.read(0, &mut big);
            // Poll once (submits requests), then drop it mid-flight.
            let _ = futures_poll_once(fut).await;
            let data = vec![round as u8; 4096];
            img.write(round * 4096, &data, WriteFlags::NONE)
                .await
                .unwrap();
            let mut back = vec![0u8; 4096];
            img.read(round * 4096, &mut back).await.unwrap();
            assert_eq!(back, data);
        }
    });
}

async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// A raw file whose length is not sector-aligned reads as whole sectors (zeros past the
/// end) and refuses writes into its partial last block rather than growing the file.
#[test]
fn odd_length_raw_file_reads_zero_tail_and_refuses_tail_writes() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.raw");
    std::fs::write(&path, vec![7u8; 4096 + 100]).unwrap();
    rt.block_on(async {
        let img =
            diskfmt::raw::RawImage::open(&path, true, Engine::new(EngineKind::Uring).unwrap())
                .unwrap();
        assert_eq!(img.size(), 4096 + 512);
        let mut tail = vec![1u8; 512];
        img.read(4096, &mut tail).await.unwrap();
        assert!(tail[..100].iter().all(|&b| b == 7) && tail[100..].iter().all(|&b| b == 0));
        let e = img
            .write(4096, &[1, 2, 3], WriteFlags::NONE)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), diskfmt::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("odd.raw"), "{e}");
        img.write(0, &[9u8; 10], WriteFlags::NONE).await.unwrap();
        let e = img
            .write(4096 + 512, &[1], WriteFlags::NONE)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");
    });
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096 + 100);
}
