//! Live host relocation (vMotion) between hosts in network namespaces sharing one
//! datastore: a running test guest moved with every acknowledged write checked and its
//! pause measured; faults (cancel, the destination QEMU killed, a failure right after the
//! lock handoff) that must leave the VM running on its source with nothing lost.

use std::time::{Duration, Instant};

use ferry_guest::{check, Phase};
use ferry_tests::agents::{in_netns, read_export, AgentBed};
use ferry_tests::cluster::SERIAL;
use ferry_tests::vms::{
    acked, create_vm, create_vm_with, guest_now, more_writes, relocate, vm_on, wait_done,
    wait_task, wait_writes,
};
use serde_json::json;

/// Every acknowledged write on the VM's disk, read through host `i`.
fn verify(bed: &AgentBed, i: usize, vm: &str, phases: &[Phase]) -> ferry_guest::Report {
    bed.call_ok(
        i,
        "POST",
        "/v1/exports",
        Some(json!({"name": "verify", "datastore": "ds0", "path": format!("/{vm}/disk0"), "read_only": true})),
    );
    let sock = bed.hosts[i].nbd_socket();
    let r = check(&acked(bed, vm), phases, |f, n| {
        read_export(&sock, "verify", f, n)
    });
    bed.call_ok(i, "DELETE", "/v1/exports/verify", None);
    r
}

/// What host `i` still has of `vm` (a running VM, an export, a QEMU), if anything.
fn leftovers(bed: &AgentBed, i: usize, vm: &str) -> Option<String> {
    let v = vm_on(bed, i, vm);
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
    None
}

/// The destination has nothing of `vm` left: no QEMU, no export.
fn no_leftovers(bed: &AgentBed, i: usize, vm: &str) {
    if let Some(l) = leftovers(bed, i, vm) {
        panic!("{l}");
    }
}

fn eventually_no_leftovers(bed: &AgentBed, i: usize, vm: &str) {
    let t0 = Instant::now();
    while let Some(l) = leftovers(bed, i, vm) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{l}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_running_vm_moves_live_to_another_host_and_loses_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0"], 256);
    bed.start(0);
    bed.start(1);
    create_vm(&bed, 0, "mig1", 32, json!([]));
    let pid0 = bed.call_ok(0, "POST", "/v1/vms/mig1/start", None)["pid"]
        .as_u64()
        .unwrap();
    wait_writes(&bed, 0, "mig1", 40);
    // Refused before anything changes: an unknown host.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/vms/mig1/relocate",
        Some(json!({"host": "nohost"})),
    );
    assert!((400..500).contains(&s), "{v}");
    assert!(v["error"].as_str().unwrap().contains("nohost"), "{v}");

    let g_start = guest_now(&bed, "mig1");
    let id = relocate(&bed, 0, "mig1", json!({"host": bed.hosts[1].name}));
    let done = wait_done(&bed, 0, id);
    let g_end = guest_now(&bed, "mig1");
    let res = &done["result"];
    eprintln!("host relocation: {res}");
    let pause = res["pause_ms"].as_f64().unwrap();
    assert!(
        pause > 0.0 && pause < 1000.0,
        "guest-visible pause {pause} ms"
    );

    let v = vm_on(&bed, 1, "mig1");
    assert_eq!(v["state"], "running", "{v}");
    assert_ne!(v["pid"].as_u64().unwrap(), pid0);
    assert_eq!(vm_on(&bed, 0, "mig1")["state"], "running elsewhere");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid0}")).exists(),
        "the source QEMU still runs"
    );
    // (New writes, counted from now: the phase after the move needs 20 of its own,
    // while host 1's log also holds those written between its resume and `g_end`.)
    more_writes(&bed, "mig1", 30);
    // The VM's locks are with its new host now.
    let (s, v) = bed.call(0, "POST", "/v1/vms/mig1/start", None);
    assert_eq!(s, 409, "{v}");
    bed.call_ok(1, "POST", "/v1/vms/mig1/stop", Some(json!({"force": true})));
    let phases = [
        Phase {
            name: "before".into(),
            from_wall_ms: 0,
            to_wall_ms: g_start,
            min_writes: 20,
            min_overwrites: 1,
        },
        Phase {
            name: "during".into(),
            from_wall_ms: g_start,
            to_wall_ms: g_end,
            min_writes: 1,
            min_overwrites: 0,
        },
        Phase {
            name: "after".into(),
            from_wall_ms: g_end,
            to_wall_ms: u64::MAX,
            min_writes: 20,
            min_overwrites: 1,
        },
    ];
    let r = verify(&bed, 1, "mig1", &phases);
    // Powered off, a move to another host on the shared datastore moves nothing: it is
    // checked, and the VM then starts there.
    let id = relocate(&bed, 1, "mig1", json!({"host": bed.hosts[0].name}));
    let t = wait_done(&bed, 1, id);
    assert_eq!(t["result"]["running"], false, "{t}");
    assert!(
        t["result"]["note"]
            .as_str()
            .unwrap()
            .contains("starts there"),
        "{t}"
    );
    eprintln!(
        "{} acknowledged writes, phases {:?}, longest gap {} ms",
        r.acked, r.phases, r.longest_gap_ms
    );
    assert!(r.ok(), "{:?}", r.errors);
}

