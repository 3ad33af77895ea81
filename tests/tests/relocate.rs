//! Storage relocation (Storage vMotion) through the agent: a running test guest moved
//! between datastores with every acknowledged write checked, the frozen-copier rule on
//! the real target file, an agent killed at each pivot step, a pivot during which one
//! disk's new file fails, and powered-off moves with format conversion, per-disk
//! destinations and clear refusals.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use datastore::files::DsFile;
use diskfmt::{BlockDev, WriteFlags};
use ferry_guest::{check, check_live, parse_logs, Acked, Phase};
use ferry_tests::agents::{block_on, read_export, AgentBed};
use ferry_tests::cluster::{ferry_bin, SERIAL};
use ferry_tests::vms::{console, create_vm, relocate, wait_task, wait_writes};
use serde_json::{json, Value};

/// The guest's clock now, as far as the host can tell: the wall time of the newest
/// acknowledged write in its console log (the guest's clock is its own under TCG, so
/// phases are placed by it, not by the host's).
fn guest_now(bed: &AgentBed, i: usize, vm: &str) -> (u64, u64) {
    let a = parse_logs(&[&console(bed, i, vm)]);
    let last = a.last().expect("acknowledged writes");
    (last.wall_ms, last.seq)
}

fn writes_so_far(bed: &AgentBed, i: usize, vm: &str) -> usize {
    console(bed, i, vm)
        .lines()
        .filter(|l| l.contains("FW "))
        .count()
}

/// The acknowledged writes of the guest's current run (one boot).
fn acked_of_run(bed: &AgentBed, i: usize, vm: &str) -> Vec<Acked> {
    let all = parse_logs(&[&console(bed, i, vm)]);
    let run = all.last().expect("acknowledged writes").run;
    let mine: Vec<Acked> = all.iter().copied().filter(|a| a.run == run).collect();
    assert_eq!(
        mine.len(),
        all.len(),
        "the guest rebooted (several runs in its log)"
    );
    mine
}

fn stat(bed: &AgentBed, i: usize, ds: &str, path: &str) -> (u16, Value) {
    bed.call(
        i,
        "GET",
        &format!("/v1/datastores/{ds}/stat?path={path}"),
        None,
    )
}

/// Checks `acked` against a datastore file through a read-only export.
fn verify(
    bed: &AgentBed,
    i: usize,
    ds: &str,
    path: &str,
    acked: &[Acked],
    phases: &[Phase],
) -> ferry_guest::Report {
    bed.call_ok(
        i,
        "POST",
        "/v1/exports",
        Some(json!({"name": "verify", "datastore": ds, "path": path, "read_only": true})),
    );
    let sock = bed.hosts[i].nbd_socket();
    let r = check(acked, phases, |f, n| read_export(&sock, "verify", f, n));
    bed.call_ok(i, "DELETE", "/v1/exports/verify", None);
    r
}

/// The longest gap (guest uptime) between consecutive acknowledged writes that end
/// inside the guest wall-clock window `from..to`.
fn longest_gap_within(acked: &[Acked], from: u64, to: u64) -> u64 {
    acked
        .windows(2)
        .filter(|w| w[1].wall_ms >= from && w[1].wall_ms < to)
        .map(|w| w[1].uptime_ms.saturating_sub(w[0].uptime_ms))
        .max()
        .unwrap_or(0)
}

fn phase(name: &str, from: u64, to: u64, min: usize) -> Phase {
    Phase {
        name: name.into(),
        from_wall_ms: from,
        to_wall_ms: to,
        min_writes: min,
        min_overwrites: 1,
    }
}

