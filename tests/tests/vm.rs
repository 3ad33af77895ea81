//! VMs through the agent: the test guest defined in a datastore, started on one host
//! (TCG here), refused on a second host with the holder named, its QEMU crashing releases
//! its locks so the second host starts it, stopped; then every write the guest
//! acknowledged on the second host is on the disk. A whole host frozen past host_dead
//! (agent, watchdog and QEMU stopped together) loses the VM to another host, and once it
//! wakes nothing it sends lands and its processes end.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_guest::{check, parse_logs};
use ferry_tests::agents::{read_export, AgentBed};
use ferry_tests::cluster::SERIAL;
use ferry_tests::vms::{console, create_vm, state, verify_last_run, wait_writes};
use serde_json::json;

#[test]
fn a_vm_runs_on_one_host_at_a_time_and_a_crash_releases_it_to_another() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    let v = create_vm(&bed, 0, "vm1", 128, json!([{}]));
    assert_eq!(v["machine"], "pc-q35-7.2");
    assert!(v["nics"][0]["mac"]
        .as_str()
        .unwrap()
        .starts_with("52:54:00:"));
    // Field errors are named.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms",
        Some(json!({"name": "bad", "datastore": "ds0", "memory_mib": 256, "machine": "q35", "kernel": "/k"})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("`machine`"), "{v}");
    assert_eq!(state(&bed, 1, "vm1"), "stopped");

    let v = bed.call_ok(0, "POST", "/v1/vms/vm1/start", None);
    assert!(matches!(v["accel"].as_str(), Some("tcg" | "kvm")), "{v}");
    let pid = v["pid"].as_u64().unwrap() as i32;
    assert_eq!(state(&bed, 0, "vm1"), "running");
    // The second host is refused, told who runs it.
    let (s, v) = bed.call(1, "POST", "/v1/vms/vm1/start", None);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(&bed.hosts[0].name),
        "{v}"
    );
    assert_eq!(state(&bed, 1, "vm1"), "running elsewhere");
    let (s, _) = bed.call(1, "DELETE", "/v1/vms/vm1", None);
    assert_eq!(s, 409, "a running VM was removable");
    wait_writes(&bed, 0, "vm1", 30);

    // QEMU crashes: host 0 releases the VM's locks, host 1 can start it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    while state(&bed, 0, "vm1") != "stopped" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "host 0 never released vm1"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    bed.call_ok(1, "POST", "/v1/vms/vm1/start", None);
    wait_writes(&bed, 1, "vm1", 60);
    bed.call_ok(1, "POST", "/v1/vms/vm1/stop", Some(json!({"force": true})));
    assert_eq!(state(&bed, 1, "vm1"), "stopped");

    // Every write acknowledged on host 1 is on the disk.
    verify_last_run(&bed, 1, 0, "vm1", "ds0");
    bed.call_ok(0, "DELETE", "/v1/vms/vm1", None);
    let (s, _) = bed.call(1, "GET", "/v1/vms/vm1", None);
    assert_eq!(s, 404);
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_frozen_host_never_writes_after_another_host_took_its_vm_over() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "vm1", 128, json!([{}]));
    let v = bed.call_ok(0, "POST", "/v1/vms/vm1/start", None);
    let qemu = v["pid"].as_u64().unwrap() as i32;
    wait_writes(&bed, 0, "vm1", 30);
    // The whole host stops: agent, watchdog, QEMU.
    let frozen = bed.host_processes(0);
    assert!(frozen.contains(&qemu), "{frozen:?} lacks QEMU {qemu}");
    assert!(frozen.len() >= 3, "agent, watchdog and QEMU: {frozen:?}");
    for &p in &frozen {
        let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
    }
    // Host 1 sees host 0 dead, takes the VM's locks and runs it.
    let t0 = Instant::now();
    loop {
        let (s, v) = bed.call(1, "POST", "/v1/vms/vm1/start", None);
        if s == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "host 1 never took vm1 over: {s} {v}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("host 1 took vm1 over after {:?}", t0.elapsed());
    wait_writes(&bed, 1, "vm1", 60);
    // Host 0 wakes: its deadline is long past. Its guest goes on writing, but nothing
    // of it may land, and its processes end.
    for &p in &frozen {
        let _ = kill(Pid::from_raw(p), Signal::SIGCONT);
    }
    let t1 = Instant::now();
    while !frozen.iter().all(|&p| gone(p)) {
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "the woken host's processes still run: {:?}",
            frozen.iter().filter(|&&p| !gone(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Host 1 goes on writing for a while, then stops.
    std::thread::sleep(Duration::from_secs(5));
    bed.call_ok(1, "POST", "/v1/vms/vm1/stop", Some(json!({"force": true})));
    // Every write host 1's guest acknowledged is there: none of host 0's landed over it.
    verify_last_run(&bed, 1, 1, "vm1", "ds0");
}

/// An agent that finds its host lease lost (here: the agent alone was stopped past its
/// deadline, and its watchdog only reports) fences its VMs before it exits: it never
/// leaves a VM it served running.
#[test]
fn an_agent_that_lost_its_lease_fences_its_vms_before_it_exits() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(1);
    bed.env[0].push(("FERRY_FAILPOINTS".into(), "unsafe-no-fence".into()));
    bed.start(0);
    create_vm(&bed, 0, "vm1", 128, json!([{}]));
    let v = bed.call_ok(0, "POST", "/v1/vms/vm1/start", None);
    let qemu = v["pid"].as_u64().unwrap() as i32;
    wait_writes(&bed, 0, "vm1", 30);
    let agent = Pid::from_raw(bed.hosts[0].pid().unwrap() as i32);
    kill(agent, Signal::SIGSTOP).unwrap();
    // Past the deadline (test profile: fencing 8 s after the last renewal).
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        !gone(qemu),
        "nothing fenced the VM while its agent was stopped"
    );
    kill(agent, Signal::SIGCONT).unwrap();
    let st = bed.wait_exit(0, Duration::from_secs(30));
    assert!(gone(qemu), "the agent exited while its VM still ran");
    assert_eq!(st.code(), Some(1), "{st:?}");
    let log = bed.log(0);
    assert!(log.contains("host lease lost"), "{log}");
}

/// Deletes a bridge on drop.
struct Bridge(String);
impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn a_bridged_nic_joins_its_bridge_and_a_missing_bridge_is_a_clear_error() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(1);
    bed.start(0);
    let br = Bridge(format!("fybr{}", std::process::id() % 100_000));
    ferry_tests::run_ok("ip", &["link", "add", &br.0, "type", "bridge"]);
    for (name, bridge) in [("vmbr", br.0.as_str()), ("vmnobr", "fy-no-such-br")] {
        create_vm(
            &bed,
            0,
            name,
            16,
            json!([{"mac": "52:54:00:aa:bb:01", "bridge": bridge}]),
        );
    }
    bed.call_ok(0, "POST", "/v1/vms/vmbr/start", None);
    let out = ferry_tests::run_ok("ip", &["-o", "link", "show", "master", &br.0]);
    let tap = vm_glue::qemu::tap_name("vmbr", 0);
    assert!(out.contains(&tap), "{tap} is not on {}: {out}", br.0);
    bed.call_ok(0, "POST", "/v1/vms/vmbr/stop", Some(json!({"force": true})));
    let out = ferry_tests::run_ok("ip", &["-o", "link", "show", "master", &br.0]);
    assert!(!out.contains(&tap), "the tap outlived its VM: {out}");
    // No such bridge: the start fails naming it, and leaves nothing held.
    let (s, v) = bed.call(0, "POST", "/v1/vms/vmnobr/start", None);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("fy-no-such-br"),
        "{v}"
    );
    assert_eq!(state(&bed, 0, "vmnobr"), "stopped");
    bed.call_ok(0, "DELETE", "/v1/vms/vmnobr", None);
    let ex = bed.call_ok(0, "GET", "/v1/exports", None);
    assert_eq!(ex.as_array().unwrap().len(), 0, "{ex}");
}

