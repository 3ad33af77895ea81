//! `ferry disk` checked against `qemu-img` and `qemu-io` as oracles (installed by
//! scripts/setup.sh; these tests fail, never skip, without them).

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::{allocated, qemu_data_ranges, qemu_img, qemu_io_write, run, LoopDev};

const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn ferry_ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A source image with scattered data, made by qemu tools.
fn scattered(dir: &Path, name: &str, format: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", format, &s(&p), &size.to_string()]);
    qemu_io_write(
        &p,
        format,
        &[
            (0x11, 0, 4096),
            (0x22, MIB + 512, 70_000),
            (0x33, 5 * MIB, 3 * MIB),
            (0x44, size - 8192, 8192),
        ],
    );
    p
}

fn hash(p: &Path) -> String {
    ferry_ok(&["disk", "hash", &s(p)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn qemu_compare(a: &Path, b: &Path) -> i32 {
    run("qemu-img", &["compare", &s(a), &s(b)])
        .status
        .code()
        .unwrap()
}

#[test]
fn created_images_pass_qemu_img_check_with_the_right_size() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["raw", "qcow2"] {
        for prov in ["thin", "lazy-thick", "eager-thick"] {
            let p = dir.path().join(format!("{prov}.{fmt}"));
            ferry_ok(&[
                "disk",
                "create",
                &s(&p),
                "--size",
                "12M",
                "--format",
                fmt,
                "--provisioning",
                prov,
            ]);
            let info: serde_json::Value =
                serde_json::from_str(&qemu_img(&["info", "--output=json", &s(&p)])).unwrap();
            assert_eq!(info["virtual-size"], 12 * MIB, "{p:?}");
            assert_eq!(info["format"], fmt);
            if fmt == "qcow2" {
                qemu_img(&["check", &s(&p)]);
            }
            let ours: serde_json::Value =
                serde_json::from_str(&ferry_ok(&["disk", "info", "--json", &s(&p)])).unwrap();
            assert_eq!(ours["provisioning"], prov, "{p:?}");
            if prov == "thin" {
                assert!(allocated(&p) < 2 * MIB, "{p:?} should be sparse");
            } else {
                assert!(allocated(&p) >= 12 * MIB, "{p:?} should be allocated");
            }
        }
    }
}

#[test]
fn conversions_preserve_content_in_every_direction() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB + 512 * 3; // an odd size: not a multiple of a cluster
    for src_fmt in ["raw", "qcow2"] {
        let src = scattered(dir.path(), &format!("src.{src_fmt}"), src_fmt, size);
        let src_hash = hash(&src);
        for dst_fmt in ["raw", "qcow2"] {
            for prov in ["thin", "lazy-thick", "eager-thick"] {
                let dst = dir.path().join(format!("{src_fmt}-to-{prov}.{dst_fmt}"));
                ferry_ok(&[
                    "disk",
                    "convert",
                    &s(&src),
                    &s(&dst),
                    "--format",
                    dst_fmt,
                    "--provisioning",
                    prov,
                ]);
                assert_eq!(qemu_compare(&src, &dst), 0, "{dst:?} differs from {src:?}");
                assert_eq!(hash(&dst), src_hash, "{dst:?}");
                if dst_fmt == "qcow2" {
                    qemu_img(&["check", &s(&dst)]);
                }
                let info: serde_json::Value =
                    serde_json::from_str(&ferry_ok(&["disk", "info", "--json", &s(&dst)])).unwrap();
                assert_eq!(info["provisioning"], prov, "{dst:?}");
                if prov == "thin" {
                    assert!(
                        allocated(&dst) <= allocated(&src) + MIB,
                        "thin {dst:?} allocates {} > source {}",
                        allocated(&dst),
                        allocated(&src)
                    );
                } else {
                    assert!(allocated(&dst) >= size, "thick {dst:?} is not allocated");
                }
            }
        }
    }
}

#[test]
fn thin_conversion_drops_zero_data_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("full.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&src), "16M"]);
    // Explicit zeros written as data, plus one real block.
    qemu_io_write(&src, "raw", &[(0, 0, 16 * MIB), (0x5a, 3 * MIB, 4096)]);
    assert!(allocated(&src) >= 16 * MIB);
    let dst = dir.path().join("thin.qcow2");
    ferry_ok(&["disk", "convert", &s(&src), &s(&dst), "--format", "qcow2"]);
    assert_eq!(qemu_compare(&src, &dst), 0);
    assert!(
        allocated(&dst) < 2 * MIB,
        "zeros were copied: {}",
        allocated(&dst)
    );
}

#[test]
fn compare_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let a = scattered(dir.path(), "a.raw", "raw", 8 * MIB);
    let b = dir.path().join("b.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2", &s(&a), &s(&b)]);
    let longer = dir.path().join("longer.raw");
    qemu_img(&["convert", "-q", "-O", "raw", &s(&a), &s(&longer)]);
    qemu_img(&["resize", "-q", "-f", "raw", &s(&longer), "9M"]);
    let changed = dir.path().join("changed.qcow2");
    qemu_img(&["convert", "-q", "-O", "qcow2", &s(&a), &s(&changed)]);
    qemu_io_write(&changed, "qcow2", &[(0x77, 6 * MIB + 1000, 10)]);
    let longer_data = dir.path().join("longer-data.raw");
    qemu_img(&["convert", "-q", "-O", "raw", &s(&longer), &s(&longer_data)]);
    qemu_io_write(&longer_data, "raw", &[(0x01, 8 * MIB + 4096, 512)]);

    for (x, y) in [
        (&a, &b),
        (&a, &longer),
        (&b, &changed),
        (&a, &longer_data),
        (&changed, &a),
    ] {
        let q = run("qemu-img", &["compare", &s(x), &s(y)]);
        let f = ferry(&["disk", "compare", &s(x), &s(y)]);
        assert_eq!(f.status.code(), q.status.code(), "{x:?} vs {y:?}");
        // Same verdict line, including the first mismatching offset.
        let last = |o: &[u8]| {
            String::from_utf8_lossy(o)
                .lines()
                .last()
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(last(&f.stdout), last(&q.stdout), "{x:?} vs {y:?}");
    }
}

