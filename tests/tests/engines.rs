//! The io_uring and pread engines give identical results for the same operation
//! sequence, on a regular file and on loop devices (512 B and 4 KiB sectors) with
//! direct I/O.

use std::path::Path;

use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine, EngineKind, WriteFlags};
use ferry_tests::{pattern, LoopDev};

const SIZE: u64 = 16 << 20;

/// Runs a fixed, mixed sequence; returns every read's bytes and the final content.
async fn sequence(dev: &dyn BlockDev) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    let ops: &[(u64, usize)] = &[
        (0, 4096),
        (1, 1),
        (511, 2),
        (4095, 8193),
        (1 << 20, 3 << 20),
        ((5 << 20) + 17, 100_000),
        (SIZE - 4096, 4096),
        (SIZE - 3, 3),
    ];
    for (i, &(off, len)) in ops.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        let fua = if i % 3 == 0 {
            WriteFlags::FUA
        } else {
            WriteFlags::NONE
        };
        dev.write(off, &data, fua).await.unwrap();
        let mut back = vec![0u8; len + 7];
        let start = off.saturating_sub(3).min(SIZE - back.len() as u64);
        dev.read(start, &mut back).await.unwrap();
        seen.push(back);
    }
    dev.write_zeroes(4096, 65536, true).await.unwrap();
    dev.write_zeroes(2 << 20, 12345, false).await.unwrap();
    dev.discard(8 << 20, 1 << 20).await.unwrap();
    dev.flush().await.unwrap();
    let mut all = vec![0u8; SIZE as usize];
    dev.read(0, &mut all).await.unwrap();
    seen.push(all);
    seen
}

fn run_on(path: &Path, kind: EngineKind) -> Vec<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let img = RawImage::open(path, true, Engine::new(kind).unwrap()).unwrap();
        // Start from zeros every time.
        img.write_zeroes(0, SIZE, false).await.unwrap();
        sequence(&img).await
    })
}

fn backing_file(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

#[test]
fn uring_and_pread_agree_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = backing_file(dir.path(), "file.raw");
    let a = run_on(&f, EngineKind::Uring);
    let b = run_on(&f, EngineKind::Pread);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "step {i} differs between engines");
    }
}

#[test]
fn uring_and_pread_agree_on_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    for sector in [512u32, 4096] {
        let f = backing_file(dir.path(), &format!("loop{sector}.img"));
        let dev = LoopDev::attach(&f, Some(sector));
        let a = run_on(dev.path(), EngineKind::Uring);
        let b = run_on(dev.path(), EngineKind::Pread);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                x == y,
                "{sector}-byte sectors: step {i} differs between engines"
            );
        }
        // And the device really holds what was written: the last write.
        let last = pattern(8, 3);
        assert_eq!(&a.last().unwrap()[(SIZE - 3) as usize..], &last[..]);
    }
}
