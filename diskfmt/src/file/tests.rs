use std::sync::atomic::AtomicUsize;

use super::*;
use crate::engine::faults::{Fault, Gate, Hook, OpDesc};
use crate::engine::EngineKind;
use crate::testutil::{pattern, runtime};

const LEN: usize = 256 << 10;

thread_local! {
    /// Makes `open` act as if `statx` reported no direct-I/O alignment.
    pub(super) static NO_STATX_DIOALIGN: std::cell::Cell<bool> =
        const { std::cell::Cell::new(false) };
}

/// A file of `LEN` patterned bytes, opened through an engine with `hook`.
fn patterned(dir: &Path, hook: Hook) -> (DirectFile, Vec<u8>) {
    let path = dir.join("f");
    let data = pattern(9, 0, LEN);
    std::fs::write(&path, &data).unwrap();
    let engine = Engine::with_faults(EngineKind::Uring, hook).unwrap();
    (
        DirectFile::open(&path, OpenMode::ReadWrite, engine).unwrap(),
        data,
    )
}

/// A hook making the first `n` reads short (`bytes` transferred), the rest normal.
fn first_reads_short(n: usize, bytes: usize) -> Hook {
    let count = AtomicUsize::new(0);
    Box::new(move |d: OpDesc| {
        if d.what == "read" && count.fetch_add(1, Ordering::SeqCst) < n {
            Fault::Short(bytes)
        } else {
            Fault::Pass
        }
    })
}

/// NFS and FUSE report a failed read as a short count. Before the end of the file that
/// is not end of file: the rest must be read again, not returned as zeros.
#[test]
fn short_read_before_the_end_is_retried_not_zero_filled() {
    let dir = tempfile::tempdir().unwrap();
    for short in [0, 4096, 4096 + 100] {
        let (f, data) = patterned(dir.path(), first_reads_short(1, short));
        let mut back = vec![0u8; LEN];
        runtime().block_on(f.read_at(0, &mut back)).unwrap();
        let bad = back.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(
            bad, None,
            "short read of {short} bytes: wrong data from byte {bad:?}"
        );
    }
}

/// Inside a read-modify-write a zero-filled head block would be written back over the
/// sectors around the write.
#[test]
fn short_read_inside_read_modify_write_keeps_the_neighbouring_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let (f, mut data) = patterned(dir.path(), first_reads_short(1, 0));
    let off = 8192 + 100;
    runtime()
        .block_on(f.write_at(off as u64, &[0xAA; 10], false))
        .unwrap();
    data[off..off + 10].fill(0xAA);
    let disk = std::fs::read(dir.path().join("f")).unwrap();
    let bad = disk.iter().zip(&data).position(|(a, b)| a != b);
    assert_eq!(bad, None, "the write clobbered its block from byte {bad:?}");
}

/// A read that keeps coming back short before the end of the file is an error naming
/// the file, never zeros.
#[test]
fn persistently_short_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (f, _) = patterned(dir.path(), first_reads_short(usize::MAX, 100));
    let mut back = vec![0u8; 4096];
    let r = runtime().block_on(f.read_at(65536, &mut back));
    let e = r.expect_err("a failing read returned data");
    assert!(e.to_string().contains("short read"), "{e}");
    assert!(
        e.to_string()
            .contains(&dir.path().join("f").display().to_string()),
        "{e}"
    );
}

/// A write of several chunks, one of which fails, must not return while a sibling
/// chunk is still in the kernel: the caller's retry could be overtaken by it.
#[test]
fn failed_multi_chunk_write_returns_only_when_no_chunk_is_in_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::new();
    let held = Arc::clone(&gate);
    let hook = move |d: OpDesc| match (d.what, d.offset) {
        ("write", 0) => Fault::Hold(Arc::clone(&held)),
        ("write", o) if o == BUF_SIZE as u64 => Fault::Fail(libc::EIO),
        _ => Fault::Pass,
    };
    let (f, _) = patterned(dir.path(), Box::new(hook));
    let opener = Arc::clone(&gate);
    let opener = std::thread::spawn(move || {
        opener.wait_reached();
        std::thread::sleep(std::time::Duration::from_millis(100));
        opener.open();
    });
    let data = pattern(1, 0, 3 * BUF_SIZE);
    let r = runtime().block_on(f.write_at(0, &data, false));
    let returned_while_held = !gate.is_open();
    opener.join().unwrap();
    let e = r.expect_err("the failed chunk was not reported");
    assert!(
        e.to_string()
            .contains(&format!("write at offset {BUF_SIZE}")),
        "{e}"
    );
    assert!(
        !returned_while_held,
        "the write returned its error while a sibling chunk was still in the kernel"
    );
}

