//! Fencing: a host's processes (the lease holder and every user of its locks) live in one
//! cgroup v2; a supervisor process outside that cgroup acts as a hardware watchdog.
//!
//! The lease holder "pets" the supervisor after every good renewal with the renewal's
//! issue time (`CLOCK_BOOTTIME`, shared by all processes of a host), and a joiner pets it
//! before its first slot write with the time it started that join attempt. When
//! `8 × io_timeout` passes after the last pet's issue time — because renewals fail, the
//! holder was killed, or the whole cgroup is stopped — the supervisor fences: it writes
//! `cgroup.kill` and waits until `cgroup.events` reads `populated 0`. Only an empty cgroup
//! counts as fenced. Other hosts break the locks only after `host_dead = 8 × io_timeout +
//! fence margin`, measured from a later point (their first sight of the last renewal).
//!
//! The supervisor protocol on its stdin: lines `pet <issue-ns>`, and `done` for a clean
//! exit. End of input without `done` means the holder died: fence at the deadline.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use crate::clock::boottime;
use crate::{Error, Result};

/// The cgroup v2 mount point (`cgroup2` in /proc/mounts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| Error::io(Path::new("/proc/mounts"), "read", e))?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .ok_or_else(|| Error::Invalid {
            object: PathBuf::from("/proc/mounts"),
            detail: "no cgroup2 file system is mounted; fencing needs one".into(),
        })
}

/// A host's cgroup.
#[derive(Debug, Clone)]
pub struct HostCgroup {
    path: PathBuf,
}

impl HostCgroup {
    /// Creates (or reuses) `ferry/<name>` under the cgroup2 root.
    pub fn create(name: &str) -> Result<HostCgroup> {
        let path = cgroup2_root()?.join("ferry").join(name);
        fs::create_dir_all(&path).map_err(|e| Error::io(&path, "create cgroup", e))?;
        Ok(HostCgroup { path })
    }

    /// Opens an existing cgroup directory.
    pub fn at(path: PathBuf) -> HostCgroup {
        HostCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves process `pid` into the cgroup.
    pub fn enter(&self, pid: u32) -> Result<()> {
        let f = self.path.join("cgroup.procs");
        fs::write(&f, pid.to_string()).map_err(|e| Error::io(&f, "join cgroup", e))
    }

    /// Processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether any process is left (`populated` in cgroup.events).
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.path.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill(&self, timeout: Duration) -> Result<()> {
        let f = self.path.join("cgroup.kill");
        fs::write(&f, "1").map_err(|e| Error::io(&f, "kill cgroup", e))?;
        let start = boottime();
        while self.populated() {
            if boottime() - start > timeout {
                return Err(Error::Timeout {
                    what: format!(
                        "{}: waiting for the killed cgroup to empty",
                        self.path.display()
                    ),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Removes the (empty) cgroup directory.
    pub fn remove(&self) {
        let _ = fs::remove_dir(&self.path);
    }
}

/// What the supervisor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The holder said `done`.
    Clean,
    /// The cgroup was emptied, at this `CLOCK_BOOTTIME`.
    Fenced(Duration),
    /// The deadline passed but fencing is disabled (negative-control tests only).
    WouldHaveFenced,
}

/// The supervisor loop: reads pets from `input`, fences `cgroup` when `fence_after`
/// passes since the last pet's issue time (or at once when input ends before any pet).
pub fn supervise(
    input: impl Read + Send + 'static,
    cgroup: &HostCgroup,
    fence_after: Duration,
    enabled: bool,
) -> Result<Outcome> {
    enum Msg {
        Pet(Duration),
        Done,
        Eof,
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines() {
            let Ok(line) = line else { break };
            let msg = match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["pet", ns] => match ns.parse::<u64>() {
                    Ok(ns) => Msg::Pet(Duration::from_nanos(ns)),
                    Err(_) => continue,
                },
                ["done"] => Msg::Done,
                _ => continue,
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
        let _ = tx.send(Msg::Eof);
    });
    let mut last_pet: Option<Duration> = None;
    let mut eof = false;
    loop {
        let deadline = match last_pet {
            Some(t) => t + fence_after,
            None if eof => boottime(),
            None => boottime() + Duration::from_secs(3600),
        };
        let now = boottime();
        if now >= deadline {
            if !enabled {
                tracing::error!(
                    "{}: fencing deadline passed, fencing DISABLED",
                    cgroup.path().display()
                );
                return Ok(Outcome::WouldHaveFenced);
            }
            tracing::warn!(
                "{}: no renewal since the deadline; fencing",
                cgroup.path().display()
            );
            cgroup.kill(fence_after)?;
            return Ok(Outcome::Fenced(boottime()));
        }
        if eof {
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
            continue;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(Msg::Pet(t)) => last_pet = Some(last_pet.map_or(t, |p| p.max(t))),
            Ok(Msg::Done) => return Ok(Outcome::Clean),
            Ok(Msg::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => eof = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
