//! Two `ferry agent` processes, each on its own loop device over one datastore image:
//! writable exports exclude each other, an inactive export holds writes until the lock
//! is handed to it, TCP needs the cluster secret, an agent killed and restarted in time
//! keeps its slot, locks and exports (a QEMU NBD client reconnects), one that is not
//! restarted is fenced and its files are taken over, and a host leaves cleanly.

use std::time::{Duration, Instant};

use diskfmt::{BlockDev, WriteFlags};
use ferry_tests::agents::{block_on, call_tcp, AgentBed, SECRET};
use ferry_tests::cluster::SERIAL;
use ferry_tests::pattern;
use nbd::NbdClient;
use nix::sys::signal::Signal;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Creates a thin file through host `i`'s agent.
fn create(bed: &AgentBed, i: usize, path: &str, size: u64) {
    let (s, v) = bed.call(
        i,
        "POST",
        "/v1/datastores/ds0/files",
        Some(json!({"path": path, "size": size, "provisioning": "thin"})),
    );
    assert_eq!(s, 201, "{v}");
}

fn export(
    bed: &AgentBed,
    i: usize,
    name: &str,
    path: &str,
    inactive: bool,
) -> (u16, serde_json::Value) {
    bed.call(
        i,
        "POST",
        "/v1/exports",
        Some(json!({"name": name, "datastore": "ds0", "path": path, "inactive": inactive})),
    )
}

/// Writes `data` at `off` and flushes, on a fresh connection.
fn write_flush(bed: &AgentBed, i: usize, name: &str, off: u64, data: &[u8]) {
    let sock = bed.hosts[i].nbd_socket();
    block_on(async {
        let c = NbdClient::connect_unix(&sock, name).await.expect("connect");
        c.write(off, data, WriteFlags::default())
            .await
            .expect("write");
        c.flush().await.expect("flush");
    });
}

fn read(bed: &AgentBed, i: usize, name: &str, off: u64, len: usize) -> Vec<u8> {
    let sock = bed.hosts[i].nbd_socket();
    block_on(async {
        let c = NbdClient::connect_unix(&sock, name).await.expect("connect");
        let mut buf = vec![0u8; len];
        c.read(off, &mut buf).await.expect("read");
        buf
    })
}

#[test]
fn a_writable_export_excludes_other_hosts_and_an_inactive_one_takes_over_by_handoff() {
    let _g = serial();
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    create(&bed, 0, "/f", 16 * MIB);
    create(&bed, 0, "/g", 16 * MIB);
    let (s, v) = export(&bed, 0, "f", "/f", false);
    assert_eq!(s, 201, "{v}");
    let lock_version = v["lock_version"].as_u64().expect("lock version");
    let data = pattern(1, 2 * MIB as usize);
    write_flush(&bed, 0, "f", 0, &data);

    // The other host cannot export it writable: the error names the holder.
    let (s, v) = export(&bed, 1, "f", "/f", false);
    assert_eq!(s, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("/f") && msg.contains("exclusive"), "{msg}");

    // Inactive: the handshake and reads are served without the lock.
    let (s, v) = export(&bed, 1, "f", "/f", true);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["active"], false);
    assert_eq!(read(&bed, 1, "f", 0, 2 * MIB as usize), data);

    // A write to it is held...
    let sock = bed.hosts[1].nbd_socket();
    let held = std::thread::spawn(move || {
        block_on(async {
            let c = NbdClient::connect_unix(&sock, "f").await.expect("connect");
            let t0 = Instant::now();
            let r = c
                .write(MIB, &pattern(2, 64 << 10), WriteFlags::default())
                .await;
            let r = match r {
                Ok(()) => c.flush().await,
                e => e,
            };
            (r.map_err(|e| e.to_string()), t0.elapsed())
        })
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !held.is_finished(),
        "a write to an inactive export completed"
    );
    // ...and a handoff with the wrong expected version is refused.
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/exports/f/deactivate",
        Some(json!({"handoff_to": bed.hosts[1].name, "expected_version": lock_version + 100})),
    );
    assert_eq!(s, 409, "{v}");
    let v = bed.call_ok(0, "GET", "/v1/exports/f", None);
    assert_eq!(
        v["active"], true,
        "a failed handoff left the export inactive: {v}"
    );

    // Deactivate on host 0, handing the lock to host 1, then activate there.
    let v = bed.call_ok(
        0,
        "POST",
        "/v1/exports/f/deactivate",
        Some(json!({"handoff_to": bed.hosts[1].name, "expected_version": lock_version})),
    );
    assert_eq!(v["active"], false);
    assert_eq!(v["handed_off_version"], lock_version + 1);
    let v = bed.call_ok(1, "POST", "/v1/exports/f/activate", None);
    assert_eq!(v["active"], true);
    let (r, waited) = held.join().unwrap();
    r.expect("the held write completes after the handoff");
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    let mut want = data.clone();
    want[MIB as usize..MIB as usize + (64 << 10)].copy_from_slice(&pattern(2, 64 << 10));
    assert_eq!(read(&bed, 1, "f", 0, 2 * MIB as usize), want);
    // Host 0 now holds nothing: its export holds writes, and it cannot activate.
    let (s, v) = bed.call(0, "POST", "/v1/exports/f/activate", None);
    assert_eq!(s, 409, "{v}");

    // A write held past the write hold (5 s in the test profile) fails with EIO.
    let (s, v) = export(&bed, 1, "g", "/g", true);
    assert_eq!(s, 201, "{v}");
    let sock = bed.hosts[1].nbd_socket();
    let (r, took) = block_on(async {
        let c = NbdClient::connect_unix(&sock, "g").await.expect("connect");
        let t0 = Instant::now();
        let r = c.write(0, &[7u8; 4096], WriteFlags::default()).await;
        (r, t0.elapsed())
    });
    assert!(r.is_err(), "a write to a never-activated export succeeded");
    assert!(took >= Duration::from_secs(4), "{took:?}: {r:?}");

    // Removing the export releases the lock: host 0 can export it writable again.
    bed.call_ok(1, "DELETE", "/v1/exports/f", None);
    bed.call_ok(0, "DELETE", "/v1/exports/f", None);
    let (s, v) = export(&bed, 0, "f2", "/f", false);
    assert_eq!(s, 201, "{v}");
}

