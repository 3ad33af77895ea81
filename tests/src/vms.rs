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
            "the workload found an error:\n{}",
            c.lines()
                .filter(|l| l.contains("FERR"))
                .collect::<Vec<_>>()
                .join("\n")
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
