//! migbench: a ferry host relocation against a plain QEMU migration of the same guest
//! between the same two network namespaces, alternating, medians.
//!
//! `migbench RUNS [RATE]` brings up two hosts (`AgentBed::networked`), runs the test
//! guest (256 MiB, workload writing its disk) under ferry and moves it back and forth
//! RUNS times; in between, a second copy of the guest run by plain QEMU (its disk a raw
//! file, `cache=none`) migrates back and forth between the same namespaces. With RATE
//! (e.g. `1gbit`) every host link is shaped by `tc tbf` first. Reports the guest-visible
//! pause (source STOP to destination RESUME, QEMU timestamps) and the total time (the
//! request to the guest running on the destination).
//!
//! `migbench RUNS RATE both` (RATE `-` for an unshaped link) measures host + storage at
//! once instead: the guest (256 MiB) has a 4 GiB thin disk holding 1 GiB of data; each
//! run moves it to the other host *and* datastore (`relocate-vm --host --datastore`),
//! then, as the yardsticks measured in the same run, moves the disk back alone (a
//! storage relocation: mirror to ready + pivot) and the guest back alone (a host
//! relocation), and migrates the plain QEMU guest once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::agents::{guest_dir, AgentBed};
use serde_json::json;
use vm_glue::qmp::Qmp;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Plain {
    child: Child,
    qmp: Qmp,
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn plain_qemu(ns: &str, dir: &Path, tag: &str, incoming: Option<&str>) -> Plain {
    let g = guest_dir();
    let qmp_sock = dir.join(format!("{tag}.qmp"));
    let _ = std::fs::remove_file(&qmp_sock);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg("qemu-system-x86_64")
        .args([
            "-machine",
            "pc-q35-7.2,accel=tcg",
            "-cpu",
            "qemu64",
            "-m",
            "256M",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-display", "none", "-no-user-config"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("{tag}.console")).display()
        ))
        .arg("-kernel")
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join("initramfs.img"))
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib=32",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=none,aio=native",
            dir.join("plain.raw").display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"]);
    if let Some(uri) = incoming {
        c.args(["-incoming", uri]);
    }
    let child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let t0 = Instant::now();
    let qmp = loop {
        if let Ok(q) = Qmp::connect(&qmp_sock, Duration::from_secs(5)).await {
            break q;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "plain QEMU did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "events", "state": true}]})),
    )
    .await
    .unwrap();
    Plain { child, qmp }
}

/// One plain migration from `src` (running) to a new QEMU in `to_ns`: (pause ms, total s).
async fn plain_move(
    src: Plain,
    to_ns: &str,
    to_addr: &str,
    dir: &Path,
    tag: &str,
) -> (Plain, f64, f64) {
    let port = 7400;
    let uri = format!("tcp:{to_addr}:{port}");
    let dst = plain_qemu(to_ns, dir, tag, Some(&uri)).await;
    let mut sev = src.qmp.events();
    let mut dev = dst.qmp.events();
    let t0 = Instant::now();
    src.qmp
        .execute("migrate", Some(json!({"uri": uri})))
        .await
        .unwrap();
    let resume = dst
        .qmp
        .wait_event(&mut dev, "RESUME", Duration::from_secs(300))
        .await
        .unwrap();
    let total = t0.elapsed().as_secs_f64();
    let stop = src
        .qmp
        .wait_event(&mut sev, "STOP", Duration::from_secs(5))
        .await
        .unwrap();
    let pause = (resume.timestamp_us.saturating_sub(stop.timestamp_us)) as f64 / 1000.0;
    let _ = src.qmp.execute("quit", None).await;
    drop(src);
    (dst, pause, total)
}

fn shape(bed: &AgentBed, rate: &Option<String>) {
    let net = bed.net.as_ref().unwrap();
    if let Some(r) = rate {
        for v in &net.veth {
            let ok = Command::new("tc")
                .args([
                    "qdisc", "add", "dev", v, "root", "tbf", "rate", r, "burst", "1mb", "latency",
                    "100ms",
                ])
                .status()
                .expect("tc");
            assert!(ok.success(), "tc tbf on {v}");
        }
    }
}

/// Runs relocation `body` of `vm` from host `from` to its end; (task, seconds).
fn timed_relocation(
    bed: &AgentBed,
    from: usize,
    vm: &str,
    body: serde_json::Value,
) -> (serde_json::Value, f64) {
    let t0 = Instant::now();
    let v = bed.call_ok(from, "POST", &format!("/v1/vms/{vm}/relocate"), Some(body));
    let id = v["id"].as_u64().unwrap();
    let done = loop {
        let t = bed.call_ok(from, "GET", &format!("/v1/tasks/{id}"), None);
        if t["state"] != "running" {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(done["state"], "done", "{done}");
    (done, t0.elapsed().as_secs_f64())
}

/// Two networked hosts over `labels` (datastores of `ds_mib`), links shaped to `rate`,
/// both agents up, and VM `bench` (256 MiB, the workload, one thin disk of `disk`
/// bytes on ds0) defined on host 0; the hosts' namespaces and addresses.
fn bed_with_vm(
    labels: &[&str],
    ds_mib: u64,
    disk: u64,
    rate: &Option<String>,
) -> (AgentBed, Vec<String>, Vec<String>) {
    let mut bed = AgentBed::networked(2, labels, ds_mib);
    shape(&bed, rate);
    let net = bed.net.as_ref().unwrap();
    let (ns, addr) = (net.ns.clone(), net.addr.clone());
    bed.start(0);
    bed.start(1);
    let g = guest_dir();
    bed.call_ok(
        0,
        "POST",
        "/v1/vms",
        Some(json!({
            "name": "bench", "datastore": "ds0", "memory_mib": 256, "vcpus": 1,
            "kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.img"),
            "append": "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib=32",
            "disks": [{"size": disk, "provisioning": "thin"}],
        })),
    );
    (bed, ns, addr)
}

/// The plain QEMU guest's disk (a raw file in the bed's folder) and a runtime for QMP.
fn plain_setup(bed: &AgentBed) -> (PathBuf, tokio::runtime::Runtime) {
    let dir: PathBuf = bed.dir.path().to_path_buf();
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(dir.join("plain.raw"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(ok.success());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (dir, rt)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    let rate = args.get(2).cloned().filter(|r| r != "-");
    if args.iter().any(|a| a == "both") {
        return both(runs, rate);
    }
    let (bed, ns, addr) = bed_with_vm(&["ds0"], 512, 64 << 20, &rate);
    bed.call_ok(0, "POST", "/v1/vms/bench/start", None);
    let (dir, rt) = plain_setup(&bed);
    std::thread::sleep(Duration::from_secs(15)); // both guests boot and write
    let mut plain = Some(rt.block_on(plain_qemu(&ns[0], &dir, "p0", None)));
    std::thread::sleep(Duration::from_secs(10));
    let (mut fp, mut ft, mut pp, mut pt) = (vec![], vec![], vec![], vec![]);
    let mut at = 0usize; // where the ferry VM runs
    let mut pat = 0usize; // where the plain VM runs
    for r in 0..runs {
        // ferry
        let to = 1 - at;
        let t0 = Instant::now();
        let v = bed.call_ok(
            at,
            "POST",
            "/v1/vms/bench/relocate",
            Some(json!({"host": bed.hosts[to].name})),
        );
        let id = v["id"].as_u64().unwrap();
        let done = loop {
            let t = bed.call_ok(at, "GET", &format!("/v1/tasks/{id}"), None);
            if t["state"] != "running" {
                break t;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let total = t0.elapsed().as_secs_f64();
        assert_eq!(done["state"], "done", "{done}");
        let pause = done["result"]["pause_ms"].as_f64().unwrap();
        fp.push(pause);
        ft.push(total);
        at = to;
        std::thread::sleep(Duration::from_secs(3));
        // plain QEMU
        let pto = 1 - pat;
        let (p, pause2, total2) = rt.block_on(plain_move(
            plain.take().unwrap(),
            &ns[pto],
            &addr[pto],
            &dir,
            &format!("p{}", r + 1),
        ));
        plain = Some(p);
        pp.push(pause2);
        pt.push(total2);
        pat = pto;
        eprintln!("run {r}: ferry pause {pause:.0} ms, total {total:.2} s; QEMU pause {pause2:.0} ms, total {total2:.2} s");
        std::thread::sleep(Duration::from_secs(3));
    }
    drop(plain);
    let _ = bed.call(
        at,
        "POST",
        "/v1/vms/bench/stop",
        Some(json!({"force": true})),
    );
    let (a, b, c, d) = (median(fp), median(ft), median(pp), median(pt));
    println!(
        "link: {}; medians of {runs} alternating runs, 256 MiB TCG guest writing its disk",
        rate.as_deref().unwrap_or("unshaped veth")
    );
    println!();
    println!("| | ferry relocate-vm --host | plain QEMU migrate | ferry − QEMU / ferry ÷ QEMU |");
    println!("|---|---|---|---|");
    println!(
        "| guest-visible pause (STOP → RESUME) | {a:.0} ms | {c:.0} ms | {:+.0} ms |",
        a - c
    );
    println!("| total time | {b:.2} s | {d:.2} s | {:.2}× |", b / d);
}

/// `migbench RUNS RATE both`: see the module docs.
fn both(runs: usize, rate: Option<String>) {
    let (bed, ns, addr) = bed_with_vm(&["ds0", "ds1"], 6 << 10, 4 << 30, &rate);
    // 1 GiB of data in four 256 MiB pieces, written through an export before the boot.
    bed.call_ok(
        0,
        "POST",
        "/v1/exports",
        Some(json!({"name": "fill", "datastore": "ds0", "path": "/bench/disk0"})),
    );
    let url = format!(
        "nbd+unix:///fill?socket={}",
        bed.hosts[0].nbd_socket().display()
    );
    for k in 0..4u64 {
        let ok = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P 0x5{k} {}M 256M", k * 1024 + 64),
            ])
            .arg(&url)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "qemu-io");
    }
    bed.call_ok(0, "DELETE", "/v1/exports/fill", None);
    bed.call_ok(0, "POST", "/v1/vms/bench/start", None);
    let (dir, rt) = plain_setup(&bed);
    std::thread::sleep(Duration::from_secs(15));
    let mut plain = Some(rt.block_on(plain_qemu(&ns[0], &dir, "p0", None)));
    std::thread::sleep(Duration::from_secs(10));
    let (mut both_t, mut both_p, mut stor_t, mut host_p, mut plain_t, mut mirror_t) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut pat = 0usize;
    for r in 0..runs {
        // Host 0 / ds0 -> host 1 / ds1, both at once.
        let (done, total) = timed_relocation(
            &bed,
            0,
            "bench",
            json!({"host": bed.hosts[1].name, "datastore": "ds1"}),
        );
        let res = &done["result"];
        both_t.push(total);
        both_p.push(res["pause_ms"].as_f64().unwrap());
        mirror_t.push(res["mirror_s"].as_f64().unwrap());
        std::thread::sleep(Duration::from_secs(3));
        // The yardsticks: the disk back alone, then the guest back alone.
        let (_, st) = timed_relocation(&bed, 1, "bench", json!({"datastore": "ds0"}));
        stor_t.push(st);
        std::thread::sleep(Duration::from_secs(3));
        let (done, _) = timed_relocation(&bed, 1, "bench", json!({"host": bed.hosts[0].name}));
        host_p.push(done["result"]["pause_ms"].as_f64().unwrap());
        std::thread::sleep(Duration::from_secs(3));
        let pto = 1 - pat;
        let (p, _, total2) = rt.block_on(plain_move(
            plain.take().unwrap(),
            &ns[pto],
            &addr[pto],
            &dir,
            &format!("p{}", r + 1),
        ));
        plain = Some(p);
        plain_t.push(total2);
        pat = pto;
        eprintln!(
            "run {r}: both {total:.2} s (copy {:.2} s, pause {:.0} ms); storage alone {st:.2} s; \
             host alone pause {:.0} ms; plain QEMU {total2:.2} s",
            mirror_t[r], both_p[r], host_p[r]
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    drop(plain);
    let _ = bed.call(
        0,
        "POST",
        "/v1/vms/bench/stop",
        Some(json!({"force": true})),
    );
    let (bt, bp, st, hp, pt, mt) = (
        median(both_t),
        median(both_p),
        median(stor_t),
        median(host_p),
        median(plain_t),
        median(mirror_t),
    );
    println!(
        "link: {}; medians of {runs} runs; 256 MiB TCG guest writing its 4 GiB thin disk (1 GiB of data)",
        rate.as_deref().unwrap_or("unshaped veth")
    );
    println!();
    println!("| | measured | yardstick | ratio / difference |");
    println!("|---|---|---|---|");
    println!(
        "| total time, host + datastore at once | {bt:.2} s | storage alone {st:.2} s + plain QEMU migration {pt:.2} s = {:.2} s | {:.2}× |",
        st + pt,
        bt / (st + pt)
    );
    println!(
        "| total time, host + datastore at once | {bt:.2} s | its own disk copy to in sync {mt:.2} s + plain QEMU migration {pt:.2} s = {:.2} s | {:.2}× |",
        mt + pt,
        bt / (mt + pt)
    );
    println!(
        "| guest-visible pause (STOP → RESUME) | {bp:.0} ms | host-only relocation {hp:.0} ms | {:+.0} ms |",
        bp - hp
    );
}
