//! The test guest (scripts/build-guest.sh: Debian cloud kernel, busybox, the workload)
//! booted under TCG with its disk from an agent's NBD export of a datastore file; the
//! host-side checker then finds every acknowledged write on the file — and fails once
//! one acknowledged sector is damaged (negative control).

use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use diskfmt::{BlockDev, WriteFlags};
use ferry_guest::{check, parse_logs, Phase, SECTOR};
use ferry_tests::agents::{block_on, guest_dir, read_export, AgentBed};
use ferry_tests::cluster::SERIAL;
use nbd::NbdClient;
use serde_json::json;

/// The wall clock, to compare with the guest's (its RTC starts from the host's); it
/// only places phases, it decides nothing about leases.
#[allow(clippy::disallowed_methods)]
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn the_guest_workload_on_an_agent_export_loses_no_acknowledged_write() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = guest_dir();
    let mut bed = AgentBed::new(1);
    bed.start(0);
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/datastores/ds0/files",
        Some(json!({"path": "/vm-disk", "size": 128u64 << 20, "provisioning": "thin"})),
    );
    assert_eq!(s, 201, "{v}");
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "vda", "datastore": "ds0", "path": "/vm-disk"})),
    );
    let sock = bed.hosts[0].nbd_socket();
    let console = bed.dir.path().join("console.log");
    let t0 = wall_ms();
    let status = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc-q35-7.2,accel=tcg",
            "-cpu",
            "qemu64",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
        ])
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join("initramfs.img"))
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 ferry.seconds=10 ferry.region_mib=32",
            "-serial",
        ])
        .arg(format!("file:{}", console.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=vda,node-name=d0,reconnect-delay=10",
            sock.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("qemu-system-x86_64");
    let t1 = wall_ms();
    assert!(status.success(), "qemu: {status}");
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(
        log.contains("FEXIT 0"),
        "the workload failed in the guest:\n{log}"
    );
    let acked = parse_logs(&[&log]);
    let mid = (t0 + t1) / 2;
    let phases = [
        Phase {
            name: "first half".into(),
            from_wall_ms: 0,
            to_wall_ms: mid,
            min_writes: 50,
            min_overwrites: 5,
        },
        Phase {
            name: "second half".into(),
            from_wall_ms: mid,
            to_wall_ms: u64::MAX,
            min_writes: 50,
            min_overwrites: 5,
        },
    ];
    let r = check(&acked, &phases, |f, n| read_export(&sock, "vda", f, n));
    eprintln!(
        "{} acknowledged writes ({} overwrites) over {} sectors; longest gap {} ms; phases {:?}",
        r.acked, r.overwrites, r.sectors, r.longest_gap_ms, r.phases
    );
    assert!(r.ok(), "{:?}", r.errors);

    // Negative control: damage one acknowledged sector; the checker must say which.
    let victim = acked[acked.len() / 2];
    block_on(async {
        let c = NbdClient::connect_unix(&sock, "vda").await.unwrap();
        c.write(
            victim.sector * SECTOR as u64,
            &[0u8; SECTOR],
            WriteFlags::NONE,
        )
        .await
        .unwrap();
        c.flush().await.unwrap();
    });
    let r = check(&acked, &[], |f, n| read_export(&sock, "vda", f, n));
    assert!(!r.ok(), "the checker missed a damaged acknowledged sector");
    // And a stalled workload (too few writes in a phase) fails too.
    let r = check(
        &acked,
        &[Phase {
            name: "after the end".into(),
            from_wall_ms: t1 + 1000,
            to_wall_ms: u64::MAX,
            min_writes: 1,
            min_overwrites: 0,
        }],
        |f, n| read_export(&sock, "vda", f, n),
    );
    assert!(
        r.errors.iter().any(|e| e.contains("after the end")),
        "{:?}",
        r.errors
    );
}
