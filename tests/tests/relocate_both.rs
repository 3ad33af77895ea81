//! Host + storage at once (the full `relocate-vm --host H --datastore DS`): a running
//! test guest moved to another host and datastore in one live operation — where both
//! hosts see the new datastore, where only the destination does (no shared storage for
//! the disks), with two disks on two datastores and the definition on a third — every
//! acknowledged write checked on the new disks; a powered-off VM moved the same ways
//! (over NBD when its host does not see the new datastores); then faults at each phase that must
//! leave the VM running on its source with no target file, export, lock or QEMU left.

use std::time::{Duration, Instant};

use ferry_guest::{check, Phase};
use ferry_tests::agents::{read_export, AgentBed};
use ferry_tests::cluster::SERIAL;
use ferry_tests::vms::{
    acked, create_vm, guest_now, more_writes, relocate, vm_on, wait_done, wait_task, wait_writes,
};
use serde_json::{json, Value};

fn stat(bed: &AgentBed, i: usize, ds: &str, path: &str) -> u16 {
    bed.call(
        i,
        "GET",
        &format!("/v1/datastores/{ds}/stat?path={path}"),
        None,
    )
    .0
}

/// Checks every acknowledged write against `ds:path`, read through host `i`.
fn verify(bed: &AgentBed, i: usize, vm: &str, at: &str, phases: &[Phase]) -> ferry_guest::Report {
    let (ds, path) = at.split_once(':').expect("DS:PATH");
    bed.call_ok(
        i,
        "POST",
        "/v1/exports",
        Some(json!({"name": "verify", "datastore": ds, "path": path, "read_only": true})),
    );
    let sock = bed.hosts[i].nbd_socket();
    let r = check(&acked(bed, vm), phases, |f, n| {
        read_export(&sock, "verify", f, n)
    });
    bed.call_ok(i, "DELETE", "/v1/exports/verify", None);
    eprintln!(
        "{vm}: {} acknowledged writes checked on {at}, phases {:?}, longest gap {} ms",
        r.acked, r.phases, r.longest_gap_ms
    );
    r
}

