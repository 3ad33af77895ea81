//! devcount: the lock-safety probe run under `ferry lock` by the cluster tests.
//!
//! `devcount DEVICE RECORD LOG [PAUSE_MS] [HOLD_MS]` reads a counter record (value, writer
//! host, writer lock version) from record RECORD of DEVICE, checks it was written under an
//! older lock version than ours (`FERRY_LOCK_VERSION`), logs its intent, waits PAUSE_MS,
//! writes value + 1 under our version, logs that it did, holds HOLD_MS, and reads the record
//! back: it must still be ours. Any surprise is logged as `VIOLATION` (exit 3). The log
//! (one line per append) is what the tests' checker replays.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Duration;

#[repr(C, align(4096))]
struct Block([u8; 4096]);

const MAGIC: &[u8; 4] = b"DCNT";

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: devcount DEVICE RECORD LOG [PAUSE_MS] [HOLD_MS]");
        std::process::exit(2);
    }
    let record: u64 = a[2].parse().expect("record index");
    let pause = Duration::from_millis(a.get(4).map(|s| s.parse().expect("pause ms")).unwrap_or(0));
    let hold = Duration::from_millis(a.get(5).map(|s| s.parse().expect("hold ms")).unwrap_or(0));
    let lv: u64 = std::env::var("FERRY_LOCK_VERSION")
        .expect("FERRY_LOCK_VERSION")
        .parse()
        .expect("version");
    let host: u32 = std::env::var("FERRY_HOST_ID")
        .expect("FERRY_HOST_ID")
        .parse()
        .expect("host id");
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(&a[1])
        .expect("open device");
    let log = |line: String| {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("boottime");
        let t = t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a[3])
            .expect("open log");
        f.write_all(format!("{line} t={t}\n").as_bytes())
            .expect("log");
        f.sync_data().expect("sync log");
    };
    let off = record * 4096;
    let read = || {
        let mut b = Box::new(Block([0; 4096]));
        dev.read_exact_at(&mut b.0, off).expect("read counter");
        if &b.0[0..4] != MAGIC {
            return (0u64, 0u32, 0u64);
        }
        (
            u64::from_le_bytes(b.0[8..16].try_into().unwrap()),
            u32::from_le_bytes(b.0[16..20].try_into().unwrap()),
            u64::from_le_bytes(b.0[24..32].try_into().unwrap()),
        )
    };
    let (value, writer, wlv) = read();
    if wlv >= lv {
        log(format!(
            "VIOLATION lv={lv} host={host} read a record written under lv={wlv} by host {writer}"
        ));
        std::process::exit(3);
    }
    log(format!(
        "intent lv={lv} host={host} read_value={value} read_lv={wlv}"
    ));
    std::thread::sleep(pause);
    let mut b = Box::new(Block([0; 4096]));
    b.0[0..4].copy_from_slice(MAGIC);
    b.0[8..16].copy_from_slice(&(value + 1).to_le_bytes());
    b.0[16..20].copy_from_slice(&host.to_le_bytes());
    b.0[24..32].copy_from_slice(&lv.to_le_bytes());
    dev.write_all_at(&b.0, off).expect("write counter");
    log(format!("done lv={lv} host={host}"));
    std::thread::sleep(hold);
    let now = read();
    if now != (value + 1, host, lv) {
        log(format!(
            "VIOLATION lv={lv} host={host} wrote {} but reads back {now:?}",
            value + 1
        ));
        std::process::exit(3);
    }
}