/// Runs a command, `None` if it cannot run or fails.
fn run(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A 4096-byte-sector loop device with an ext4 file system mounted; torn down on drop.
struct Mounted4k {
    dir: tempfile::TempDir,
    dev: String,
}

impl Mounted4k {
    fn new() -> Option<Mounted4k> {
        let dir = tempfile::tempdir().ok()?;
        let backing = dir.path().join("backing");
        std::fs::File::create(&backing)
            .ok()?
            .set_len(64 << 20)
            .ok()?;
        let b = backing.to_str()?;
        let dev = run("losetup", &["--find", "--show", "--sector-size", "4096", b])?;
        let m = Mounted4k { dir, dev };
        let mnt = m.mnt();
        std::fs::create_dir(&mnt).ok()?;
        run("mkfs.ext4", &["-q", "-F", &m.dev])?;
        run("mount", &[&m.dev, mnt.to_str()?])?;
        Some(m)
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for Mounted4k {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt().to_str().unwrap_or("")]);
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// Where the kernel reports no direct-I/O alignment for a file (older kernels, some
/// file systems), the alignment is the logical block size of the device under it, not
/// 512: on a 4096-byte-sector disk, 512-aligned `O_DIRECT` I/O fails with EINVAL.
#[test]
fn file_alignment_without_statx_is_the_devices_logical_block_size() {
    let Some(m) = Mounted4k::new() else {
        eprintln!("skipped: needs root, losetup, mkfs.ext4 and mount");
        return;
    };
    let path = m.mnt().join("f");
    std::fs::write(&path, pattern(5, 0, 16384)).unwrap();
    let engine = Engine::new(EngineKind::Uring).unwrap();
    let dev = DirectFile::open(Path::new(&m.dev), OpenMode::ReadOnly, engine.clone());
    assert_eq!(dev.unwrap().align(), 4096, "the loop device's BLKSSZGET");
    NO_STATX_DIOALIGN.set(true);
    let f = DirectFile::open(&path, OpenMode::ReadWrite, engine);
    NO_STATX_DIOALIGN.set(false);
    let f = f.unwrap();
    assert_eq!(f.align(), 4096);
    runtime().block_on(async {
        f.write_at(512, &[0xAB; 512], false).await.unwrap();
        let mut back = vec![0u8; 1024];
        f.read_at(512, &mut back).await.unwrap();
        assert!(back[..512].iter().all(|&b| b == 0xAB));
        assert_eq!(back[512..], pattern(5, 0, 16384)[1024..1536]);
    });
}

/// Once a flush failed, the kernel may have dropped the dirty data it could not write
/// and cleared the error: a later fdatasync succeeds without that data on disk. Every
/// later flush of the file must fail until it is reopened.
#[test]
fn a_failed_flush_makes_every_later_flush_fail() {
    let dir = tempfile::tempdir().unwrap();
    let fsyncs = AtomicUsize::new(0);
    let hook = move |d: OpDesc| {
        if d.what == "fsync" && fsyncs.fetch_add(1, Ordering::SeqCst) == 0 {
            Fault::Fail(libc::EIO)
        } else {
            Fault::Pass
        }
    };
    let (f, _) = patterned(dir.path(), Box::new(hook));
    runtime().block_on(async {
        f.write_at(0, &[1; 4096], false).await.unwrap();
        f.sync()
            .await
            .expect_err("the injected flush error was lost");
        let e = f
            .sync()
            .await
            .expect_err("a flush after a failed one succeeded");
        assert!(e.to_string().contains("reopen"), "{e}");
        assert!(e.to_string().contains("os error 5"), "{e}");
        f.write_at(0, &[2; 4096], false).await.unwrap();
        f.sync()
            .await
            .expect_err("a flush after a failed one succeeded");
    });
    let (f, _) = patterned(dir.path(), Box::new(|_| Fault::Pass));
    runtime().block_on(f.sync()).unwrap();
}
