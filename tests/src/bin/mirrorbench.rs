//! mirrorbench: ferry's mirror engine against `qemu-img convert` on the same files, and
//! what a guest sees while a mirror runs (the methodology of the mirror research brief).
//!
//! `mirrorbench DIR RUNS` makes a 2 GiB thin raw source in DIR holding 1 GiB of data (every
//! other MiB), then RUNS times, alternating, and reports medians:
//! - `qemu-img convert -n --target-is-zero -t none -T none` of it into a fresh thin file;
//! - the mirror (default options) into a fresh thin file, nobody writing: time to ready,
//!   pivot time, target allocation;
//! - the same with a guest load through the mirror until ready (64 KiB random writes,
//!   queue depth 16, over the whole disk): time to ready (convergence), guest MiB/s;
//! - 4 KiB random writes at queue depth 1 for 2 s: on the source alone, and through a
//!   ready mirror (both sides written): mean and p99 latency.
//!
//! Prints a markdown table.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine, Provisioning, WriteFlags};
use ferry_tests::Rng;
use futures::stream::{self, StreamExt};
use mirror::{Mirror, Options};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 2048 * MIB;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn fresh_target(dir: &Path) -> Arc<RawImage> {
    let p = dir.join("tgt.raw");
    let _ = std::fs::remove_file(&p);
    Arc::new(
        RawImage::create(
            &p,
            SIZE,
            Provisioning::Thin,
            true,
            false,
            Engine::global().unwrap(),
        )
        .await
        .expect("target"),
    )
}

fn qemu_img(dir: &Path) -> f64 {
    let tgt = dir.join("tgt.raw");
    let _ = std::fs::remove_file(&tgt);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&tgt)
        .arg(SIZE.to_string())
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let t0 = Instant::now();
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-n",
            "--target-is-zero",
            "-t",
            "none",
            "-T",
            "none",
            "-f",
            "raw",
            "-O",
            "raw",
        ])
        .arg(dir.join("src.raw"))
        .arg(&tgt)
        .status()
        .expect("qemu-img convert");
    assert!(st.success());
    t0.elapsed().as_secs_f64()
}

/// 4 KiB random writes at QD1 for `secs`: (mean µs, p99 µs).
async fn latency(dev: &dyn BlockDev, secs: u64) -> (f64, f64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let buf = vec![0x5au8; 4096];
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        let off = rng.next(SIZE / 4096) * 4096;
        let t = Instant::now();
        dev.write(off, &buf, WriteFlags::NONE).await.expect("write");
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    (mean, lat[lat.len() * 99 / 100])
}

struct Run {
    ready_s: f64,
    pivot_ms: f64,
    /// Target allocated ÷ source allocated.
    alloc_ratio: f64,
}