/// Runs one qemu-io command against an NBD URL; it must succeed (a read with `-P`
/// checks the pattern).
fn qemu_io(url: &str, cmd: &str) {
    let ro = if cmd.starts_with("read") { "-r" } else { "-n" };
    let out = std::process::Command::new("qemu-io")
        .args([ro, "-f", "raw", "-c", cmd, url])
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io {cmd} {url}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn phases(start: u64, end: u64) -> Vec<Phase> {
    vec![
        Phase {
            name: "before".into(),
            from_wall_ms: 0,
            to_wall_ms: start,
            min_writes: 20,
            min_overwrites: 1,
        },
        Phase {
            name: "during".into(),
            from_wall_ms: start,
            to_wall_ms: end,
            min_writes: 1,
            min_overwrites: 0,
        },
        Phase {
            name: "after".into(),
            from_wall_ms: end,
            to_wall_ms: u64::MAX,
            min_writes: 20,
            min_overwrites: 1,
        },
    ]
}

/// Where a finished relocation put disk `n` (`DS:PATH`).
fn moved_to(done: &Value, n: usize) -> String {
    done["result"]["disks"][n]["to"]
        .as_str()
        .unwrap_or_else(|| panic!("no disk {n} in {done}"))
        .to_string()
}

/// Waits until relocation task `id` on host `i` is at `stage`.
fn wait_stage(bed: &AgentBed, i: usize, id: u64, stage: &str) {
    let t0 = Instant::now();
    loop {
        let t = bed.call_ok(i, "GET", &format!("/v1/tasks/{id}"), None);
        if t["stage"] == stage {
            return;
        }
        assert_eq!(t["state"], "running", "never reached {stage}: {t}");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never reached {stage}: {t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What destination host `i` still has of `vm`'s move to `ds`, if anything.
fn leftovers(bed: &AgentBed, i: usize, vm: &str, ds: &str) -> Option<String> {
    // (404: the host sees no definition of it.)
    let (_, v) = bed.call(i, "GET", &format!("/v1/vms/{vm}"), None);
    if v["state"] == "running" || v["state"] == "incoming" {
        return Some(format!("host {i} runs {vm}: {v}"));
    }
    let ex = bed.call_ok(i, "GET", "/v1/exports", None);
    if ex.to_string().contains(&format!("{vm}-disk0")) {
        return Some(format!("host {i} still exports {vm}: {ex}"));
    }
    let cg = bed.hosts[i].cgroup().join(format!("vm-{vm}"));
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        return Some(format!("host {i} still runs QEMU for {vm}: {procs}"));
    }
    let files = bed.call(
        i,
        "GET",
        &format!("/v1/datastores/{ds}/files?path=/{vm}"),
        None,
    );
    if files.0 != 404 {
        return Some(format!("{ds} still holds /{vm}: {}", files.1));
    }
    None
}

fn eventually_no_leftovers(bed: &AgentBed, i: usize, vm: &str, ds: &str) {
    let t0 = Instant::now();
    while let Some(l) = leftovers(bed, i, vm, ds) {
        assert!(t0.elapsed() < Duration::from_secs(90), "{l}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_running_vm_moves_to_another_host_and_datastore_at_once_and_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "both1", 64, json!([]));
    bed.call_ok(0, "POST", "/v1/vms/both1/start", None);
    wait_writes(&bed, 0, "both1", 40);
    let (h0, h1) = (bed.hosts[0].name.clone(), bed.hosts[1].name.clone());

    let g_start = guest_now(&bed, "both1");
    let id = relocate(&bed, 0, "both1", json!({"host": h1, "datastore": "ds1"}));
    let done = wait_done(&bed, 0, id);
    eprintln!("host + storage relocation: {}", done["result"]);
    let res = &done["result"];
    let pause = res["pause_ms"].as_f64().unwrap();
    assert!(
        pause > 0.0 && pause < 1000.0,
        "guest-visible pause {pause} ms"
    );
    assert!(res["copied_bytes"].as_u64().unwrap() > 0, "{res}");
    let at = moved_to(&done, 0);
    assert!(at.starts_with("ds1:"), "{at}");
    assert_eq!(vm_on(&bed, 1, "both1")["state"], "running");
    assert_eq!(stat(&bed, 1, "ds1", "/both1/vm.toml"), 200);
    assert_eq!(stat(&bed, 0, "ds0", "/both1/disk0"), 404, "old disk left");
    assert_eq!(
        stat(&bed, 0, "ds0", "/both1/vm.toml"),
        404,
        "old definition left"
    );
    more_writes(&bed, "both1", 20);

    // Right back to where it came from.
    let id = relocate(&bed, 1, "both1", json!({"host": h0, "datastore": "ds0"}));
    let back = wait_done(&bed, 1, id);
    let g_end = guest_now(&bed, "both1");
    let home = moved_to(&back, 0);
    assert!(home.starts_with("ds0:"), "{home}");
    assert_eq!(vm_on(&bed, 0, "both1")["state"], "running");
    assert_eq!(stat(&bed, 0, "ds1", "/both1/vm.toml"), 404);
    let (ds, path) = at.split_once(':').unwrap();
    assert_eq!(stat(&bed, 1, ds, path), 404, "{at} left behind");
    more_writes(&bed, "both1", 25);
    bed.call_ok(
        0,
        "POST",
        "/v1/vms/both1/stop",
        Some(json!({"force": true})),
    );
    let r = verify(&bed, 0, "both1", &home, &phases(g_start, g_end));
    assert!(r.ok(), "{:?}", r.errors);
}

#[test]
fn without_shared_storage_two_disks_go_to_two_datastores_and_the_definition_to_a_third() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1", "ds2", "ds3"], 256);
    // The source sees only ds0 (which both hosts share for their heartbeats).
    for l in ["ds1", "ds2", "ds3"] {
        bed.hide(0, l);
    }
    bed.start(0);
    bed.start(1);
    let g = ferry_tests::agents::guest_dir();
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "both2", "datastore": "ds0", "memory_mib": 128, "vcpus": 1,
            "kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.img"),
            "append": "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib=24",
            "disks": [{"size": 48 << 20, "provisioning": "thin"},
                      {"size": 16 << 20, "provisioning": "thin"}],
            "nics": [],
        })),
    );
    assert_eq!(s, 201, "{v}");
    let (h0, h1) = (bed.hosts[0].name.clone(), bed.hosts[1].name.clone());
    // Powered off first: some data in disk0, then moved to host 1's datastores (which
    // host 0 does not see: copied over NBD), and back (host 1 sees ds0 too).
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "w", "datastore": "ds0", "path": "/both2/disk0"})),
    );
    let url = |i: usize, e: &str| {
        format!(
            "nbd+unix:///{e}?socket={}",
            bed.hosts[i].nbd_socket().display()
        )
    };
    qemu_io(&url(0, "w"), "write -P 0x5c 40M 3M");
    bed.call_ok(0, "DELETE", "/v1/exports/w", None);
    let id = relocate(
        &bed,
        0,
        "both2",
        json!({"host": h1, "datastore": "ds3", "disks": {"disk0": "ds1", "disk1": "ds2"}}),
    );
    let cold = wait_done(&bed, 0, id);
    eprintln!("powered-off, shared-nothing: {}", cold["result"]);
    assert_eq!(cold["result"]["running"], false);
    let c0 = moved_to(&cold, 0);
    assert!(c0.starts_with("ds1:"), "{c0}");
    for f in ["/both2/disk0", "/both2/disk1", "/both2/vm.toml"] {
        assert_eq!(stat(&bed, 0, "ds0", f), 404, "{f} left on the source");
    }
    assert_eq!(stat(&bed, 1, "ds3", "/both2/vm.toml"), 200);
    let (ds, path) = c0.split_once(':').unwrap();
    bed.call_ok(
        1,
        "POST",
        "/v1/exports",
        Some(json!({"name": "r", "datastore": ds, "path": path, "read_only": true})),
    );
    qemu_io(&url(1, "r"), "read -P 0x5c 40M 3M");
    qemu_io(&url(1, "r"), "read -P 0 0 40M");
    bed.call_ok(1, "DELETE", "/v1/exports/r", None);
    let id = relocate(&bed, 1, "both2", json!({"host": h0, "datastore": "ds0"}));
    let back = wait_done(&bed, 1, id);
    assert!(moved_to(&back, 0).starts_with("ds0:"), "{back}");
    assert_eq!(stat(&bed, 1, "ds3", "/both2/vm.toml"), 404);

    bed.call_ok(0, "POST", "/v1/vms/both2/start", None);
    wait_writes(&bed, 0, "both2", 40);
    // The source itself cannot use those datastores.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/both2/relocate",
        Some(json!({"datastore": "ds1"})),
    );
    assert!((400..500).contains(&s), "{v}");

    let g_start = guest_now(&bed, "both2");
    let id = relocate(
        &bed,
        0,
        "both2",
        json!({"host": h1, "datastore": "ds3",
               "disks": {"disk0": "ds1", "disk1": "ds2"}, "disk_format": "eager-thick"}),
    );
    let done = wait_done(&bed, 0, id);
    let g_end = guest_now(&bed, "both2");
    eprintln!("shared-nothing relocation: {}", done["result"]);
    let d0 = moved_to(&done, 0);
    let d1 = moved_to(&done, 1);
    assert!(
        d0.starts_with("ds1:") && d1.starts_with("ds2:"),
        "{d0} {d1}"
    );
    assert_eq!(done["result"]["datastore"], "ds3");
    assert_eq!(stat(&bed, 1, "ds3", "/both2/vm.toml"), 200);
    for f in ["/both2/disk0", "/both2/disk1", "/both2/vm.toml"] {
        assert_eq!(stat(&bed, 0, "ds0", f), 404, "{f} left on the source");
    }
    let v = vm_on(&bed, 1, "both2");
    assert_eq!(v["state"], "running", "{v}");
    more_writes(&bed, "both2", 25);
    bed.call_ok(
        1,
        "POST",
        "/v1/vms/both2/stop",
        Some(json!({"force": true})),
    );
    let r = verify(&bed, 1, "both2", &d0, &phases(g_start, g_end));
    assert!(r.ok(), "{:?}", r.errors);
}

