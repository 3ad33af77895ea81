//! Shared harness for ferry's end-to-end tests: loop devices that clean themselves up,
//! the `qemu-img`/`qemu-io` oracles, hosts in network namespaces, agents, real guests,
//! and the test hooks ([`hooks`]).
//!
//! The oracles are installed by `scripts/setup.sh`; a test that needs one fails (never
//! skips) when it is missing.

pub mod agents;
pub mod cluster;
pub mod hooks;
pub mod vms;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs a command, panicking with its stderr if it cannot start.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it with scripts/setup.sh): {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img` with arguments, which must succeed.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// Writes a pattern with `qemu-io` (`write -P pattern offset len` commands).
pub fn qemu_io_write(path: &Path, format: &str, writes: &[(u8, u64, u64)]) {
    let mut args = vec!["-f".to_string(), format.to_string()];
    for (pat, off, len) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat} {off} {len}"));
    }
    args.push(path.display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok("qemu-io", &a);
}

/// Ranges `qemu-img map` reports as data, merged.
pub fn qemu_data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output=json", &path.display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    merge(v.as_array().expect("array").iter().filter_map(|e| {
        e["data"].as_bool().filter(|d| *d).map(|_| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            )
        })
    }))
}

/// Merges adjacent `(start, length)` ranges.
pub fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l)),
        }
    }
    out
}

/// Bytes a file occupies on disk.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A loop device over a file, with direct I/O; detached on drop (also when a test panics).
#[derive(Debug)]
pub struct LoopDev {
    path: PathBuf,
}

impl LoopDev {
    /// Attaches `file` with `losetup --direct-io=on`, optionally with a sector size.
    pub fn attach(file: &Path, sector_size: Option<u32>) -> LoopDev {
        let mut args = vec![
            "--find".to_string(),
            "--show".into(),
            "--direct-io=on".into(),
        ];
        if let Some(s) = sector_size {
            args.push(format!("--sector-size={s}"));
        }
        args.push(file.display().to_string());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let dev = run_ok("losetup", &a).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev {
            path: PathBuf::from(dev),
        }
    }

    /// The device node.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A deterministic byte pattern for `len` bytes from `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tiny deterministic generator (xorshift) for test schedules and workloads; print
/// the seed so a run can be repeated. Seed it with an odd number.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
