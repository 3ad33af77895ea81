//! The test guest's workload: writes [`Record`] sectors to a disk with `O_DIRECT`, at
//! aligned and unaligned sizes, overwriting what it wrote before, flushes each write and
//! only then logs it (`FW …`, see `ferry_guest::Acked`) on stdout — the serial console.
//! Between writes it reads back ranges it wrote and checks them against what it knows;
//! at the end (or on `--verify`) it checks everything it wrote. Any mismatch prints
//! `FERR …` and ends with status 1.
//!
//! `workload DEVICE [--seconds N] [--region-mib M] [--verify] [--echo-port P]
//! [--dirty-mib D]`; in the guest, the initramfs passes the kernel command line's
//! `ferry.seconds=`, `ferry.region_mib=`, `ferry.echo_port=` and `ferry.dirty_mib=`.
//! `--echo-port` also serves a TCP echo (a connection that must survive a host move);
//! `--dirty-mib` keeps rewriting that much memory (a guest a migration finds hard to
//! converge).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_guest::{Acked, Record, SECTOR};

const O_DIRECT: i32 = 0o40000;

/// A buffer whose data starts at a 4 KiB boundary (`O_DIRECT`).
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = (4096 - raw.as_ptr() as usize % 4096) % 4096;
        Aligned { raw, off, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64)
}

/// The guest's wall clock, logged so the host can place writes in its phases.
#[allow(clippy::disallowed_methods)]
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Workload {
    dev: File,
    region: u64,
    run: u64,
    seq: u64,
    /// Sector → sequence number of the last acknowledged write to it.
    model: HashMap<u64, u64>,
    recent: Vec<(u64, u64)>,
    rng: Rng,
    out: std::io::Stdout,
    boot_uptime: u64,
    started: Instant,
}

impl Workload {
    fn fail(&mut self, msg: String) -> ! {
        let _ = writeln!(self.out, "FERR {msg}");
        let _ = self.out.flush();
        std::process::exit(1);
    }

    fn uptime(&self) -> u64 {
        self.boot_uptime + self.started.elapsed().as_millis() as u64
    }

    /// One write: pick a place (a third of the time over an earlier write) and a size.
    fn write_one(&mut self) {
        let sectors = match self.rng.below(10) {
            0..=3 => 8, // 4 KiB
            4 | 5 => 1, // 512 B
            6 => 9,     // 4.5 KiB: unaligned end
            7 => 3,     // 1.5 KiB
            8 => 128,   // 64 KiB
            _ => 24,    // 12 KiB
        };
        let overwrite = !self.recent.is_empty() && self.rng.below(3) == 0;
        let first = if overwrite {
            let (s, n) = self.recent[self.rng.below(self.recent.len() as u64) as usize];
            // Overlap it, possibly unaligned to it.
            (s + self.rng.below(n)).min(self.region - sectors)
        } else {
            self.rng.below(self.region - sectors)
        };
        self.seq += 1;
        let mut buf = Aligned::new(sectors as usize * SECTOR);
        for (k, chunk) in buf.get().chunks_mut(SECTOR).enumerate() {
            Record {
                sector: first + k as u64,
                seq: self.seq,
                run: self.run,
            }
            .encode(chunk);
        }
        let seq = self.seq;
        if let Err(e) = self.dev.write_all_at(buf.get(), first * SECTOR as u64) {
            self.fail(format!("write {seq} at sector {first}: {e}"));
        }
        if let Err(e) = self.dev.sync_data() {
            self.fail(format!("flush after write {seq}: {e}"));
        }
        let really_over = (first..first + sectors).any(|s| self.model.contains_key(&s));
        for s in first..first + sectors {
            self.model.insert(s, self.seq);
        }
        let a = Acked {
            seq: self.seq,
            sector: first,
            sectors,
            uptime_ms: self.uptime(),
            wall_ms: wall_ms(),
            overwrite: really_over,
            run: self.run,
        };
        let _ = writeln!(self.out, "{}", a.line());
        let _ = self.out.flush();
        if self.recent.len() < 256 {
            self.recent.push((first, sectors));
        } else {
            let i = self.rng.below(256) as usize;
            self.recent[i] = (first, sectors);
        }
    }