#[test]
fn a_failed_host_and_storage_move_leaves_the_vm_on_its_source_and_nothing_behind() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.hide(0, "ds1");
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "both3", 64, json!([]));
    let pid0 = bed.call_ok(0, "POST", "/v1/vms/both3/start", None)["pid"].clone();
    wait_writes(&bed, 0, "both3", 30);
    let h1 = bed.hosts[1].name.clone();
    let stays = |bed: &AgentBed, t: &Value| {
        assert_ne!(t["state"], "done", "{t}");
        assert_eq!(vm_on(bed, 0, "both3")["pid"], pid0, "{t}");
    };

    // The destination datastore is too full: refused before anything is made.
    bed.call_ok(
        1,
        "POST",
        "/v1/datastores/ds1/files",
        Some(json!({"path": "/filler", "size": 200 << 20, "provisioning": "lazy-thick"})),
    );
    let id = relocate(
        &bed,
        0,
        "both3",
        json!({"host": h1, "datastore": "ds1", "disk_format": "eager-thick"}),
    );
    let t = wait_task(&bed, 0, id, Duration::from_secs(60));
    stays(&bed, &t);
    assert!(t["error"].as_str().unwrap().contains("free"), "{t}");
    eventually_no_leftovers(&bed, 1, "both3", "ds1");
    bed.call_ok(1, "DELETE", "/v1/datastores/ds1/files?path=/filler", None);

    let copying = json!({"host": h1, "datastore": "ds1", "speed": 1 << 20, "timeout_s": 8});
    let migrating = json!({"host": h1, "datastore": "ds1", "bandwidth": 1 << 20, "timeout_s": 8});
    // Cancelled while the disk is copied, then while memory is.
    for (body, stage) in [
        (&copying, "copying disks"),
        (&migrating, "migrating memory"),
    ] {
        let id = relocate(&bed, 0, "both3", body.clone());
        wait_stage(&bed, 0, id, stage);
        std::thread::sleep(Duration::from_secs(1));
        bed.call_ok(0, "POST", &format!("/v1/tasks/{id}/cancel"), None);
        let t = wait_task(&bed, 0, id, Duration::from_secs(60));
        assert_eq!(t["state"], "cancelled", "{t}");
        stays(&bed, &t);
        eventually_no_leftovers(&bed, 1, "both3", "ds1");
        more_writes(&bed, "both3", 10);
    }

    // The link cut while the disk is copied, then while memory is: the source gives up
    // after its timeout; once the link is back the destination is cleaned.
    for (body, stage) in [
        (&copying, "copying disks"),
        (&migrating, "migrating memory"),
    ] {
        let id = relocate(&bed, 0, "both3", body.clone());
        wait_stage(&bed, 0, id, stage);
        bed.link(1, false);
        let t = wait_task(&bed, 0, id, Duration::from_secs(120));
        assert_eq!(t["state"], "failed", "{t}");
        stays(&bed, &t);
        more_writes(&bed, "both3", 10);
        bed.link(1, true);
        eventually_no_leftovers(&bed, 1, "both3", "ds1");
    }

    // The destination agent killed while the disk is copied; restarted, it deletes the
    // files it made.
    let id = relocate(&bed, 0, "both3", copying.clone());
    wait_stage(&bed, 0, id, "copying disks");
    std::thread::sleep(Duration::from_secs(1));
    bed.signal(1, nix::sys::signal::Signal::SIGKILL);
    let t = wait_task(&bed, 0, id, Duration::from_secs(150));
    assert_eq!(t["state"], "failed", "{t}");
    stays(&bed, &t);
    more_writes(&bed, "both3", 10);
    bed.start(1);
    eventually_no_leftovers(&bed, 1, "both3", "ds1");

    // After all that it still moves — and the source agent, killed right after the
    // destination committed, deletes the old files when it is back. Nothing was lost.
    bed.signal(0, nix::sys::signal::Signal::SIGTERM);
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "both-after-commit".into())];
    bed.start(0);
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/both3/relocate",
        Some(json!({"host": h1, "datastore": "ds1"})),
    );
    assert_eq!(s, 202, "{v}");
    bed.wait_exit(0, Duration::from_secs(120));
    let t0 = Instant::now();
    while vm_on(&bed, 1, "both3")["state"] != "running" {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", bed.log(1));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        stat(&bed, 1, "ds0", "/both3/disk0"),
        200,
        "deleted before the restart?"
    );
    bed.env[0].clear();
    bed.start(0);
    let t0 = Instant::now();
    while stat(&bed, 0, "ds0", "/both3/disk0") != 404
        || stat(&bed, 0, "ds0", "/both3/vm.toml") != 404
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "old files left:\n{}",
            bed.log(0)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    more_writes(&bed, "both3", 10);
    let d = &vm_on(&bed, 1, "both3")["disks"][0];
    let at = format!(
        "{}:{}",
        d["datastore"].as_str().unwrap(),
        d["path"].as_str().unwrap()
    );
    assert!(at.starts_with("ds1:"), "{at}");
    bed.call_ok(
        1,
        "POST",
        "/v1/vms/both3/stop",
        Some(json!({"force": true})),
    );
    let r = verify(&bed, 1, "both3", &at, &[]);
    assert!(r.ok(), "{:?}", r.errors);
}