#[test]
fn a_running_vm_moves_to_another_datastore_live_and_loses_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::with_datastores(1, &["ds0", "ds1"], 256);
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "mirror-freeze".into())];
    bed.start(0);
    create_vm(&bed, 0, "vm1", 64, json!([]));
    let pid = bed.call_ok(0, "POST", "/v1/vms/vm1/start", None)["pid"].clone();
    wait_writes(&bed, 0, "vm1", 40);

    let (t_start, _) = guest_now(&bed, 0, "vm1");
    let (s, task) = bed.call(
        0,
        "POST",
        "/v1/vms/vm1/relocate",
        Some(json!({"datastore": "ds1", "speed": 8 << 20})),
    );
    assert_eq!(s, 202, "{task}");
    let id = task["id"].as_u64().unwrap();
    // A second relocation of the same VM is refused while this one runs.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/vm1/relocate",
        Some(json!({"datastore": "ds1"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("already being relocated"),
        "{v}"
    );

    // In sync, copiers frozen (failpoint): from now on every acknowledged write must
    // already be on the target.
    let t0 = Instant::now();
    while !bed.log(0).contains("failpoint mirror-freeze") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never in sync:\n{}",
            bed.log(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (g_frozen, seq_frozen) = guest_now(&bed, 0, "vm1");
    eprintln!("frozen at {} ms", g_frozen - t_start);
    let v = bed.call_ok(0, "GET", &format!("/v1/tasks/{id}"), None);
    assert_eq!(v["state"], "running", "{v}");
    let (_, src) = stat(&bed, 0, "ds0", "/vm1/disk0");
    let (_, tgt) = stat(&bed, 0, "ds1", "/vm1/disk0");
    let (sa, ta) = (
        src["allocated_bytes"].as_u64().unwrap(),
        tgt["allocated_bytes"].as_u64().unwrap(),
    );
    eprintln!("in sync: source allocated {sa}, target allocated {ta}");
    assert!(
        ta as f64 <= 1.05 * sa as f64,
        "thin did not stay thin: {ta} > 1.05 × {sa}"
    );
    wait_writes(&bed, 0, "vm1", writes_so_far(&bed, 0, "vm1") + 40);
    let since: Vec<Acked> = acked_of_run(&bed, 0, "vm1")
        .into_iter()
        .filter(|a| a.seq > seq_frozen)
        .collect();
    assert!(
        since.len() >= 20,
        "only {} writes after the freeze",
        since.len()
    );
    let target_dev = bed.devices[1].path().to_path_buf();
    let target = DsFile::open_readonly(&target_dev, "/vm1/disk0").unwrap();
    let r = check_live(&since, |f, n| {
        block_on(async {
            let mut b = vec![0u8; n as usize * 512];
            target
                .read(f * 512, &mut b)
                .await
                .map_err(std::io::Error::other)?;
            Ok(b)
        })
    });
    assert!(
        r.ok(),
        "writes acknowledged with the copier frozen are missing on the target: {:?}",
        r.errors
    );
    eprintln!(
        "target checked at {} ms",
        guest_now(&bed, 0, "vm1").0 - t_start
    );
    std::fs::write(bed.hosts[0].run_dir.join("relocations/vm1.go"), b"").unwrap();

    let done = wait_task(&bed, 0, id, Duration::from_secs(120));
    let (t_end, _) = guest_now(&bed, 0, "vm1");
    assert_eq!(done["state"], "done", "{done}\n{}", bed.log(0));
    let res = &done["result"];
    eprintln!("relocation: {res}");
    assert!(res["io_pause_ms"].as_f64().unwrap() < 1000.0, "{res}");
    wait_writes(&bed, 0, "vm1", writes_so_far(&bed, 0, "vm1") + 40);

    // The same QEMU runs on the new disk; the old files are gone.
    let vm = bed.call_ok(0, "GET", "/v1/vms/vm1", None);
    assert_eq!(vm["pid"], pid, "{vm}");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["datastore"], "ds1", "{vm}");
    assert_eq!(vm["disks"][0]["datastore"], "ds1", "{vm}");
    assert_eq!(stat(&bed, 0, "ds0", "/vm1/disk0").0, 404);
    assert_eq!(stat(&bed, 0, "ds0", "/vm1/vm.toml").0, 404);
    bed.call_ok(0, "POST", "/v1/vms/vm1/stop", Some(json!({"force": true})));

    let acked = acked_of_run(&bed, 0, "vm1");
    let phases = [
        phase("before", 0, t_start, 20),
        phase("during", t_start, t_end, 20),
        phase("after", t_end, u64::MAX, 20),
    ];
    let r = verify(&bed, 0, "ds1", "/vm1/disk0", &acked, &phases);
    eprintln!(
        "{} acknowledged writes ({} overwrites), phases {:?}, longest gap {} ms, ending at \
         {} ms after the relocation started (it ended at {} ms)",
        r.acked,
        r.overwrites,
        r.phases,
        r.longest_gap_ms,
        r.longest_gap_end_wall_ms as i64 - t_start as i64,
        t_end - t_start
    );
    assert!(r.ok(), "{:?}", r.errors);
    // The guest-visible pause of the move: the longest gap between acknowledged writes
    // from the start of the relocation until shortly after it ended.
    let gap = longest_gap_within(&acked, t_start, t_end + 500);
    eprintln!("longest gap during the relocation: {gap} ms");
    assert!(
        gap < 1000,
        "the guest paused {gap} ms during the relocation"
    );
}

#[test]
fn an_agent_killed_at_each_pivot_step_restarts_the_vm_on_the_right_disk() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::with_datastores(1, &["ds0", "ds1"], 256);
    bed.start(0);
    create_vm(&bed, 0, "vm2", 32, json!([]));
    let pid = bed.call_ok(0, "POST", "/v1/vms/vm2/start", None)["pid"].clone();
    wait_writes(&bed, 0, "vm2", 30);
    // (failpoint, destination, where the VM must be afterwards)
    let steps = [
        ("pivot-before-config", "ds1", "ds0"),
        ("pivot-after-config", "ds1", "ds1"),
        ("pivot-after-switch", "ds0", "ds0"),
    ];
    for (fp, dest, expect) in steps {
        // Restart the agent with the failpoint armed (SIGTERM leaves the VM running).
        bed.signal(0, nix::sys::signal::Signal::SIGTERM);
        bed.env[0] = vec![("FERRY_FAILPOINTS".into(), fp.into())];
        bed.start(0);
        let (s, v) = bed.call(
            0,
            "POST",
            "/v1/vms/vm2/relocate",
            Some(json!({"datastore": dest})),
        );
        assert_eq!(s, 202, "{v}");
        let st = bed.wait_exit(0, Duration::from_secs(120));
        assert!(!st.success(), "{fp}: the agent was not killed ({st})");
        bed.env[0].clear();
        bed.start(0);
        let vm = bed.call_ok(0, "GET", "/v1/vms/vm2", None);
        assert_eq!(vm["pid"], pid, "{fp}: {vm}");
        assert_eq!(vm["state"], "running", "{fp}: {vm}");
        assert_eq!(vm["datastore"], expect, "{fp}: {vm}");
        assert_eq!(vm["disks"][0]["datastore"], expect, "{fp}: {vm}");
        let other = if expect == "ds0" { "ds1" } else { "ds0" };
        assert_eq!(
            stat(&bed, 0, other, "/vm2/disk0").0,
            404,
            "{fp}: a leftover disk on {other}"
        );
        assert_eq!(
            stat(&bed, 0, other, "/vm2/vm.toml").0,
            404,
            "{fp}: a leftover definition on {other}"
        );
        assert!(
            bed.log(0).contains("interrupted relocation"),
            "{fp}: nothing was recovered"
        );
        wait_writes(&bed, 0, "vm2", writes_so_far(&bed, 0, "vm2") + 20);
    }
    // A commit whose write landed but reported failure: undone, the definition must
    // not name the deleted new files (it did: the VM then pointed at nothing).
    bed.signal(0, nix::sys::signal::Signal::SIGTERM);
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "commit-lands-then-fails".into())];
    bed.start(0);
    let id = relocate(&bed, 0, "vm2", json!({"datastore": "ds1"}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}");
    let vm = bed.call_ok(0, "GET", "/v1/vms/vm2", None);
    assert_eq!(vm["pid"], pid, "{vm}");
    assert_eq!(vm["disks"][0]["datastore"], "ds0", "{vm}");
    assert_eq!(stat(&bed, 0, "ds1", "/vm2/disk0").0, 404, "a leftover disk");
    wait_writes(&bed, 0, "vm2", writes_so_far(&bed, 0, "vm2") + 20);
    bed.signal(0, nix::sys::signal::Signal::SIGTERM);
    bed.env[0].clear();
    bed.start(0);
    assert_eq!(
        bed.call_ok(0, "GET", "/v1/vms/vm2", None)["disks"][0]["datastore"],
        "ds0"
    );

    bed.call_ok(0, "POST", "/v1/vms/vm2/stop", Some(json!({"force": true})));
    let vm = bed.call_ok(0, "GET", "/v1/vms/vm2", None);
    let path = vm["disks"][0]["path"].as_str().unwrap().to_string();
    let acked = acked_of_run(&bed, 0, "vm2");
    let r = verify(&bed, 0, "ds0", &path, &acked, &[]);
    eprintln!(
        "{} acknowledged writes across three agent kills; longest gap {} ms",
        r.acked, r.longest_gap_ms
    );
    assert!(r.ok(), "{:?}", r.errors);
}