#[test]
fn map_agrees_with_qemu_img_on_data_ranges() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["raw", "qcow2"] {
        let p = scattered(dir.path(), &format!("m.{fmt}"), fmt, 32 * MIB);
        let out = ferry_ok(&["disk", "map", "--json", &s(&p)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ours = ferry_tests::merge(v.as_array().unwrap().iter().filter_map(|e| {
            e["data"]
                .as_bool()
                .filter(|d| *d)
                .map(|_| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        }));
        assert_eq!(ours, qemu_data_ranges(&p), "{fmt}");
        // Extents cover the whole disk exactly once.
        let total: u64 = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 32 * MIB);
    }
}

#[test]
fn qemu_made_qcow2_images_read_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let base = scattered(dir.path(), "base.raw", "raw", 16 * MIB);
    for cluster in ["512", "4096", "65536", "2M"] {
        let q = dir.path().join(format!("c{cluster}.qcow2"));
        qemu_img(&[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            &s(&base),
            &s(&q),
        ]);
        assert_eq!(hash(&q), hash(&base), "cluster size {cluster}");
    }
    // An overlay on a backing file: reads fall through to the backing image.
    let overlay = dir.path().join("overlay.qcow2");
    let ours = dir.path().join("ours-overlay.qcow2");
    ferry_ok(&[
        "disk",
        "create",
        &s(&ours),
        "--size",
        "16M",
        "--format",
        "qcow2",
        "--backing",
        "base.raw",
    ]);
    qemu_img(&["check", &s(&ours)]);
    assert_eq!(hash(&ours), hash(&base));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&overlay),
    ]);
    qemu_io_write(&overlay, "qcow2", &[(0x99, 2 * MIB, 65536)]);
    let flat = dir.path().join("flat.raw");
    qemu_img(&["convert", "-q", "-O", "raw", &s(&overlay), &s(&flat)]);
    assert_eq!(hash(&overlay), hash(&flat));
}

#[test]
fn convert_writes_onto_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let src = scattered(dir.path(), "src.qcow2", "qcow2", 16 * MIB);
    let backing = dir.path().join("lun.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    // Dirty the device first: zero ranges of the source must be zeroed, not skipped.
    qemu_io_write(&backing, "raw", &[(0xee, 0, 16 * MIB)]);
    let dev = LoopDev::attach(&backing, None);
    ferry_ok(&["disk", "convert", &s(&src), &s(dev.path())]);
    assert_eq!(qemu_compare(&src, dev.path()), 0);
    assert_eq!(hash(dev.path()), hash(&src));
}

#[test]
fn odd_sized_raw_files_read_as_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("odd.raw");
    std::fs::write(&p, ferry_tests::pattern(7, 1_000_001)).unwrap();
    let qinfo: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", "raw", &s(&p)])).unwrap();
    let ours: serde_json::Value =
        serde_json::from_str(&ferry_ok(&["disk", "info", "--json", &s(&p)])).unwrap();
    assert_eq!(ours["virtual_size"], qinfo["virtual-size"]);
    for fmt in ["qcow2", "raw"] {
        let q = dir.path().join(format!("copy.{fmt}"));
        ferry_ok(&["disk", "convert", &s(&p), &s(&q), "--format", fmt]);
        assert_eq!(qemu_compare(&p, &q), 0, "{fmt}");
        assert_eq!(hash(&q), hash(&p), "{fmt}");
        ferry_ok(&["disk", "compare", &s(&p), &s(&q)]);
    }
    // The file itself was only read: its length is unchanged.
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1_000_001);
}
