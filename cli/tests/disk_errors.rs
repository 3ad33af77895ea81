//! Bad input: every case gives one line on stderr naming the object, exit status 2, and
//! never a panic.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use ferry_tests::qemu_img;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs ferry expecting failure; returns the single stderr line.
fn fails(args: &[&str], names: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "ferry {args:?}: {err}");
    assert!(!err.contains("panicked"), "ferry {args:?} panicked: {err}");
    // Progress lines may come first; the error itself is one line.
    let err_lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("progress: "))
        .collect();
    assert_eq!(err_lines.len(), 1, "not one line: {err}");
    assert!(err.contains(names), "{err:?} does not name {names:?}");
    err
}

/// A way to damage a copy of a good image.
type Damage = Box<dyn Fn(&Path)>;

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn missing_file_is_named() {
    let e = fails(
        &["disk", "info", "/nonexistent/disk.qcow2"],
        "/nonexistent/disk.qcow2",
    );
    assert!(e.contains("No such file"), "{e}");
    fails(
        &["disk", "hash", "/nonexistent/x.raw"],
        "/nonexistent/x.raw",
    );
}

#[test]
fn size_not_a_multiple_of_512_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.raw");
    let e = fails(&["disk", "create", &s(&p), "--size", "1000"], "odd.raw");
    assert!(e.contains("multiple of 512"), "{e}");
    assert!(!p.exists(), "a refused create must not leave a file");
    let q = dir.path().join("odd.qcow2");
    fails(
        &[
            "disk",
            "create",
            &s(&q),
            "--size",
            "1001",
            "--format",
            "qcow2",
        ],
        "odd.qcow2",
    );
}

#[test]
fn existing_destination_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", &s(&b), "1M"]);
    let e = fails(&["disk", "convert", &s(&a), &s(&b)], "b.raw");
    assert!(e.contains("--force"), "{e}");
    fails(&["disk", "create", &s(&b), "--size", "1M"], "b.raw");
    let ok = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["disk", "convert", &s(&a), &s(&b), "--force"])
        .output()
        .unwrap();
    assert!(ok.status.success());
}

#[test]
fn damaged_qcow2_headers_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&good), "64M"]);
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "truncated-header",
            Box::new(|p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(40)
                    .unwrap()
            }),
            "truncated",
        ),
        (
            "truncated-tables",
            Box::new(|p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(65536)
                    .unwrap()
            }),
            "truncated",
        ),
        (
            "version",
            Box::new(|p: &Path| patch(p, 4, &9u32.to_be_bytes())),
            "version 9",
        ),
        (
            "cluster-bits",
            Box::new(|p: &Path| patch(p, 20, &40u32.to_be_bytes())),
            "cluster bits",
        ),
        (
            "aes",
            Box::new(|p: &Path| patch(p, 32, &1u32.to_be_bytes())),
            "AES encryption",
        ),
        (
            "luks",
            Box::new(|p: &Path| patch(p, 32, &2u32.to_be_bytes())),
            "LUKS encryption",
        ),
        (
            "marked-corrupt",
            Box::new(|p: &Path| patch(p, 72, &2u64.to_be_bytes())),
            "marked corrupt",
        ),
        (
            "extended-l2",
            Box::new(|p: &Path| patch(p, 72, &16u64.to_be_bytes())),
            "subclusters",
        ),
        (
            "l1-offset",
            Box::new(|p: &Path| patch(p, 40, &(1u64 << 40).to_be_bytes())),
            "L1 table",
        ),
        (
            "header-length",
            Box::new(|p: &Path| patch(p, 100, &7u32.to_be_bytes())),
            "header length",
        ),
    ];
    for (name, damage, expect) in cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::copy(&good, &p).unwrap();
        damage(&p);
        for cmd in ["info", "map", "hash"] {
            let e = fails(&["disk", cmd, &s(&p)], &format!("{name}.qcow2"));
            assert!(e.contains(expect), "{name}: {e}");
        }
        let out = dir.path().join(format!("{name}.out"));
        fails(
            &["disk", "convert", &s(&p), &s(&out)],
            &format!("{name}.qcow2"),
        );
    }
}

#[test]
fn internal_snapshots_allow_reading_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&p), "8M"]);
    qemu_img(&["snapshot", "-c", "s1", &s(&p)]);
    let out = dir.path().join("copy.raw");
    let ok = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["disk", "convert", &s(&p), &s(&out)])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn bad_arguments_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.raw");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["disk", "create", &s(&p), "--size", "ten"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    let e = fails(&["disk", "convert", &s(&p), &s(&p)], "x.raw");
    assert!(!e.is_empty());
}

/// Unmounts a test mount on drop (also when the test fails).
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_target_file_system_is_reported_and_no_partial_image_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    ferry_tests::run_ok(
        "mount",
        &["-t", "tmpfs", "-o", "size=8m", "tmpfs", &s(&mnt)],
    );
    let _m = Mount(mnt.clone());
    let src = dir.path().join("src.raw");
    std::fs::write(&src, ferry_tests::pattern(3, 16 << 20)).unwrap();
    let dst = mnt.join("dst.raw");
    let e = fails(&["disk", "convert", &s(&src), &s(&dst)], "dst.raw");
    assert!(e.contains("No space left"), "{e}");
    assert!(!dst.exists(), "a failed conversion left {dst:?} behind");
}

#[test]
fn a_block_device_smaller_than_the_source_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&src), "16M"]);
    let lun = dir.path().join("lun.img");
    std::fs::File::create(&lun)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev = ferry_tests::LoopDev::attach(&lun, None);
    let e = fails(
        &["disk", "convert", &s(&src), &s(dev.path())],
        &s(dev.path()),
    );
    assert!(e.contains("smaller than the source"), "{e}");
}