#[test]
fn a_failed_or_cancelled_host_relocation_leaves_the_vm_running_on_its_source() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(3, &["ds0"], 256);
    bed.start(0);
    bed.start(1);
    bed.start(2);
    create_vm(&bed, 0, "mig2", 32, json!([]));
    let pid0 = bed.call_ok(0, "POST", "/v1/vms/mig2/start", None)["pid"].clone();
    wait_writes(&bed, 0, "mig2", 30);
    let h1 = bed.hosts[1].name.clone();
    let slow = json!({"host": h1, "bandwidth": 1 << 20});

    // Cancelled mid-migration; meanwhile the destination refuses to start it.
    let id = relocate(&bed, 0, "mig2", slow.clone());
    std::thread::sleep(Duration::from_secs(2));
    let (s, v) = bed.call(1, "POST", "/v1/vms/mig2/start", None);
    assert!(
        s >= 400,
        "started on the destination during its relocation: {v}"
    );
    // ...and so does a third host.
    let (s, v) = bed.call(2, "POST", "/v1/vms/mig2/start", None);
    assert!(
        s >= 400,
        "started on a third host during its relocation: {v}"
    );
    bed.call_ok(0, "POST", &format!("/v1/tasks/{id}/cancel"), None);
    let t = wait_task(&bed, 0, id, Duration::from_secs(60));
    assert_ne!(t["state"], "done", "{t}");
    assert_eq!(vm_on(&bed, 0, "mig2")["pid"], pid0);
    no_leftovers(&bed, 1, "mig2");
    more_writes(&bed, "mig2", 20);

    // The destination's QEMU dies mid-migration.
    let id = relocate(&bed, 0, "mig2", slow.clone());
    std::thread::sleep(Duration::from_secs(2));
    let pid = std::fs::read_to_string(bed.hosts[1].run_dir.join("vms/mig2/pid")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.trim().parse().unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = wait_task(&bed, 0, id, Duration::from_secs(60));
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(vm_on(&bed, 0, "mig2")["pid"], pid0);
    no_leftovers(&bed, 1, "mig2");
    more_writes(&bed, "mig2", 20);

    // The destination agent is killed mid-migration: the move fails before any lock is
    // handed; restarted, the agent removes the QEMU left waiting.
    let id = relocate(&bed, 0, "mig2", slow.clone());
    std::thread::sleep(Duration::from_secs(2));
    bed.signal(1, nix::sys::signal::Signal::SIGKILL);
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(vm_on(&bed, 0, "mig2")["pid"], pid0);
    more_writes(&bed, "mig2", 20);
    bed.start(1);
    eventually_no_leftovers(&bed, 1, "mig2");

    // The link between the hosts is cut mid-migration: the source gives up after its
    // timeout and goes on; once the link is back, the destination is cleaned.
    let id = relocate(
        &bed,
        0,
        "mig2",
        json!({"host": h1, "bandwidth": 1 << 20, "timeout_s": 6}),
    );
    std::thread::sleep(Duration::from_secs(2));
    bed.link(1, false);
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(vm_on(&bed, 0, "mig2")["pid"], pid0);
    more_writes(&bed, "mig2", 20);
    bed.link(1, true);
    eventually_no_leftovers(&bed, 1, "mig2");

    // A failure right after the locks were handed over: they come back.
    bed.signal(0, nix::sys::signal::Signal::SIGTERM);
    bed.env[0] = vec![("FERRY_FAILPOINTS".into(), "migrate-after-handoff".into())];
    bed.start(0);
    let id = relocate(&bed, 0, "mig2", json!({"host": h1}));
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["error"].as_str().unwrap().contains("stays on host"),
        "{t}"
    );
    assert_eq!(vm_on(&bed, 0, "mig2")["pid"], pid0);
    no_leftovers(&bed, 1, "mig2");
    more_writes(&bed, "mig2", 20);
    let (s, v) = bed.call(1, "POST", "/v1/vms/mig2/start", None);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains(&bed.hosts[0].name),
        "the locks did not come back: {v}"
    );

    bed.call_ok(0, "POST", "/v1/vms/mig2/stop", Some(json!({"force": true})));
    let r = verify(&bed, 0, "mig2", &[]);
    eprintln!(
        "{} acknowledged writes through five failed relocations, longest gap {} ms",
        r.acked, r.longest_gap_ms
    );
    assert!(r.ok(), "{:?}", r.errors);
}