#[test]
fn tcp_control_calls_and_tcp_exports_need_the_cluster_secret() {
    let _g = serial();
    let mut bed = AgentBed::new(1);
    bed.start(0);
    let mgmt = bed.hosts[0].mgmt.clone();
    let (s, v) = call_tcp(&mgmt, None, "GET", "/v1/host", None);
    assert_eq!(s, 401, "{v}");
    let (s, _) = call_tcp(
        &mgmt,
        Some("not-the-secret-at-all"),
        "GET",
        "/v1/host",
        None,
    );
    assert_eq!(s, 401);
    let (s, v) = call_tcp(&mgmt, Some(SECRET), "GET", "/v1/host", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], bed.hosts[0].name.as_str());

    create(&bed, 0, "/t", 8 * MIB);
    let (s, v) = export(&bed, 0, "t", "/t", false);
    assert_eq!(s, 201, "{v}");
    let tcp_name = v["tcp_name"].as_str().unwrap().to_string();
    let nbd = bed.hosts[0].nbd.clone();
    // The plain name is unknown on TCP, and the list is refused.
    assert!(block_on(NbdClient::connect_tcp(&nbd, "t")).is_err());
    let out = ferry_tests::run("nbdinfo", &["--list", &format!("nbd://{nbd}")]);
    assert!(!out.status.success(), "TCP exports were listed");
    // With the secret-derived name, a remote host's client reads and writes.
    let d = pattern(9, 1 << 20);
    block_on(async {
        let c = NbdClient::connect_tcp(&nbd, &tcp_name)
            .await
            .expect("connect with the name");
        c.write(0, &d, WriteFlags::default()).await.unwrap();
        c.flush().await.unwrap();
    });
    assert_eq!(read(&bed, 0, "t", 0, 1 << 20), d);
}