    /// Reads `first..first+n` and checks it against the model.
    fn check_range(&mut self, first: u64, n: u64) {
        let mut buf = Aligned::new(n as usize * SECTOR);
        if let Err(e) = self.dev.read_exact_at(buf.get(), first * SECTOR as u64) {
            self.fail(format!("read of sectors {first}..{}: {e}", first + n));
        }
        let data = buf.get().to_vec();
        for k in 0..n {
            let s = first + k;
            let Some(&want) = self.model.get(&s) else {
                continue;
            };
            let got = Record::decode(&data[k as usize * SECTOR..(k as usize + 1) * SECTOR]);
            match got {
                Some(r) if r.sector == s && r.seq == want && r.run == self.run => {}
                other => self.fail(format!(
                    "sector {s}: read {other:?}, expected write {want} of run {:x}",
                    self.run
                )),
            }
        }
    }

    fn verify_all(&mut self) {
        let mut sectors: Vec<u64> = self.model.keys().copied().collect();
        sectors.sort_unstable();
        // Runs of consecutive sectors, at most 1 MiB each.
        let mut i = 0;
        while i < sectors.len() {
            let mut n = 1;
            while i + n < sectors.len() && sectors[i + n] == sectors[i] + n as u64 && n < 2048 {
                n += 1;
            }
            self.check_range(sectors[i], n as u64);
            i += n;
        }
        let n = self.model.len();
        let _ = writeln!(self.out, "FVERIFY ok {n} sectors, {} writes", self.seq);
        let _ = self.out.flush();
    }
}

/// Echoes every TCP connection on `port` back to its sender.
fn echo(port: u16) {
    let l = match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            println!("FERR cannot listen on port {port}: {e}");
            return;
        }
    };
    println!("FECHO listening on port {port}");
    for c in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut r = c;
            let mut w = match r.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let _ = std::io::copy(&mut r, &mut w);
        });
    }
}

/// Rewrites `mib` MiB of memory, page by page, for ever.
fn dirty(mib: usize) {
    let mut mem = vec![0u8; mib << 20];
    let mut round = 0u8;
    loop {
        round = round.wrapping_add(1);
        for p in mem.chunks_mut(4096) {
            p[0] = round;
            p[2048] = round;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut dev_path = None;
    let (mut seconds, mut region_mib, mut verify_only) = (0u64, 64u64, false);
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                i += 1;
                seconds = args[i].parse().expect("--seconds N");
            }
            "--region-mib" => {
                i += 1;
                region_mib = args[i].parse().expect("--region-mib M");
            }
            "--verify" => verify_only = true,
            "--echo-port" => {
                i += 1;
                let port: u16 = args[i].parse().expect("--echo-port P");
                std::thread::spawn(move || echo(port));
            }
            "--dirty-mib" => {
                i += 1;
                let mib: usize = args[i].parse().expect("--dirty-mib D");
                std::thread::spawn(move || dirty(mib));
            }
            p => dev_path = Some(p.to_string()),
        }
        i += 1;
    }
    let dev_path = dev_path.expect("usage: workload DEVICE [--seconds N] [--region-mib M]");
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(&dev_path)
        .unwrap_or_else(|e| {
            println!("FERR cannot open {dev_path}: {e}");
            std::process::exit(1)
        });
    let size = dev.seek(SeekFrom::End(0)).expect("device size");
    let region = (region_mib << 20).min(size) / SECTOR as u64;
    let seed = wall_ms() ^ (uptime_ms() << 20) ^ std::process::id() as u64 | 1;
    let mut w = Workload {
        dev,
        region,
        run: Rng(seed).next(),
        seq: 0,
        model: HashMap::new(),
        recent: Vec::new(),
        rng: Rng(seed.rotate_left(17) | 1),
        out: std::io::stdout(),
        boot_uptime: uptime_ms(),
        started: Instant::now(),
    };
    println!(
        "FSTART run {:x} device {dev_path} region {} sectors seconds {seconds}",
        w.run, region
    );
    if verify_only {
        return;
    }
    let deadline = (seconds > 0).then(|| Instant::now() + std::time::Duration::from_secs(seconds));
    loop {
        w.write_one();
        if w.seq.is_multiple_of(8) && !w.recent.is_empty() {
            let (s, n) = w.recent[w.rng.below(w.recent.len() as u64) as usize];
            w.check_range(s, n);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    w.verify_all();
    println!("FDONE {} writes", w.seq);
}