#[test]
fn a_running_vm_rides_out_an_agent_restart_and_is_stopped_by_the_new_agent() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(1);
    bed.start(0);
    create_vm(&bed, 0, "vmr", 32, json!([]));
    let pid = bed.call_ok(0, "POST", "/v1/vms/vmr/start", None)["pid"]
        .as_u64()
        .unwrap();
    wait_writes(&bed, 0, "vmr", 20);
    bed.signal(0, nix::sys::signal::Signal::SIGKILL);
    bed.start(0);
    let v = bed.call_ok(0, "GET", "/v1/vms/vmr", None);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["pid"].as_u64(), Some(pid), "a different QEMU: {v}");
    // The guest kept writing through the restart (its disk reconnected).
    let n = console(&bed, 0, "vmr")
        .lines()
        .filter(|l| l.contains("FW "))
        .count();
    wait_writes(&bed, 0, "vmr", n + 50);
    bed.call_ok(0, "POST", "/v1/vms/vmr/stop", Some(json!({"force": true})));
    assert_eq!(state(&bed, 0, "vmr"), "stopped");
    let log = console(&bed, 0, "vmr");
    assert!(!log.contains("FERR"), "{log}");
    let acked = parse_logs(&[&log]);
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "c", "datastore": "ds0", "path": "/vmr/disk0", "read_only": true})),
    );
    let sock = bed.hosts[0].nbd_socket();
    let r = check(&acked, &[], |f, n| read_export(&sock, "c", f, n));
    eprintln!(
        "{} writes across the agent restart, longest gap {} ms",
        r.acked, r.longest_gap_ms
    );
    assert!(r.ok(), "{:?}", r.errors);
}

#[test]
fn a_dead_hosts_vm_is_fenced_and_then_started_on_another_host() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "vmd", 32, json!([]));
    // Started on host 1 through host 0's CLI: `ferry vm start --host`.
    let secret = bed.dir.path().join("secret");
    std::fs::write(&secret, ferry_tests::agents::SECRET).unwrap();
    let ferry = ferry_tests::cluster::ferry_bin();
    let sock = bed.hosts[0].control_socket();
    let out = ferry_tests::run_ok(
        ferry.to_str().unwrap(),
        &[
            "vm",
            "start",
            "vmd",
            "--host",
            &bed.hosts[1].name,
            "--agent",
            sock.to_str().unwrap(),
            "--secret-file",
            secret.to_str().unwrap(),
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["host"], bed.hosts[1].name.as_str(), "{v}");
    let pid = v["pid"].as_u64().unwrap() as i32;
    wait_writes(&bed, 1, "vmd", 20);
    // Host 1's agent dies and does not come back: its watchdog kills the VM, then host 0
    // sees host 1 dead, breaks the locks and starts the VM itself.
    bed.signal(1, nix::sys::signal::Signal::SIGKILL);
    bed.wait_host_state(0, 1, "dead", Duration::from_secs(60));
    let qemu_gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        });
    assert!(
        qemu_gone,
        "the dead host's QEMU still ran when it was seen dead"
    );
    bed.call_ok(0, "POST", "/v1/vms/vmd/start", None);
    wait_writes(&bed, 0, "vmd", 20);
    bed.call_ok(0, "POST", "/v1/vms/vmd/stop", Some(json!({"force": true})));
}