#[test]
fn an_agent_killed_and_restarted_in_time_keeps_its_slot_locks_and_exports() {
    let _g = serial();
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    create(&bed, 0, "/r", 16 * MIB);
    let (s, v) = export(&bed, 0, "r", "/r", false);
    assert_eq!(s, 201, "{v}");
    let before = bed.call_ok(0, "GET", "/v1/host", None);
    let data = pattern(3, 256 << 10);
    write_flush(&bed, 0, "r", 0, &data);

    // A QEMU NBD client with reconnect-delay keeps going across the restart.
    let sock = bed.hosts[0].nbd_socket();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=r,reconnect-delay=20",
        sock.display()
    );
    let qemu = std::process::Command::new("qemu-io")
        .args([
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "sleep 6000",
            "-c",
            "write -P 0x22 2M 64k",
            "-c",
            "read -P 0x11 1M 64k",
            "-c",
            "read -P 0x22 2M 64k",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_secs(2));
    // A stand-in for a VM in the host's cgroup: an agent restart must not disturb it.
    let mut vm = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("sleep");
    let vm_cg = bed.hosts[0].cgroup().join("vm-standin");
    std::fs::create_dir_all(&vm_cg).unwrap();
    std::fs::write(vm_cg.join("cgroup.procs"), vm.id().to_string()).unwrap();

    bed.signal(0, Signal::SIGKILL);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    // While it is down its lock holds: the other host is refused.
    let (s, v) = export(&bed, 1, "r", "/r", false);
    assert_eq!(s, 409, "{v}");
    bed.start(0);
    let after = bed.call_ok(0, "GET", "/v1/host", None);
    assert_eq!(after["datastores"][0]["resumed"], true, "{after}");
    assert_eq!(
        after["datastores"][0]["generation"],
        before["datastores"][0]["generation"]
    );
    assert_eq!(
        after["datastores"][0]["host_id"],
        before["datastores"][0]["host_id"]
    );
    let v = bed.call_ok(0, "GET", "/v1/exports/r", None);
    assert_eq!(v["active"], true);
    assert_eq!(read(&bed, 0, "r", 0, data.len()), data);
    let out = qemu.wait_with_output().expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !stdout.contains("failed")
            && stdout.matches("read 65536/65536").count() == 2,
        "qemu-io across the restart: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The other host never saw it dead, and still cannot take the file.
    let hosts = bed.call_ok(1, "GET", "/v1/hosts", None);
    let h0 = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == bed.hosts[0].name.as_str())
        .unwrap();
    assert_eq!(h0["state"], "live", "{hosts}");
    let (s, _) = export(&bed, 1, "r", "/r", false);
    assert_eq!(s, 409);

    // SIGTERM: the same, and a clean exit.
    let st = bed.signal(0, Signal::SIGTERM);
    assert!(st.success(), "SIGTERM exit: {st}");
    bed.start(0);
    let v = bed.call_ok(0, "GET", "/v1/host", None);
    assert_eq!(v["datastores"][0]["resumed"], true, "{v}");
    assert_eq!(
        read(&bed, 0, "r", 1 << 20, 64 << 10),
        vec![0x11u8; 64 << 10]
    );
    assert_eq!(
        read(&bed, 0, "r", 2 << 20, 64 << 10),
        vec![0x22u8; 64 << 10]
    );

    // The stand-in VM lives through both restarts, past the fencing deadline (8 s after
    // the last renewal before the kill).
    std::thread::sleep(Duration::from_secs(10).saturating_sub(killed.elapsed()));
    assert!(
        vm.try_wait().unwrap().is_none(),
        "an agent restart disturbed a process of the host"
    );
    // Leaving is refused while a VM runs, and while exports exist; then it works and
    // the other host sees the slot free.
    let (s, v) = bed.call(0, "POST", "/v1/host/leave", None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("VMs"), "{v}");
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_dir(&vm_cg);
    let (s, v) = bed.call(0, "POST", "/v1/host/leave", None);
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("export"), "{v}");
    bed.call_ok(0, "DELETE", "/v1/exports/r", None);
    bed.call_ok(0, "POST", "/v1/host/leave", None);
    let st = bed.wait_exit(0, Duration::from_secs(20));
    assert!(st.success(), "{st}");
    assert_eq!(
        ferry_tests::agents::watchdog_count(&bed.hosts[0].run_dir),
        0
    );
    assert!(
        !bed.hosts[0].cgroup().exists(),
        "the host cgroup was left behind"
    );
    std::thread::sleep(Duration::from_secs(2));
    let hosts = bed.call_ok(1, "GET", "/v1/hosts", None);
    assert!(
        !hosts
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == bed.hosts[0].name.as_str()),
        "a host that left is still listed: {hosts}"
    );
    let (s, v) = export(&bed, 1, "r", "/r", false);
    assert_eq!(s, 201, "{v}");
}

