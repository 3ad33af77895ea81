//! Crash consistency of datastore files: writer processes killed with SIGKILL at random
//! moments, and at every journal step through failpoints, then recovered — by the same
//! host rejoining, and by another host breaking the dead host's lock. Every flushed
//! write must be there afterwards, the files must keep working, and `ferry datastore
//! check` must find nothing wrong. Each host reaches the datastore through its own loop
//! device.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::cluster::ferry_bin;
use ferry_tests::{run_ok, LoopDev};

fn dswriter() -> PathBuf {
    ferry_bin().with_file_name("dswriter")
}

struct Writer {
    child: Child,
    file: String,
    log: PathBuf,
    host: String,
}

impl Writer {
    /// Waits until the writer has issued requests (it joined and created its file).
    fn wait_started(&self) {
        let start = std::time::Instant::now();
        while std::fs::read_to_string(&self.log).map_or(0, |l| l.lines().count()) < 10 {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} never started",
                self.file
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_writer(
    dev: &Path,
    dir: &Path,
    host: &str,
    file: &str,
    seed: u64,
    failpoint: Option<&str>,
) -> Writer {
    let log = dir.join(format!("{}.log", file.trim_start_matches('/')));
    let mut c = Command::new(dswriter());
    c.args(["write"])
        .arg(dev)
        .args([host, file])
        .arg(&log)
        .arg(seed.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(fp) = failpoint {
        c.env("FERRY_FAILPOINTS", fp);
    }
    Writer {
        child: c.spawn().expect("spawn dswriter"),
        file: file.to_string(),
        log,
        host: host.to_string(),
    }
}

/// A verifier process; killed if the test ends before it does.
struct Verifier {
    child: Option<Child>,
    what: String,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts verifying a crashed writer's file as `host`.
fn verify(dev: &Path, w: &Writer, host: &str) -> Verifier {
    let child = Command::new(dswriter())
        .args(["verify"])
        .arg(dev)
        .args([host, &w.file])
        .arg(&w.log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn verifier");
    Verifier {
        child: Some(child),
        what: format!("verify {} as {host}", w.file),
    }
}

/// Waits for every verifier, then fails with all their reports if any failed.
fn finish(vs: Vec<Verifier>) {
    let mut failed = Vec::new();
    for mut v in vs {
        let out = v
            .child
            .take()
            .expect("running")
            .wait_with_output()
            .expect("wait");
        if !out.status.success() {
            failed.push(format!(
                "{}: {}\n{}",
                v.what,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn seed() -> u64 {
    std::env::var("FERRY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

#[test]
fn killed_writers_lose_no_flushed_write_and_check_stays_clean() {
    let seed = seed();
    eprintln!("FERRY_CRASH_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    run_ok(
        ferry_bin().to_str().unwrap(),
        &[
            "datastore",
            "create",
            image.to_str().unwrap(),
            "--label",
            "crash",
            "--size",
            "1G",
            "--max-hosts",
            "16",
            "--profile",
            "test",
        ],
    );
    // Writers use one path to the LUN, rescuers another.
    let (wdev, rdev) = (LoopDev::attach(&image, None), LoopDev::attach(&image, None));
    let mut rng = ferry_tests::Rng(seed | 1);
    let mut next = |n: u64| rng.next(n);
    // Random kills: four writers at once, killed at random moments.
    for round in 0..2 {
        let mut writers: Vec<Writer> = (0..4)
            .map(|i| {
                start_writer(
                    wdev.path(),
                    dir.path(),
                    &format!("w{i}"),
                    &format!("/r{round}-{i}"),
                    next(1 << 40),
                    None,
                )
            })
            .collect();
        for w in &mut writers {
            w.wait_started();
            std::thread::sleep(Duration::from_millis(100 + next(1500)));
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        let vs: Vec<_> = writers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                // Half are recovered by the same host rejoining, half by another host.
                if i % 2 == 0 {
                    verify(wdev.path(), w, &w.host)
                } else {
                    verify(rdev.path(), w, &format!("rescuer{i}"))
                }
            })
            .collect();
        finish(vs);
    }
    // Failpoints: a kill at each journal step of a random later transaction.
    let mut writers = Vec::new();
    for (i, fp) in ["journal-written", "apply-partial", "applied"]
        .iter()
        .enumerate()
    {
        let at = format!("{fp}@{}", 2 + next(40));
        writers.push(start_writer(
            wdev.path(),
            dir.path(),
            &format!("f{i}"),
            &format!("/fp-{i}"),
            next(1 << 40),
            Some(&at),
        ));
    }
    for w in &mut writers {
        let st = w.child.wait().unwrap();
        assert_eq!(
            st.code(),
            None,
            "{}: the failpoint did not kill the writer",
            w.file
        );
    }
    let vs: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i % 2 == 0 {
                verify(rdev.path(), w, &format!("fixer{i}"))
            } else {
                verify(wdev.path(), w, &w.host)
            }
        })
        .collect();
    finish(vs);
    let out = Command::new(ferry_bin())
        .args(["datastore", "check", "--json"])
        .arg(wdev.path())
        .output()
        .unwrap();
    if !out.status.success() {
        let keep = std::env::temp_dir().join(format!("ferry-crash-{seed}"));
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
        }
        panic!(
            "check after recovery (seed {seed}; image and logs kept in {}):\n{}",
            keep.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
