//! dsbench: a datastore file against the raw loop device beneath a datastore, through
//! the same harness (the `BlockDev` trait, the same engine, the same queue depths).
//!
//! `dsbench DIR RUNS` makes two 1.5 GiB image files in DIR on one file system, attaches
//! each to a loop device (direct I/O), formats one as a datastore and leaves the other
//! raw, then measures, RUNS times each and reports medians:
//! - 1 MiB sequential write and read over 512 MiB (queue depth 4);
//! - 4 KiB random write and read at queue depth 16 (20 000 requests over 512 MiB);
//! - 4 KiB random writes into a fresh thin file vs a fresh eager-thick file, flushed;
//! - importing a sparse qcow2 (1 GiB, 256 MiB of data in 4 MiB pieces) into a thin
//!   datastore file vs `qemu-img convert -O raw` of it to a file on the same file system.
//!
//! Prints a JSON object (MB/s, IOPS, seconds, ratios).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use datastore::files::{DsFile, Session};
use datastore::hostlease::HostLease;
use datastore::{Datastore, Profile};
use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine, Provisioning, WriteFlags};
use ferry_tests::Rng;
use futures::stream::{self, StreamExt};

const MIB: u64 = 1 << 20;
const SPAN: u64 = 512 * MIB;

struct Loop(PathBuf);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(file: &Path) -> Loop {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(file)
        .output()
        .expect("losetup");
    assert!(out.status.success(), "losetup failed");
    Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Bytes per second of a 1 MiB sequential pass (write or read) at queue depth 4.
async fn seq(dev: &dyn BlockDev, write: bool) -> f64 {
    let start = Instant::now();
    stream::iter(0..SPAN / MIB)
        .map(|i| async move {
            let mut buf = vec![(i as u8) | 1; MIB as usize];
            if write {
                dev.write(i * MIB, &buf, WriteFlags::NONE)
                    .await
                    .expect("write");
            } else {
                dev.read(i * MIB, &mut buf).await.expect("read");
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    if write {
        dev.flush().await.expect("flush");
    }
    SPAN as f64 / start.elapsed().as_secs_f64()
}

/// Requests per second of `n` 4 KiB random requests at queue depth 16 within `span`.
async fn rand(dev: &dyn BlockDev, write: bool, n: u64, span: u64, seed: u64) -> f64 {
    let mut rng = Rng(seed | 1);
    let offs: Vec<u64> = (0..n).map(|_| rng.next(span / 4096) * 4096).collect();
    let start = Instant::now();
    stream::iter(offs)
        .map(|o| async move {
            let mut buf = vec![0x5au8; 4096];
            if write {
                dev.write(o, &buf, WriteFlags::NONE).await.expect("write");
            } else {
                dev.read(o, &mut buf).await.expect("read");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    if write {
        dev.flush().await.expect("flush");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(a.get(1).map_or("/var/tmp", String::as_str));
    let runs: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ds_img, raw_img) = (dir.join("dsbench-ds.img"), dir.join("dsbench-raw.img"));
    for f in [&ds_img, &raw_img] {
        std::fs::File::create(f)
            .expect("image")
            .set_len(1536 * MIB)
            .expect("size");
    }
    let (ds_loop, raw_loop) = (attach(&ds_img), attach(&raw_img));
    let dev = datastore::device::Device::open(&ds_loop.0).expect("device");
    Datastore::format(&dev, dev.size(), "bench", 4, Profile::Test).expect("format");
    let ds = Arc::new(Datastore::open(&ds_loop.0).expect("open"));
    let lease = HostLease::join(Arc::clone(&ds), "bench", "", Box::new(|_| {})).expect("join");
    let sess = Session::start(Arc::clone(&ds), lease.owner()).expect("session");
    let engine = Engine::global().expect("engine");
    let raw = RawImage::open(&raw_loop.0, true, engine).expect("raw loop");
    let out = rt.block_on(async {
        let file: DsFile = sess
            .create("/bench", SPAN, Provisioning::EagerThick)
            .await
            .expect("create");
        // Fill the raw device's first SPAN once, so both read real data.
        seq(&raw, true).await;
        let mut r = serde_json::Map::new();
        let mut measure = |name: &str, ds_v: Vec<f64>, raw_v: Vec<f64>, unit: &str| {
            let (d, w) = (median(ds_v), median(raw_v));
            r.insert(
                name.into(),
                serde_json::json!({"datastore_file": d, "raw_device": w, "unit": unit, "ratio": d / w}),
            );
        };
        let mut dsv = Vec::new();
        let mut rawv = Vec::new();
        for _ in 0..runs {
            rawv.push(seq(&raw, true).await / 1e6);
            dsv.push(seq(&file, true).await / 1e6);
        }
        measure("seq_write_1m", dsv, rawv, "MB/s");
        let (mut dsv, mut rawv) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            rawv.push(seq(&raw, false).await / 1e6);
            dsv.push(seq(&file, false).await / 1e6);
        }
        measure("seq_read_1m", dsv, rawv, "MB/s");
        let (mut dsv, mut rawv) = (Vec::new(), Vec::new());
        for i in 0..runs as u64 {
            rawv.push(rand(&raw, true, 20_000, SPAN, i + 1).await);
            dsv.push(rand(&file, true, 20_000, SPAN, i + 1).await);
        }
        measure("rand_write_4k_qd16", dsv, rawv, "IOPS");
        let (mut dsv, mut rawv) = (Vec::new(), Vec::new());
        for i in 0..runs as u64 {
            rawv.push(rand(&raw, false, 20_000, SPAN, i + 7).await);
            dsv.push(rand(&file, false, 20_000, SPAN, i + 7).await);
        }
        measure("rand_read_4k_qd16", dsv, rawv, "IOPS");
        file.close().await.expect("close");
        // First writes: fresh thin vs fresh eager-thick files, 4 KiB random, flushed.
        let (mut thin, mut eager) = (Vec::new(), Vec::new());
        for i in 0..runs {
            for (p, v) in [(Provisioning::EagerThick, &mut eager), (Provisioning::Thin, &mut thin)] {
                let name = format!("/first-{i}-{p}");
                let f = sess.create(&name, 256 * MIB, p).await.expect("create");
                v.push(rand(&f, true, 10_000, 256 * MIB, i as u64 + 3).await);
                f.close().await.expect("close");
                sess.remove(&name).await.expect("remove");
            }
        }
        let (t, e) = (median(thin), median(eager));
        r.insert(
            "first_write_4k_qd16".into(),
            serde_json::json!({"thin": t, "eager_thick": e, "unit": "IOPS", "ratio": t / e}),
        );
        // Import of a sparse qcow2: into a thin datastore file, vs qemu-img to raw.
        let src = dir.join("dsbench-src.qcow2");
        let ok = |c: &mut Command| assert!(c.status().expect("run").success(), "{c:?}");
        ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&src).arg("1G"));
        let mut io = Command::new("qemu-io");
        io.args(["-f", "qcow2"]);
        for k in 0..64u64 {
            io.arg("-c").arg(format!("write -P {} {} 4M", k % 250 + 1, k * 16 * MIB));
        }
        ok(io.arg(&src).stdout(std::process::Stdio::null()));
        let (mut ours, mut qemu) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let raw_out = dir.join("dsbench-out.raw");
            let _ = std::fs::remove_file(&raw_out);
            let t = Instant::now();
            ok(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "qcow2", "-O", "raw", "-t", "none"])
                .arg(&src)
                .arg(&raw_out));
            qemu.push(t.elapsed().as_secs_f64());
            let _ = std::fs::remove_file(&raw_out);
            let name = format!("/import-{i}");
            let t = Instant::now();
            let img = diskfmt::Image::open(&src, None, false, Engine::global().expect("engine"))
                .await
                .expect("open qcow2");
            let f = sess.create(&name, 1 << 30, Provisioning::Thin).await.expect("create");
            diskfmt::convert::convert(
                img.dev(),
                &f,
                diskfmt::convert::ConvertOptions { in_flight: 8, target_is_zero: true },
                &|_, _| {},
            )
            .await
            .expect("import");
            f.close().await.expect("close");
            ours.push(t.elapsed().as_secs_f64());
            img.close().await.expect("close qcow2");
            sess.remove(&name).await.expect("remove");
        }
        let _ = std::fs::remove_file(&src);
        let (o, q) = (median(ours), median(qemu));
        r.insert(
            "import_sparse_qcow2".into(),
            serde_json::json!({"ferry_into_datastore": o, "qemu_img_to_raw_file": q, "unit": "s", "ratio_qemu_over_ferry": q / o}),
        );
        serde_json::Value::Object(r)
    });
    drop(sess);
    lease.leave().expect("leave");
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    drop(raw);
    drop(ds_loop);
    drop(raw_loop);
    for f in [&ds_img, &raw_img] {
        let _ = std::fs::remove_file(f);
    }
}