#[test]
fn an_agent_killed_and_not_restarted_is_fenced_and_its_files_are_taken_over() {
    let _g = serial();
    let mut bed = AgentBed::new(2);
    bed.start(0);
    bed.start(1);
    create(&bed, 0, "/k", 16 * MIB);
    let (s, v) = export(&bed, 0, "k", "/k", false);
    assert_eq!(s, 201, "{v}");
    let data = pattern(4, 1 << 20);
    write_flush(&bed, 0, "k", 0, &data);
    // A stand-in for a VM in the host's cgroup: fencing must end it.
    let vm = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("sleep");
    std::fs::write(
        bed.hosts[0].cgroup().join("cgroup.procs"),
        vm.id().to_string(),
    )
    .expect("move the stand-in VM into the host cgroup");
    let mut vm = vm;

    bed.signal(0, Signal::SIGKILL);
    let killed = Instant::now();
    bed.wait_host_state(1, 0, "dead", Duration::from_secs(60));
    let seen_dead = killed.elapsed();
    let st = vm.try_wait().expect("wait");
    assert!(
        st.is_some(),
        "the host's processes were not fenced before it was seen dead"
    );
    // The dead host's lock breaks: host 1 takes the file over with the data intact.
    let (s, v) = export(&bed, 1, "k", "/k", false);
    assert_eq!(s, 201, "{v}");
    assert_eq!(read(&bed, 1, "k", 0, data.len()), data);
    eprintln!("seen dead {seen_dead:?} after kill -9");
    // Started again after its deadline, the agent joins anew (a new generation) and no
    // longer holds the file.
    bed.start(0);
    let v = bed.call_ok(0, "GET", "/v1/host", None);
    assert_eq!(v["datastores"][0]["resumed"], false, "{v}");
    let (s, _) = bed.call(0, "GET", "/v1/exports/k", None);
    assert_eq!(s, 404, "an export whose lock was lost came back");
}

#[test]
fn a_second_agent_with_the_same_name_or_run_directory_is_refused() {
    let _g = serial();
    let mut bed = AgentBed::new(2);
    bed.start(0);
    // Same run directory (same host, second process).
    let out = bed.start_failing(&bed.hosts[0].config);
    assert!(out.contains("another ferry agent"), "{out}");
    // Same host name on another host's device and run directory.
    let cfg = std::fs::read_to_string(&bed.hosts[1].config)
        .unwrap()
        .replace(&bed.hosts[1].name, &bed.hosts[0].name);
    let path = bed.dir.path().join("dup.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = bed.start_failing(&path);
    assert!(out.contains("already live"), "{out}");
    // The first agent is undisturbed.
    let v = bed.call_ok(0, "GET", "/v1/host", None);
    assert_eq!(v["name"], bed.hosts[0].name.as_str());
}

#[test]
fn control_api_errors_name_the_object_and_files_are_managed_through_the_agent() {
    let _g = serial();
    let mut bed = AgentBed::new(1);
    bed.start(0);
    let (s, v) = bed.call(0, "GET", "/v1/datastores/nope", None);
    assert_eq!(s, 404);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    let (s, _) = bed.call(0, "GET", "/v1/nothing", None);
    assert_eq!(s, 404);
    let (s, v) = bed.call(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"datastore": "ds0", "path": "/missing"})),
    );
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("/missing"), "{v}");
    let (s, v) = bed.call(0, "POST", "/v1/exports", Some(json!({"bogus": 1})));
    assert_eq!(s, 400, "{v}");
    // Folders and files; an eager-thick file as a task.
    bed.call_ok(
        0,
        "POST",
        "/v1/datastores/ds0/files",
        Some(json!({"path": "/vm", "folder": true})),
    );
    let (s, t) = bed.call(
        0,
        "POST",
        "/v1/datastores/ds0/files",
        Some(json!({"path": "/vm/disk", "size": 32 * MIB, "provisioning": "eager-thick", "no_wait": true})),
    );
    assert_eq!(s, 202, "{t}");
    let id = t["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = bed.call_ok(0, "GET", &format!("/v1/tasks/{id}"), None);
        if t["state"] == "done" {
            assert_eq!(t["progress"]["done_bytes"], 32 * MIB);
            break;
        }
        assert_eq!(t["state"], "running", "{t}");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = bed.call_ok(0, "GET", "/v1/datastores/ds0/files?path=/vm", None);
    assert_eq!(list[0]["path"], "/vm/disk");
    assert_eq!(list[0]["allocated_bytes"], 32 * MIB);
    let st = bed.call_ok(0, "GET", "/v1/datastores/ds0/stat?path=/vm/disk", None);
    assert_eq!(st["provisioning"], "eager-thick");
    bed.call_ok(0, "DELETE", "/v1/datastores/ds0/files?path=/vm/disk", None);
    let (s, _) = bed.call(0, "GET", "/v1/datastores/ds0/stat?path=/vm/disk", None);
    assert_eq!(s, 404);
    let ds = bed.call_ok(0, "GET", "/v1/datastores", None);
    assert_eq!(ds[0]["name"], "ds0");
    assert!(ds[0]["free_bytes"].as_u64().unwrap() > 200 * MIB);
    // Garbage on the control socket gets a 400, and the agent keeps serving.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(bed.hosts[0].control_socket()).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    bed.call_ok(0, "GET", "/v1/host", None);
}