/// Cancelling a move whose target hangs (the destination agent stopped mid-copy) never
/// holds up the guest on its source: the wait for the hung target requests happens after
/// the guest's I/O goes to its own disk again (it used to be held for up to four target
/// timeouts).
#[test]
fn cancelling_a_move_whose_target_hangs_never_holds_up_the_guest() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.hide(0, "ds1");
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "both5", 64, json!([]));
    bed.call_ok(0, "POST", "/v1/vms/both5/start", None);
    wait_writes(&bed, 0, "both5", 30);
    let h1 = bed.hosts[1].name.clone();
    let id = relocate(
        &bed,
        0,
        "both5",
        json!({"host": h1, "datastore": "ds1", "speed": 1 << 20, "timeout_s": 60}),
    );
    wait_stage(&bed, 0, id, "copying disks");
    std::thread::sleep(Duration::from_secs(2));
    let dest = Pid::from_raw(bed.hosts[1].pid().unwrap() as i32);
    kill(dest, Signal::SIGSTOP).unwrap();
    // The target hangs with copies and mirrored writes in flight to it.
    std::thread::sleep(Duration::from_millis(500));
    let start = acked(&bed, "both5").last().map_or(0, |a| a.wall_ms);
    bed.call_ok(0, "POST", &format!("/v1/tasks/{id}/cancel"), None);
    // The source gives up on the stopped destination by itself.
    let t = wait_task(&bed, 0, id, Duration::from_secs(150));
    assert_ne!(t["state"], "done", "{t}");
    more_writes(&bed, "both5", 20);
    kill(dest, Signal::SIGCONT).unwrap();
    more_writes(&bed, "both5", 10);
    // The longest pause of the guest's writes from the cancel on.
    let walls: Vec<u64> = acked(&bed, "both5")
        .iter()
        .map(|a| a.wall_ms)
        .filter(|&w| w >= start)
        .collect();
    let gap = walls.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!("longest pause of the guest's writes after the cancel: {gap} ms");
    assert!(
        gap < 4000,
        "the guest's writes paused {gap} ms while the move was cancelled"
    );
    bed.call_ok(
        0,
        "POST",
        "/v1/vms/both5/stop",
        Some(json!({"force": true})),
    );
    let r = verify(&bed, 0, "both5", "ds0:/both5/disk0", &[]);
    assert!(r.ok(), "{:?}", r.errors);
}

