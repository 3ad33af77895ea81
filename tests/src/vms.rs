//! Test VMs through an agent: the test guest defined in a datastore with the workload
//! running until stopped, its console, and waiting for its acknowledged writes.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::agents::{guest_dir, AgentBed};

/// Defines VM `name` on host `i` running the test guest's workload (until stopped) on
/// one thin disk of `disk_mib`, with `nics`; returns the definition.
pub fn create_vm(
    bed: &AgentBed,
    i: usize,
    name: &str,
    disk_mib: u64,
    nics: serde_json::Value,
) -> serde_json::Value {
    create_vm_with(bed, i, name, disk_mib, nics, "")
}

/// [`create_vm`] with more kernel command line (`ferry.ip=`, `ferry.echo_port=`, …).
pub fn create_vm_with(
    bed: &AgentBed,
    i: usize,
    name: &str,
    disk_mib: u64,
    nics: serde_json::Value,
    extra_append: &str,
) -> serde_json::Value {
    let g = guest_dir();
    let (s, v) = bed.call(
        i,
        "POST",
        "/v1/vms",
        Some(json!({
            "name": name, "datastore": "ds0", "memory_mib": 128, "vcpus": 1,
            "kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.img"),
            "append": format!(
                "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib={} {extra_append}",
                (disk_mib / 2).min(32)
            ),
            "disks": [{"size": disk_mib << 20, "provisioning": "thin"}],
            "nics": nics,
        })),
    );
    assert_eq!(s, 201, "{v}");
    v
}

pub fn console(bed: &AgentBed, i: usize, vm: &str) -> String {
    let v = bed.call_ok(
        i,
        "GET",
        &format!("/v1/vms/{vm}/console?bytes=10000000"),
        None,
    );
    v["text"].as_str().unwrap_or_default().to_string()
}

/// Waits until host `i`'s console of `vm` shows `n` acknowledged writes of one run.
pub fn wait_writes(bed: &AgentBed, i: usize, vm: &str, n: usize) {
    let t0 = Instant::now();
    loop {
        let c = console(bed, i, vm);
        if c.lines().filter(|l| l.contains("FW ")).count() >= n {
            return;
        }
        assert!(
            !c.contains("FERR"),
            "the workload found an error:\n{}\nagent log:\n{}",
            c.lines()
                .filter(|l| l.contains("FERR"))
                .collect::<Vec<_>>()
                .join("\n"),
            bed.log(i)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "fewer than {n} writes after 120 s on host {i}:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn state(bed: &AgentBed, i: usize, vm: &str) -> String {
    let v = bed.call_ok(i, "GET", &format!("/v1/vms/{vm}"), None);
    v["state"].as_str().unwrap().to_string()
}

/// Waits until task `id` on host `i` has ended; returns it.
pub fn wait_task(bed: &AgentBed, i: usize, id: u64, within: Duration) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let v = bed.call_ok(i, "GET", &format!("/v1/tasks/{id}"), None);
        if v["state"] != "running" {
            return v;
        }
        assert!(
            t0.elapsed() < within,
            "task {id} still runs: {v}\n{}",
            bed.log(i)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The console logs of `vm` on every host of the bed.
pub fn logs(bed: &AgentBed, vm: &str) -> Vec<String> {
    bed.hosts
        .iter()
        .map(|h| {
            std::fs::read_to_string(h.run_dir.join("vms").join(vm).join("console.log"))
                .unwrap_or_default()
        })
        .collect()
}

/// Every write the guest saw acknowledged, across the hosts it ran on; asserts one
/// continuous run (no reboot).
pub fn acked(bed: &AgentBed, vm: &str) -> Vec<ferry_guest::Acked> {
    let l = logs(bed, vm);
    let refs: Vec<&str> = l.iter().map(|s| s.as_str()).collect();
    let a = ferry_guest::parse_logs(&refs);
    let run = a.last().expect("acknowledged writes").run;
    if a.iter().any(|x| x.run != run) {
        let per_host: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let lines: Vec<&str> = t.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                let runs: std::collections::BTreeSet<u64> = ferry_guest::parse_logs(&[t.as_str()])
                    .iter()
                    .map(|x| x.run)
                    .collect();
                format!("host {i}: runs {runs:x?}; last lines:\n{tail}")
            })
            .collect();
        panic!(
            "the guest rebooted: its uptime is not continuous\n{}",
            per_host.join("\n---\n")
        );
    }
    a
}

/// The guest's clock as of its newest acknowledged write.
pub fn guest_now(bed: &AgentBed, vm: &str) -> u64 {
    acked(bed, vm).last().unwrap().wall_ms
}

/// Waits for `n` more acknowledged writes (on whichever host runs the guest).
pub fn more_writes(bed: &AgentBed, vm: &str, n: usize) {
    let have = acked(bed, vm).len();
    let t0 = Instant::now();
    while acked(bed, vm).len() < have + n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the guest stopped writing"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Starts a relocation of `vm` on host `from`; returns its task id.
pub fn relocate(bed: &AgentBed, from: usize, vm: &str, body: serde_json::Value) -> u64 {
    let (s, v) = bed.call(from, "POST", &format!("/v1/vms/{vm}/relocate"), Some(body));
    assert_eq!(s, 202, "{v}");
    v["id"].as_u64().unwrap()
}

/// Waits for a relocation task on host `i` that must succeed; returns it.
pub fn wait_done(bed: &AgentBed, i: usize, id: u64) -> serde_json::Value {
    let done = wait_task(bed, i, id, Duration::from_secs(180));
    assert_eq!(
        done["state"],
        "done",
        "{done}\n{}\n{}",
        bed.log(0),
        bed.log(1)
    );
    done
}

/// Host `i`'s view of `vm`.
pub fn vm_on(bed: &AgentBed, i: usize, vm: &str) -> serde_json::Value {
    bed.call_ok(i, "GET", &format!("/v1/vms/{vm}"), None)
}

/// Checks every write `vm`'s guest acknowledged in its last run on host `on` (from that
/// host's console) against `ds:/vm/disk0`, read through host `via`'s NBD export. Panics
/// naming what is missing.
pub fn verify_last_run(
    bed: &AgentBed,
    on: usize,
    via: usize,
    vm: &str,
    ds: &str,
) -> ferry_guest::Report {
    let log = console(bed, on, vm);
    let acked = ferry_guest::parse_logs(&[&log]);
    let run = acked.last().expect("acknowledged writes").run;
    let acked: Vec<_> = acked.into_iter().filter(|a| a.run == run).collect();
    bed.call_ok(
        via,
        "POST",
        "/v1/exports",
        Some(serde_json::json!({"name": "check", "datastore": ds, "path": format!("/{vm}/disk0"), "read_only": true})),
    );
    let sock = bed.hosts[via].nbd_socket();
    let r = ferry_guest::check(&acked, &[], |f, n| {
        crate::agents::read_export(&sock, "check", f, n)
    });
    bed.call_ok(via, "DELETE", "/v1/exports/check", None);
    eprintln!(
        "{vm}: {} acknowledged writes of the last run on host {on}, longest gap {} ms",
        r.acked, r.longest_gap_ms
    );
    assert!(r.ok(), "{vm}: {:?}", r.errors);
    r
}