#[test]
fn the_cli_talks_to_the_agent_on_its_socket_and_over_tcp_with_the_secret() {
    let _g = serial();
    let mut bed = AgentBed::new(1);
    bed.start(0);
    create(&bed, 0, "/c", 8 * MIB);
    let ferry = ferry_tests::cluster::ferry_bin();
    let ferry = ferry.to_str().unwrap();
    let sock = bed.hosts[0].control_socket();
    let sock = sock.to_str().unwrap();
    let out = ferry_tests::run_ok(
        ferry,
        &[
            "export", "add", "ds0:/c", "--name", "cx", "--agent", sock, "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["name"], "cx");
    assert_eq!(v["active"], true);
    let out = ferry_tests::run_ok(ferry, &["export", "ls", "--agent", sock]);
    assert!(
        out.contains("cx") && out.contains("active") && out.contains("ds0:/c"),
        "{out}"
    );
    let out = ferry_tests::run_ok(ferry, &["host", "ls", "--agent", sock, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], bed.hosts[0].name.as_str());
    assert_eq!(v[0]["state"], "live");
    let out = ferry_tests::run_ok(ferry, &["datastore", "ls", "--agent", sock]);
    assert!(out.contains("ds0"), "{out}");
    // Over TCP: refused without the secret, served with it.
    let mgmt = bed.hosts[0].mgmt.clone();
    let out = ferry_tests::run(ferry, &["host", "ls", "--agent", &mgmt]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster secret"));
    let secret = bed.dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let out = ferry_tests::run_ok(
        ferry,
        &[
            "datastore",
            "ls",
            "--json",
            "--agent",
            &mgmt,
            "--secret-file",
            secret.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "ds0");
    // Errors are one line naming the object.
    let out = ferry_tests::run(ferry, &["export", "rm", "nope", "--agent", sock]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\""));
    let out = ferry_tests::run(ferry, &["host", "ls", "--agent", "/nonexistent/agent.sock"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `ferry agent` running"));
    ferry_tests::run_ok(ferry, &["export", "rm", "cx", "--agent", sock]);
    // `ferry host leave` ends the agent cleanly.
    ferry_tests::run_ok(ferry, &["host", "leave", "--agent", sock]);
    let st = bed.wait_exit(0, Duration::from_secs(20));
    assert!(st.success());
}

/// Regression: a first write to thin space was acknowledged before its map was
/// committed, so an agent killed right after lost it — and a client that resent its
/// later flush to the next agent process was told it was durable.
#[test]
fn a_write_acknowledged_by_an_agent_survives_its_kill_9_without_any_flush() {
    let _g = serial();
    let mut bed = AgentBed::new(1);
    bed.start(0);
    create(&bed, 0, "/w", 16 * MIB);
    let (s, v) = export(&bed, 0, "w", "/w", false);
    assert_eq!(s, 201, "{v}");
    let sock = bed.hosts[0].nbd_socket();
    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                i * 2 * MIB + 4096 * i,
                pattern(40 + i, 4096 + 512 * i as usize),
            )
        })
        .collect();
    block_on(async {
        let c = NbdClient::connect_unix(&sock, "w").await.expect("connect");
        for (off, d) in &writes {
            c.write(*off, d, WriteFlags::default())
                .await
                .expect("write");
        }
        // No flush: the client saw each write acknowledged, and that is all.
    });
    bed.signal(0, Signal::SIGKILL);
    bed.start(0);
    for (off, d) in &writes {
        assert!(
            read(&bed, 0, "w", *off, d.len()) == *d,
            "the write at {off} was acknowledged and then lost"
        );
    }
}
