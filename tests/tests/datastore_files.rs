//! Datastore files through the `ferry` command, on a loop device: a sparse qcow2 imported
//! thin and exported back is identical under `qemu-img compare`; thin files allocate
//! what is written, thick files everything; `ferry datastore ls` and `check` agree.

use std::collections::BTreeSet;
use std::path::Path;

use ferry_tests::cluster::ferry_bin;
use ferry_tests::{qemu_img, qemu_io_write, run, run_ok, LoopDev};

const MIB: u64 = 1 << 20;

fn ferry(args: &[&str]) -> String {
    run_ok(ferry_bin().to_str().unwrap(), args)
}

fn ls(dev: &Path, folder: &str) -> serde_json::Value {
    let target = format!("{}:{folder}", dev.display());
    serde_json::from_str(&ferry(&["datastore", "ls", "--json", &target])).unwrap()
}

#[test]
fn sparse_qcow2_round_trips_through_a_datastore_and_thick_files_are_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    ferry(&[
        "datastore",
        "create",
        image.to_str().unwrap(),
        "--label",
        "files",
        "--size",
        "1G",
        "--max-hosts",
        "4",
        "--profile",
        "test",
    ]);
    let lo = LoopDev::attach(&image, None);
    let dev = lo.path().display().to_string();
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-f", "qcow2", src.to_str().unwrap(), "300M"]);
    // Scattered data, one unaligned tail, and a zeroed range.
    let writes = [
        (0x11u8, 0, 3 * MIB),
        (0x22, 100 * MIB + 4096, 8192),
        (0x33, 299 * MIB, MIB),
        (0x44, 150 * MIB + 512, 1536),
    ];
    qemu_io_write(&src, "qcow2", &writes);
    let host = ["--host", "importer"];
    ferry(&[
        "datastore",
        "mkdir",
        &format!("{dev}:/vm1"),
        host[0],
        host[1],
    ]);
    let thin = format!("{dev}:/vm1/disk0");
    ferry(&[
        "disk",
        "convert",
        src.to_str().unwrap(),
        &thin,
        "--provisioning",
        "thin",
        host[0],
        host[1],
    ]);
    // Allocated bytes of the thin file: exactly the 1 MiB blocks holding data.
    let blocks: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(_, off, len)| off / MIB..(off + len).div_ceil(MIB))
        .collect();
    let listed = ls(lo.path(), "/vm1");
    assert_eq!(listed[0]["path"], "/vm1/disk0");
    assert_eq!(listed[0]["size"], 300 * MIB);
    assert_eq!(listed[0]["provisioning"], "thin");
    assert_eq!(
        listed[0]["allocated_bytes"],
        blocks.len() as u64 * MIB,
        "{listed}"
    );
    // Back out, as qcow2 and raw: identical to the original.
    let back = dir.path().join("back.qcow2");
    ferry(&[
        "disk",
        "convert",
        &thin,
        back.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    let out = qemu_img(&["compare", src.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(out.contains("identical"), "{out}");
    let raw = dir.path().join("back.raw");
    ferry(&["disk", "convert", &thin, raw.to_str().unwrap()]);
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        src.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(out.contains("identical"), "{out}");
    // compare and hash work on datastore files directly.
    let cmp = run(
        ferry_bin().to_str().unwrap(),
        &["disk", "compare", src.to_str().unwrap(), &thin],
    );
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let h1 = ferry(&["disk", "hash", src.to_str().unwrap()]);
    let h2 = ferry(&["disk", "hash", &thin]);
    assert_eq!(h1.split_whitespace().next(), h2.split_whitespace().next());
    let map: serde_json::Value =
        serde_json::from_str(&ferry(&["disk", "map", "--json", &thin])).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "data")
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // Data extents are 4 KiB-granular: what was written (in the source's 64 KiB clusters
    // at most), not the 1 MiB blocks around it.
    let written: u64 = writes.iter().map(|w| w.2).sum();
    assert!(
        data >= written && data <= 4 * MIB + 2 * 65536,
        "{data} bytes of data: {map}"
    );

    // Thick imports allocate the whole size.
    for prov in ["lazy-thick", "eager-thick"] {
        let f = format!("{dev}:/vm1/{prov}");
        ferry(&[
            "disk",
            "convert",
            src.to_str().unwrap(),
            &f,
            "--provisioning",
            prov,
            host[0],
            host[1],
        ]);
        let st = ls(lo.path(), &format!("/vm1/{prov}"));
        assert_eq!(st[0]["allocated_bytes"], 300 * MIB, "{st}");
        assert_eq!(st[0]["provisioning"], prov);
        let cmp = run(
            ferry_bin().to_str().unwrap(),
            &["disk", "compare", src.to_str().unwrap(), &f],
        );
        assert_eq!(cmp.status.code(), Some(0));
    }
    // A file that exists is not overwritten without --force.
    let again = run(
        ferry_bin().to_str().unwrap(),
        &[
            "disk",
            "convert",
            src.to_str().unwrap(),
            &thin,
            host[0],
            host[1],
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let check = run(ferry_bin().to_str().unwrap(), &["datastore", "check", &dev]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Deleting gives all the space back.
    for f in ["disk0", "lazy-thick", "eager-thick"] {
        ferry(&[
            "datastore",
            "rm",
            &format!("{dev}:/vm1/{f}"),
            host[0],
            host[1],
        ]);
    }
    ferry(&["datastore", "rm", &format!("{dev}:/vm1"), host[0], host[1]]);
    let check: serde_json::Value =
        serde_json::from_str(&ferry(&["datastore", "check", "--json", &dev])).unwrap();
    assert_eq!(check["used_blocks"], 0, "{check}");
    assert_eq!(check["files"], 0);
}