/// No QEMU of `vm` left in host `i`'s cgroup.
fn no_qemu(bed: &AgentBed, i: usize, vm: &str) -> bool {
    let cg = bed.hosts[i].cgroup().join(format!("vm-{vm}"));
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .trim()
        .is_empty()
}

/// The switchover's outcome in doubt, after the source's QEMU completed. First the
/// destination resumes the guest but its answer is lost: the source must not resume
/// (it did before), its QEMU quits and the old files go, since the committed
/// definition names the new ones. Then, moving back, the link is cut right after the
/// source's QEMU completed and before the destination hears `finish`: the task ends
/// `unknown` with the guest paused on the source; once the link is back, `task
/// resolve` asks again, the destination (which never resumed it) acknowledges, and the
/// guest resumes on the source. Each time it runs on exactly one host, and every
/// acknowledged write is on the disk it runs from.
#[test]
fn a_switchover_in_doubt_never_runs_the_guest_twice() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.hide(0, "ds1");
    bed.env[1] = vec![("FERRY_FAILPOINTS".into(), "finish-reply-lost".into())];
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "doubt", 64, json!([]));
    bed.call_ok(0, "POST", "/v1/vms/doubt/start", None);
    wait_writes(&bed, 0, "doubt", 30);
    let (h0, h1) = (bed.hosts[0].name.clone(), bed.hosts[1].name.clone());

    // The destination resumed; its answer is lost.
    let id = relocate(&bed, 0, "doubt", json!({"host": h1, "datastore": "ds1"}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(180));
    assert_eq!(t["state"], "done", "{t}\n{}", bed.log(0));
    assert!(
        t["result"]["note"]
            .as_str()
            .unwrap_or("")
            .contains("answer was lost"),
        "{t}"
    );
    assert_eq!(vm_on(&bed, 1, "doubt")["state"], "running");
    let t0 = Instant::now();
    while !no_qemu(&bed, 0, "doubt") || stat(&bed, 0, "ds0", "/doubt/disk0") != 404 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the source still runs QEMU or keeps its old disk:\n{}",
            bed.log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    more_writes(&bed, "doubt", 10);
    let d = &vm_on(&bed, 1, "doubt")["disks"][0];
    let at = format!(
        "{}:{}",
        d["datastore"].as_str().unwrap(),
        d["path"].as_str().unwrap()
    );
    assert!(at.starts_with("ds1:"), "{at}");

    // Back to host 0, with the link cut right after the source's QEMU completed.
    bed.signal(1, nix::sys::signal::Signal::SIGTERM); // (the VM keeps running)
    bed.env[1] = vec![(
        "FERRY_FAILPOINTS".into(),
        "switchover-hold-finish,finish-window-s=5,settle-window-s=3".into(),
    )];
    bed.start(1);
    let id = relocate(&bed, 1, "doubt", json!({"host": h0, "datastore": "ds0"}));
    let t0 = Instant::now();
    while !bed.log(1).contains("failpoint switchover-hold-finish") {
        assert!(t0.elapsed() < Duration::from_secs(180), "{}", bed.log(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the source's QEMU complete (it only waits for the device state to be sent).
    std::thread::sleep(Duration::from_secs(3));
    bed.link(1, false);
    std::fs::write(bed.hosts[1].run_dir.join("switchover.go"), "").unwrap();
    let t = wait_task(&bed, 1, id, Duration::from_secs(120));
    assert_eq!(t["state"], "unknown", "{t}\n{}", bed.log(1));
    assert!(
        t["error"].as_str().unwrap_or("").contains("task resolve"),
        "{t}"
    );
    // Paused on the source, not resumed on the destination: no write acknowledged.
    let n = acked(&bed, "doubt").len();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        acked(&bed, "doubt").len(),
        n,
        "the guest ran while in doubt"
    );
    let (_, v) = bed.call(0, "GET", "/v1/vms/doubt", None);
    assert_ne!(v["state"], "running", "{v}");
    // A resolve while the destination cannot be asked changes nothing.
    let (s, v) = bed.call(1, "POST", &format!("/v1/tasks/{id}/resolve"), None);
    assert_eq!(s, 409, "{v}");
    assert_eq!(
        acked(&bed, "doubt").len(),
        n,
        "the guest ran while in doubt"
    );
    bed.link(1, true);
    let v = bed.call_ok(1, "POST", &format!("/v1/tasks/{id}/resolve"), None);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["result"]["moved"], false, "{v}");
    more_writes(&bed, "doubt", 10);
    assert_eq!(vm_on(&bed, 1, "doubt")["state"], "running");
    eventually_no_leftovers(&bed, 0, "doubt", "ds0");
    assert!(no_qemu(&bed, 0, "doubt"));
    bed.call_ok(
        1,
        "POST",
        "/v1/vms/doubt/stop",
        Some(json!({"force": true})),
    );
    let r = verify(&bed, 1, "doubt", &at, &[]);
    assert!(r.ok(), "{:?}", r.errors);
}

/// A powered-off VM's move whose definition moves too, with the destination's answer
/// to `finish` lost after it committed: the source asks where the committed definition
/// is, and the move stands — the old files and definition go (before, the source kept
/// its old definition valid and the VM could be started from both). The definition
/// left behind before the commit is a tombstone that refuses to start the VM.
#[test]
fn a_cold_move_whose_answer_is_lost_after_the_commit_leaves_one_definition() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.hide(0, "ds1");
    bed.env[1] = vec![(
        "FERRY_FAILPOINTS".into(),
        "finish-reply-lost,incoming-prepare-hold".into(),
    )];
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "cold1", 32, json!([]));
    let h1 = bed.hosts[1].name.clone();
    let id = relocate(&bed, 0, "cold1", json!({"host": h1, "datastore": "ds1"}));
    // While the destination sets the move up (held before making its files), its VM
    // table still serves other calls (it was held for the whole setup).
    let t0 = Instant::now();
    while !bed.log(1).contains("failpoint incoming-prepare-hold") {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", bed.log(1));
        std::thread::sleep(Duration::from_millis(50));
    }
    let sock = bed.hosts[1].control_socket();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = ferry_tests::agents::call_unix(&sock, "GET", "/v1/vms", None);
        let _ = tx.send(r.0);
    });
    let answered = rx.recv_timeout(Duration::from_secs(3));
    std::fs::write(bed.hosts[1].run_dir.join("prepare.go"), "").unwrap();
    assert_eq!(
        answered.expect("GET /v1/vms waited for the incoming move's setup"),
        200
    );
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "done", "{t}\n{}", bed.log(0));
    assert_eq!(
        stat(&bed, 0, "ds0", "/cold1/vm.toml"),
        404,
        "the old definition stayed"
    );
    assert_eq!(
        stat(&bed, 0, "ds0", "/cold1/disk0"),
        404,
        "the old disk stayed"
    );
    let v = vm_on(&bed, 1, "cold1");
    assert_eq!(v["datastore"], "ds1", "{v}");
    assert_eq!(v["disks"][0]["datastore"], "ds1", "{v}");
    let (s, v) = bed.call(0, "POST", "/v1/vms/cold1/start", None);
    assert!(s >= 400, "the source started the moved VM: {v}");
}