/// Captures RARP frames from `mac` on `dev` inside namespace `ns` until `stop` is set
/// (returns how many were seen).
fn rarp_capture(
    ns: &str,
    dev: &'static str,
    mac: [u8; 6],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let ns = ns.to_string();
    // The socket is made inside the namespace; reading it may happen anywhere.
    let fd = in_netns(&ns, move || {
        // SAFETY: plain socket/bind/setsockopt calls on a descriptor this closure owns;
        // the structures passed are initialised and outlive the calls.
        unsafe {
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(dev).unwrap();
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert!(ifindex > 0, "no {dev} in the namespace");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto as u16;
            sll.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
            fd
        }
    });
    std::thread::spawn(move || {
        let mut seen = 0;
        let mut buf = [0u8; 2048];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: reads into a buffer we own, of the length given.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n >= 14 && buf[12..14] == [0x80, 0x35] && buf[6..12] == mac {
                seen += 1;
            }
        }
        // SAFETY: closes the descriptor this thread owns.
        unsafe { libc::close(fd) };
        seen
    })
}

#[test]
fn the_vm_keeps_its_mac_and_its_tcp_connections_across_hosts() {
    use std::io::{Read, Write};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0"], 256);
    bed.start(0);
    bed.start(1);
    let net = bed.net.as_ref().unwrap();
    let guest_ip = format!("{}.50", net.prefix);
    let mac = [0x52, 0x54, 0x00, 0x5e, 0x00, 0x01];
    create_vm_with(
        &bed,
        0,
        "net1",
        32,
        json!([{"mac": "52:54:00:5e:00:01", "bridge": "br0"}]),
        &format!("ferry.ip={guest_ip}/24 ferry.echo_port=7"),
    );
    bed.call_ok(0, "POST", "/v1/vms/net1/start", None);
    wait_writes(&bed, 0, "net1", 20);
    // An outside client connects to the guest's echo server and keeps the connection.
    let addr = format!("{guest_ip}:7");
    let t0 = Instant::now();
    let mut conn = loop {
        let a = addr.clone();
        match in_netns(&net.client_ns, move || {
            std::net::TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_secs(2))
        }) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "cannot reach the guest at {addr}: {e}"
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut round = |msg: &str| {
        conn.write_all(msg.as_bytes()).unwrap();
        let mut b = vec![0u8; msg.len()];
        conn.read_exact(&mut b).unwrap();
        assert_eq!(String::from_utf8_lossy(&b), msg);
    };
    round("before the move\n");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cap = rarp_capture(&net.ns[1], "br0", mac, stop.clone());
    let id = relocate(&bed, 0, "net1", json!({"host": bed.hosts[1].name}));
    wait_done(&bed, 0, id);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rarps = cap.join().unwrap();
    eprintln!("{rarps} RARP frames from the VM's MAC on the destination bridge");
    assert!(rarps > 0, "the destination did not announce the VM's MAC");
    // The same TCP connection still works, now to the guest on the other host.
    round("after the move\n");
    assert_eq!(vm_on(&bed, 1, "net1")["state"], "running");
    bed.call_ok(1, "POST", "/v1/vms/net1/stop", Some(json!({"force": true})));
}

#[test]
fn a_migration_that_does_not_converge_ends_cleanly() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut bed = AgentBed::networked(2, &["ds0"], 256);
    bed.start(0);
    bed.start(1);
    // The guest keeps 24 MiB of memory dirty; the link is limited to 1 MiB/s.
    create_vm_with(&bed, 0, "busy", 32, json!([]), "ferry.dirty_mib=24");
    let pid0 = bed.call_ok(0, "POST", "/v1/vms/busy/start", None)["pid"].clone();
    wait_writes(&bed, 0, "busy", 20);
    let id = relocate(
        &bed,
        0,
        "busy",
        json!({"host": bed.hosts[1].name, "bandwidth": 1 << 20, "timeout_s": 12}),
    );
    let t = wait_task(&bed, 0, id, Duration::from_secs(120));
    eprintln!("non-converging migration: {t}");
    for h in &bed.hosts {
        eprintln!(
            "{}: qemu.log: {}",
            h.name,
            std::fs::read_to_string(h.run_dir.join("vms/busy/qemu.log")).unwrap_or_default()
        );
    }
    match t["state"].as_str() {
        // Auto-converge slowed the guest enough: it moved.
        Some("done") => {
            assert_eq!(vm_on(&bed, 1, "busy")["state"], "running");
            eventually_no_leftovers(&bed, 0, "busy");
        }
        // Or it gave up: the VM stays, nothing is left behind.
        _ => {
            assert!(
                t["error"].as_str().unwrap().contains("did not converge"),
                "{t}"
            );
            assert_eq!(vm_on(&bed, 0, "busy")["pid"], pid0);
            no_leftovers(&bed, 1, "busy");
            more_writes(&bed, "busy", 10);
        }
    }
}