/// A pivot during which one disk's new file fails (its flush, with guest I/O held on
/// both disks): the move fails as a whole, both disks stay on their old files with the
/// same QEMU, the new files go, and a later move of the same VM works and loses nothing.
#[test]
fn a_pivot_during_which_one_disks_mirror_fails_leaves_every_disk_on_its_source() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::with_datastores(1, &["ds0", "ds1"], 256);
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "pivot-flush-fails=2".into())];
    bed.start(0);
    let g = ferry_tests::agents::guest_dir();
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "vm4", "datastore": "ds0", "memory_mib": 128, "vcpus": 1,
            "kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.img"),
            "append": "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib=16",
            "disks": [{"size": 32 << 20, "provisioning": "thin"},
                      {"size": 8 << 20, "provisioning": "thin"}],
            "nics": [],
        })),
    );
    assert_eq!(s, 201, "{v}");
    let pid = bed.call_ok(0, "POST", "/v1/vms/vm4/start", None)["pid"].clone();
    wait_writes(&bed, 0, "vm4", 30);

    let id = relocate(&bed, 0, "vm4", json!({"datastore": "ds1"}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}\n{}", bed.log(0));
    let e = t["error"].as_str().unwrap_or("");
    assert!(
        e.contains("before the pivot failed") && e.contains("stays on its current disks"),
        "{t}"
    );
    assert!(
        bed.log(0).contains("failpoint pivot-flush-fails"),
        "{}",
        bed.log(0)
    );
    let vm = bed.call_ok(0, "GET", "/v1/vms/vm4", None);
    assert_eq!(vm["pid"], pid, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    for d in 0..2 {
        assert_eq!(vm["disks"][d]["datastore"], "ds0", "{vm}");
        let path = format!("/vm4/disk{d}");
        let t0 = Instant::now();
        while stat(&bed, 0, "ds1", &path).0 != 404 {
            assert!(t0.elapsed() < Duration::from_secs(30), "{path} left on ds1");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The guest goes on writing to its old disks, and after a restart without the
    // fault the same VM moves.
    wait_writes(&bed, 0, "vm4", writes_so_far(&bed, 0, "vm4") + 20);
    bed.signal(0, nix::sys::signal::Signal::SIGTERM);
    bed.env[0].clear();
    bed.start(0);
    let id = relocate(&bed, 0, "vm4", json!({"datastore": "ds1"}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "done", "{t}\n{}", bed.log(0));
    let vm = bed.call_ok(0, "GET", "/v1/vms/vm4", None);
    assert_eq!(vm["pid"], pid, "{vm}");
    assert_eq!(vm["disks"][0]["datastore"], "ds1", "{vm}");
    assert_eq!(vm["disks"][1]["datastore"], "ds1", "{vm}");
    wait_writes(&bed, 0, "vm4", writes_so_far(&bed, 0, "vm4") + 20);
    bed.call_ok(0, "POST", "/v1/vms/vm4/stop", Some(json!({"force": true})));
    let path = vm["disks"][0]["path"].as_str().unwrap().to_string();
    let acked = acked_of_run(&bed, 0, "vm4");
    let r = verify(&bed, 0, "ds1", &path, &acked, &[]);
    eprintln!(
        "{} acknowledged writes across a failed and a good move",
        r.acked
    );
    assert!(r.ok(), "{:?}", r.errors);
}

fn nbd_write(sock: &Path, export: &str, off: u64, data: &[u8]) {
    block_on(async {
        let c = nbd::NbdClient::connect_unix(sock, export).await.unwrap();
        c.write(off, data, WriteFlags::NONE).await.unwrap();
        c.flush().await.unwrap();
    });
}

#[test]
fn a_powered_off_vm_moves_with_conversion_and_per_disk_destinations_and_bad_requests_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::with_datastores(1, &["ds0", "ds1"], 256);
    bed.start(0);
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "cold", "datastore": "ds0", "memory_mib": 64, "kernel": "/nonexistent",
            "disks": [{"size": 32 << 20}, {"size": 16 << 20}],
        })),
    );
    assert_eq!(s, 201, "{v}");
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 | 1).collect();
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "w", "datastore": "ds0", "path": "/cold/disk0"})),
    );
    let sock = bed.hosts[0].nbd_socket();
    nbd_write(&sock, "w", 4 << 20, &data);
    bed.call_ok(0, "DELETE", "/v1/exports/w", None);
    // disk1 gets 3 MiB, so that a throttled copy of it takes a while.
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "w1", "datastore": "ds0", "path": "/cold/disk1"})),
    );
    nbd_write(&sock, "w1", 0, &data.repeat(3));
    bed.call_ok(0, "DELETE", "/v1/exports/w1", None);

    // Refusals name what is wrong and change nothing.
    for (body, needle) in [
        (json!({"datastore": "nope"}), "nope"),
        (json!({"disks": {"disk9": "ds1"}}), "disk9"),
        (json!({"datastore": "ds0"}), "nothing to relocate"),
        (json!({"datastore": "ds1", "disk_format": "fat"}), "fat"),
        (
            json!({"datastore": "ds1", "host": "elsewhere"}),
            "elsewhere",
        ),
    ] {
        let (s, v) = bed.call(0, "POST", "/v1/vms/cold/relocate", Some(body.clone()));
        assert!((400..500).contains(&s), "{body}: {s} {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    // A disk someone else has open (here a read-only export: a shared lock) is refused.
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "ro", "datastore": "ds0", "path": "/cold/disk0", "read_only": true})),
    );
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/cold/relocate",
        Some(json!({"datastore": "ds1"})),
    );
    let failed = if s == 202 {
        wait_task(&bed, 0, v["id"].as_u64().unwrap(), Duration::from_secs(60))
    } else {
        v
    };
    assert!(
        failed.to_string().contains("more than one user"),
        "{failed}"
    );
    bed.call_ok(0, "DELETE", "/v1/exports/ro", None);
    assert_eq!(
        stat(&bed, 0, "ds1", "/cold/disk0").0,
        404,
        "a failed relocation left its target"
    );

    // Cancelled while it copies: the VM stays where it was, the new files are gone.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/cold/relocate",
        Some(json!({"datastore": "ds1", "speed": 256 << 10})),
    );
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let v = bed.call_ok(0, "GET", &format!("/v1/tasks/{id}"), None);
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["progress"]["total_bytes"].as_u64().unwrap() > 0, "{v}");
    bed.call_ok(0, "POST", &format!("/v1/tasks/{id}/cancel"), None);
    let v = wait_task(&bed, 0, id, Duration::from_secs(30));
    assert_eq!(v["state"], "cancelled", "{v}");
    let vm = bed.call_ok(0, "GET", "/v1/vms/cold", None);
    assert_eq!(vm["datastore"], "ds0", "{vm}");
    assert_eq!(vm["disks"][0]["datastore"], "ds0", "{vm}");
    for p in ["/cold/disk0", "/cold/disk1", "/cold/vm.toml"] {
        assert_eq!(
            stat(&bed, 0, "ds1", p).0,
            404,
            "a cancelled relocation left ds1:{p}"
        );
    }

    // Through the CLI: definition and disk0 to ds1, disk1 stays on ds0; both eager-thick.
    let out = Command::new(ferry_bin())
        .args([
            "relocate-vm",
            "cold",
            "--datastore",
            "ds1",
            "--disk",
            "disk1=ds0",
            "--disk-format",
            "eager-thick",
            "--agent",
        ])
        .arg(bed.hosts[0].control_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("powered off") && text.contains("disk0"),
        "{text}"
    );
    let vm = bed.call_ok(0, "GET", "/v1/vms/cold", None);
    assert_eq!(vm["datastore"], "ds1", "{vm}");
    assert_eq!(vm["state"], "stopped", "{vm}");
    let d0 = &vm["disks"][0];
    let d1 = &vm["disks"][1];
    assert_eq!(
        (d0["datastore"].as_str(), d0["provisioning"].as_str()),
        (Some("ds1"), Some("eager-thick")),
        "{vm}"
    );
    assert_eq!(
        (d1["datastore"].as_str(), d1["provisioning"].as_str()),
        (Some("ds0"), Some("eager-thick")),
        "{vm}"
    );
    let p1 = d1["path"].as_str().unwrap();
    assert_ne!(
        p1, "/cold/disk1",
        "a converted disk on the same datastore gets a new file"
    );
    for (ds, p, size) in [("ds1", "/cold/disk0", 32u64 << 20), ("ds0", p1, 16 << 20)] {
        let (s, st) = stat(&bed, 0, ds, p);
        assert_eq!(s, 200, "{ds}:{p} {st}");
        assert!(
            st["allocated_bytes"].as_u64().unwrap() >= size,
            "{ds}:{p} not fully allocated: {st}"
        );
    }
    assert_eq!(stat(&bed, 0, "ds0", "/cold/disk0").0, 404);
    assert_eq!(stat(&bed, 0, "ds0", "/cold/disk1").0, 404);
    assert_eq!(stat(&bed, 0, "ds0", "/cold/vm.toml").0, 404);
    let back = |ds: &str, p: &str| {
        bed.call_ok(
            0,
            "POST",
            "/v1/exports",
            Some(json!({"name": "r", "datastore": ds, "path": p, "read_only": true})),
        );
        let b = read_export(&sock, "r", 0, 32 << 11).unwrap();
        bed.call_ok(0, "DELETE", "/v1/exports/r", None);
        b
    };
    let b = back("ds1", "/cold/disk0");
    assert_eq!(&b[4 << 20..(4 << 20) + data.len()], &data[..]);
    assert!(b[..4 << 20].iter().all(|x| *x == 0) && b[(5 << 20)..].iter().all(|x| *x == 0));

    // And back to thin on ds0: only the data is allocated.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/cold/relocate",
        Some(json!({"datastore": "ds0", "disk_format": "thin"})),
    );
    assert_eq!(s, 202, "{v}");
    let done = wait_task(&bed, 0, v["id"].as_u64().unwrap(), Duration::from_secs(60));
    assert_eq!(done["state"], "done", "{done}");
    let vm = bed.call_ok(0, "GET", "/v1/vms/cold", None);
    let p0 = vm["disks"][0]["path"].as_str().unwrap().to_string();
    let (_, st) = stat(&bed, 0, "ds0", &p0);
    let alloc = st["allocated_bytes"].as_u64().unwrap();
    assert!(
        alloc <= (1 << 20) + (1 << 20),
        "thin target allocated {alloc} bytes for 1 MiB of data"
    );
    assert_eq!(
        &back("ds0", &p0)[4 << 20..(4 << 20) + data.len()],
        &data[..]
    );
    assert_eq!(stat(&bed, 0, "ds1", "/cold/vm.toml").0, 404);
    bed.call_ok(0, "DELETE", "/v1/vms/cold", None);
}