/// A powered-off move whose destination commits late: the source's `finish` call times
/// out, and the definition there is not committed when the source asks. The source may
/// undo the move only if the destination accepts the abort — but the destination has
/// claimed the finish, so it refuses, and the task ends `outcome unknown` with the
/// tombstone kept. When the commit then lands, the definition it commits names files
/// that still exist (before the claim, the abort deleted them first).
#[test]
fn a_cold_move_committed_late_never_loses_the_files_its_definition_names() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0", "ds1"], 256);
    bed.hide(0, "ds1");
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "finish-window-s=3".into())];
    bed.env[1] = vec![("FERRY_FAILPOINTS".into(), "cold-finish-hold".into())];
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "cold2", 32, json!([]));
    let h1 = bed.hosts[1].name.clone();
    let id = relocate(&bed, 0, "cold2", json!({"host": h1, "datastore": "ds1"}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}\n{}", bed.log(0));
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("outcome unknown"),
        "{t}"
    );
    // The source's definition is a tombstone: the VM cannot start there.
    let (s, v) = bed.call(0, "POST", "/v1/vms/cold2/start", None);
    assert!(s >= 400, "the source started the VM it moved: {v}");
    // The destination's commit lands now.
    std::fs::write(bed.hosts[1].run_dir.join("cold-finish.go"), "").unwrap();
    let t0 = Instant::now();
    while !bed.log(1).contains("VM cold2: its files arrived here") {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", bed.log(1));
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = vm_on(&bed, 1, "cold2");
    assert_eq!(v["datastore"], "ds1", "{v}");
    for d in v["disks"].as_array().unwrap() {
        assert_eq!(d["datastore"], "ds1", "{v}");
        let path = d["path"].as_str().unwrap();
        assert_eq!(
            stat(&bed, 1, "ds1", path),
            200,
            "the committed definition names {path}, which the abort deleted"
        );
    }
}