/// One mirror to ready; with `load`, 64 KiB QD16 random writes through it until then.
async fn mirror_run(src: &Arc<RawImage>, dir: &Path, load: bool) -> (Run, f64) {
    let tgt = fresh_target(dir).await;
    let src_alloc = src.allocated_bytes().unwrap() as f64;
    let m = Mirror::start(
        Arc::clone(src) as Arc<dyn BlockDev>,
        Arc::clone(&tgt) as Arc<dyn BlockDev>,
        Options::default(),
    )
    .unwrap();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let loader = load.then(|| {
        let (m, stop, written) = (Arc::clone(&m), Arc::clone(&stop), Arc::clone(&written));
        tokio::spawn(async move {
            let buf = vec![0xa5u8; 65536];
            stream::iter(0..16u64)
                .for_each_concurrent(16, |k| {
                    let (m, stop, written, buf) = (&m, &stop, &written, &buf);
                    async move {
                        let mut rng = Rng(0x1234_5678 + k * 7919);
                        while !stop.load(Ordering::Relaxed) {
                            let off = rng.next(SIZE / 65536) * 65536;
                            m.write(off, buf, WriteFlags::NONE)
                                .await
                                .expect("guest write");
                            written.fetch_add(65536, Ordering::Relaxed);
                        }
                    }
                })
                .await;
        })
    });
    m.wait_ready().await.unwrap();
    let ready_s = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(l) = loader {
        l.await.unwrap();
    }
    let guest_mibs = written.load(Ordering::Relaxed) as f64 / MIB as f64 / ready_s;
    let p0 = Instant::now();
    m.prepare_pivot(Duration::from_secs(30))
        .await
        .unwrap()
        .commit()
        .unwrap();
    let pivot_ms = p0.elapsed().as_secs_f64() * 1000.0;
    m.finish().await;
    // (Guest writes under load allocate on both sides alike.)
    let alloc_ratio =
        tgt.allocated_bytes().unwrap() as f64 / src.allocated_bytes().unwrap().max(1) as f64;
    let _ = src_alloc;
    (
        Run {
            ready_s,
            pivot_ms,
            alloc_ratio,
        },
        guest_mibs,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map(String::as_str).unwrap_or("/var/tmp"));
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sp = dir.join("src.raw");
        let _ = std::fs::remove_file(&sp);
        let src = Arc::new(
            RawImage::create(&sp, SIZE, Provisioning::Thin, true, false, Engine::global().unwrap())
                .await
                .unwrap(),
        );
        let mut rng = Rng(42);
        for i in (0..SIZE / MIB).step_by(2) {
            let buf: Vec<u8> = (0..MIB).map(|_| rng.next(255) as u8 + 1).collect();
            src.write(i * MIB, &buf, WriteFlags::NONE).await.unwrap();
        }
        src.flush().await.unwrap();
        let data_mib = src.allocated_bytes().unwrap() as f64 / MIB as f64;
        let (mut qi, mut idle, mut loaded, mut guest, mut piv, mut alloc) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut base_mean, mut base_p99, mut mir_mean, mut mir_p99) = (vec![], vec![], vec![], vec![]);
        for r in 0..runs {
            qi.push(qemu_img(dir));
            let (a, _) = mirror_run(&src, dir, false).await;
            idle.push(a.ready_s);
            piv.push(a.pivot_ms);
            alloc.push(a.alloc_ratio);
            let (b, g) = mirror_run(&src, dir, true).await;
            loaded.push(b.ready_s);
            guest.push(g);
            // Latency: the source alone, then through a ready mirror.
            let (m0, p0) = latency(&*src, 2).await;
            base_mean.push(m0);
            base_p99.push(p0);
            let tgt = fresh_target(dir).await;
            let m = Mirror::start(
                Arc::clone(&src) as Arc<dyn BlockDev>,
                Arc::clone(&tgt) as Arc<dyn BlockDev>,
                Options::default(),
            )
            .unwrap();
            m.wait_ready().await.unwrap();
            let (m1, p1) = latency(&*m, 2).await;
            mir_mean.push(m1);
            mir_p99.push(p1);
            m.cancel().await;
            eprintln!(
                "run {r}: qemu-img {:.2} s, mirror idle {:.2} s, loaded {:.2} s ({g:.0} MiB/s guest), pivot {:.1} ms",
                qi[r], a.ready_s, b.ready_s, a.pivot_ms
            );
        }
        let _ = std::fs::remove_file(dir.join("tgt.raw"));
        let _ = std::fs::remove_file(&sp);
        let (q, i, l) = (median(qi), median(idle), median(loaded));
        println!("source: {SIZE} bytes, {data_mib:.0} MiB allocated; medians of {runs} runs");
        println!();
        println!("| measurement | result |");
        println!("|---|---|");
        println!("| qemu-img convert (thin target) | {q:.2} s ({:.0} MiB/s of data) |", data_mib / q);
        println!("| mirror to ready, idle | {i:.2} s ({:.0} MiB/s); qemu-img / mirror = {:.2} |", data_mib / i, q / i);
        println!("| mirror to ready, guest 64 KiB QD16 random writes | {l:.2} s = {:.2}× idle; guest {:.0} MiB/s |", l / i, median(guest));
        println!("| pivot (prepare + commit) | {:.1} ms |", median(piv));
        println!("| target allocated ÷ source allocated (thin → thin) | {:.3} |", median(alloc));
        println!(
            "| 4 KiB QD1 write, source alone | mean {:.0} µs, p99 {:.0} µs |",
            median(base_mean.clone()),
            median(base_p99.clone())
        );
        println!(
            "| 4 KiB QD1 write, through a ready mirror | mean {:.0} µs ({:.2}×), p99 {:.0} µs ({:.2}×) |",
            median(mir_mean.clone()),
            median(mir_mean) / median(base_mean),
            median(mir_p99.clone()),
            median(mir_p99) / median(base_p99)
        );
    });
}
