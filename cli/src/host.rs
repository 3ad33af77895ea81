//! Joining a datastore as a host for the length of one command (`ferry disk convert`
//! into a datastore, `ferry datastore mkdir`, `check --repair`, …).
//!
//! The same arrangement as `ferry lock`: this process moves into a host cgroup of its
//! own, a `ferry supervise` watchdog outside that cgroup is petted after every renewal and
//! empties the cgroup if renewals stop, and the host leaves cleanly at the end. The host
//! name is `--host`, else `FERRY_HOST`, else the machine's host name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use datastore::fence::HostCgroup;
use datastore::files::Session;
use datastore::hostlease::HostLease;
use datastore::Datastore;

/// The host name a command joins as.
pub fn host_name(explicit: Option<&str>) -> Result<String> {
    if let Some(h) = explicit {
        return Ok(h.to_string());
    }
    if let Ok(h) = std::env::var("FERRY_HOST") {
        if !h.is_empty() {
            return Ok(h);
        }
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name; pass --host")?;
    Ok(h.trim().to_string())
}

/// The cgroup v2 path this process is in (`0::/path` in /proc/self/cgroup).
pub fn current_cgroup() -> Result<PathBuf> {
    let s = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = s
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(datastore::fence::cgroup2_root()?.join(rel.trim_start_matches('/')))
}

/// Starts the fencing watchdog for `cg` (before this process enters it).
pub fn spawn_supervisor(ds: &Datastore, cg: &HostCgroup, no_fence: bool) -> Result<Child> {
    let exe = std::env::current_exe()?;
    Ok(datastore::fence::spawn_watchdog(
        datastore::fence::WatchdogSpec {
            exe: &exe,
            cgroup: cg.path(),
            fence_after: ds.superblock().fence_after(),
            fifo: None,
            log: None,
            no_fence,
            report: std::env::var_os("FERRY_FENCE_REPORT").map(PathBuf::from),
            kill_grace: ds.superblock().kill_grace(),
            escalation: datastore::fence::Escalation::default_for(ds.superblock().profile),
        },
    )?)
}

/// A joined host with its watchdog and a file session.
#[derive(Debug)]
pub struct HostSession {
    lease: Option<HostLease>,
    pub session: Arc<Session>,
    supervisor: Child,
    pipe: Arc<Mutex<ChildStdin>>,
    cg: HostCgroup,
    home: PathBuf,
}

impl HostSession {
    /// Joins the datastore on `device` as `host` (blocking: waits 2 × io_timeout).
    pub fn join(device: &Path, host: &str) -> Result<HostSession> {
        let ds = Arc::new(Datastore::open(device)?);
        let home = current_cgroup()?;
        let cg = HostCgroup::create(&format!("host-{host}-{}", std::process::id()))?;
        let mut supervisor = spawn_supervisor(&ds, &cg, false)?;
        let pipe = Arc::new(Mutex::new(
            supervisor.stdin.take().context("supervisor stdin")?,
        ));
        let cleanup = |mut sup: Child, pipe: &Arc<Mutex<ChildStdin>>| {
            let _ = writeln!(pipe.lock().expect("pipe"), "done");
            let _ = sup.wait();
            let _ = HostCgroup::at(home.clone()).enter(std::process::id());
            cg.remove();
        };
        if let Err(e) = cg.enter(std::process::id()) {
            cleanup(supervisor, &pipe);
            return Err(e.into());
        }
        let pet_pipe = Arc::clone(&pipe);
        let pet = Box::new(move |issue: Duration| {
            let _ = writeln!(pet_pipe.lock().expect("pipe"), "pet {}", issue.as_nanos());
        });
        let joined = HostLease::join(Arc::clone(&ds), host, "", pet)
            .map_err(anyhow::Error::from)
            .and_then(|lease| {
                let _ = writeln!(
                    pipe.lock().expect("pipe"),
                    "pet {}",
                    lease.last_good().as_nanos()
                );
                let started = lease
                    .check()
                    .and_then(|_| Session::start(Arc::clone(&ds), lease.owner()));
                match started {
                    Ok(session) => Ok((lease, session)),
                    Err(e) => {
                        // Give the slot back rather than leave it to be seen dead.
                        let _ = lease.leave();
                        Err(e.into())
                    }
                }
            });
        match joined {
            Ok((lease, session)) => Ok(HostSession {
                lease: Some(lease),
                session,
                supervisor,
                pipe,
                cg: cg.clone(),
                home,
            }),
            Err(e) => {
                cleanup(supervisor, &pipe);
                Err(e)
            }
        }
    }

    /// Fails if the host lease was lost (the work done since may not count).
    pub fn check(&self) -> Result<()> {
        if let Some(l) = &self.lease {
            l.check()?;
        }
        Ok(())
    }

    /// Leaves the datastore cleanly and stops the watchdog.
    pub fn leave(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let left = match self.lease.take() {
            Some(l) => l.leave().map_err(anyhow::Error::from),
            None => return Ok(()),
        };
        let _ = writeln!(self.pipe.lock().expect("pipe"), "done");
        let _ = self.supervisor.wait();
        let _ = HostCgroup::at(self.home.clone()).enter(std::process::id());
        self.cg.remove();
        left
    }
}

impl Drop for HostSession {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
