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
//! The supervisor protocol on its stdin (or a FIFO): lines `pet <issue-ns>`, and `done` for
//! a clean exit. End of input without `done` means the holder died: fence at the deadline.
//!
//! The watchdog must outlive its host in every state. [`spawn_watchdog`] is the one way to
//! start it: the child calls [`detach`] first, which puts it in a session of its own (no
//! controlling terminal, not in the caller's process group, so Ctrl-Z, a SIGSTOP of the
//! caller's group and the SIGHUP the kernel sends an orphaned process group with a stopped
//! member never reach it) and blocks SIGHUP and the job-control stop signals; the parent
//! returns only once the child is in its own session.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    /// The cgroup did not empty within the kill grace (a process stuck in uninterruptible
    /// I/O, or one that keeps spawning): the escalation was carried out (or, with
    /// [`Escalation::Log`], only reported) at this `CLOCK_BOOTTIME`.
    Stuck(Duration),
}

/// What the watchdog does when the killed cgroup does not empty within the kill grace
/// (`host_dead − fence_after − io_timeout`), before other hosts may break the host's locks.
/// Nothing the host's processes submit after the deadline reaches the datastore (I/O
/// fencing), but an I/O already stuck in the kernel could still land late: a hardware
/// watchdog would reset the machine here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalation {
    /// Reboot the machine at once (`b` to /proc/sysrq-trigger): the default of the
    /// production profile.
    Reboot,
    /// Only report it, loudly (the test profile's default: test machines are shared).
    Log,
}

impl Escalation {
    /// The default for a timing profile.
    pub fn default_for(profile: crate::Profile) -> Escalation {
        match profile {
            crate::Profile::Production => Escalation::Reboot,
            crate::Profile::Test => Escalation::Log,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Escalation::Reboot => "reboot",
            Escalation::Log => "log",
        }
    }
}

impl std::str::FromStr for Escalation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "reboot" => Ok(Escalation::Reboot),
            "log" => Ok(Escalation::Log),
            _ => Err(format!("unknown escalation {s:?}: use reboot or log")),
        }
    }
}

/// The supervisor loop: reads pets from `input`, fences `cgroup` when `fence_after`
/// passes since the last pet's issue time (or at once when input ends before any pet).
pub fn supervise(
    input: impl Read + Send + 'static,
    cgroup: &HostCgroup,
    fence_after: Duration,
    enabled: bool,
) -> Result<Outcome> {
    supervise_with(
        input,
        cgroup,
        fence_after,
        enabled,
        fence_after,
        Escalation::Log,
    )
}

/// [`supervise`], waiting `kill_grace` for the cgroup to empty and then escalating.
pub fn supervise_with(
    input: impl Read + Send + 'static,
    cgroup: &HostCgroup,
    fence_after: Duration,
    enabled: bool,
    kill_grace: Duration,
    escalation: Escalation,
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
            return match cgroup.kill(kill_grace) {
                Ok(()) => Ok(Outcome::Fenced(boottime())),
                Err(Error::Timeout { .. }) => {
                    escalate(cgroup, escalation);
                    // Only reported: keep waiting, and say fenced once it is empty.
                    match cgroup.kill(fence_after) {
                        Ok(()) => Ok(Outcome::Fenced(boottime())),
                        Err(_) => Ok(Outcome::Stuck(boottime())),
                    }
                }
                Err(e) => Err(e),
            };
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

fn escalate(cgroup: &HostCgroup, escalation: Escalation) {
    tracing::error!(
        "{}: the killed cgroup did not empty in time (processes stuck in the kernel?); \
         escalation: {}",
        cgroup.path().display(),
        escalation.as_str()
    );
    if escalation == Escalation::Reboot {
        // As a hardware watchdog would: no sync, no unmount, at once.
        if let Err(e) = fs::write("/proc/sysrq-trigger", "b") {
            tracing::error!("cannot reboot through /proc/sysrq-trigger: {e}");
        }
    }
}

/// How to start a watchdog (`ferry supervise`) for a host cgroup.
#[derive(Debug)]
pub struct WatchdogSpec<'a> {
    /// A binary with the `supervise` subcommand (ferry itself).
    pub exe: &'a Path,
    pub cgroup: &'a Path,
    pub fence_after: Duration,
    /// Pets come through this FIFO (the agent's watchdog, which outlives an agent process)
    /// instead of a pipe on the child's stdin.
    pub fifo: Option<&'a Path>,
    /// Where the watchdog's output goes (inherited when `None`).
    pub log: Option<fs::File>,
    /// Negative-control tests only: report instead of fencing.
    pub no_fence: bool,
    /// Append `fenced <ns> <cgroup>` here when the cgroup was emptied.
    pub report: Option<PathBuf>,
    /// How long to wait for the killed cgroup to empty, and what to do if it does not.
    pub kill_grace: Duration,
    pub escalation: Escalation,
}

/// Starts the watchdog in a session of its own (see the module docs); with no FIFO, its
/// stdin is a pipe the caller pets through. Returns once the child has detached.
pub fn spawn_watchdog(spec: WatchdogSpec<'_>) -> Result<Child> {
    let mut cmd = Command::new(spec.exe);
    cmd.arg("supervise")
        .arg("--cgroup")
        .arg(spec.cgroup)
        .arg("--fence-after-ms")
        .arg(spec.fence_after.as_millis().to_string())
        .arg("--kill-grace-ms")
        .arg(spec.kill_grace.as_millis().to_string())
        .arg("--on-stuck")
        .arg(spec.escalation.as_str());
    match spec.fifo {
        Some(f) => {
            cmd.arg("--fifo").arg(f).stdin(Stdio::null());
        }
        None => {
            cmd.stdin(Stdio::piped());
        }
    }
    if spec.no_fence {
        cmd.arg("--no-fence");
    }
    if let Some(r) = &spec.report {
        cmd.arg("--report").arg(r);
    }
    if let Some(log) = spec.log {
        let err = log
            .try_clone()
            .map_err(|e| Error::io(spec.cgroup, "open the watchdog log", e))?;
        cmd.stdout(log).stderr(err);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(spec.exe, "start the fencing watchdog (ferry supervise)", e))?;
    // Returned only once it is out of our session: until then a stop of our process
    // group would stop it too.
    let deadline = boottime() + Duration::from_secs(10);
    loop {
        match session_of(child.id()) {
            Some(sid) if sid == child.id() => return Ok(child),
            _ if boottime() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    what: format!(
                        "{}: the fencing watchdog did not detach into its own session",
                        spec.cgroup.display()
                    ),
                    secs: 10.0,
                });
            }
            _ => {
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(Error::Invalid {
                        object: spec.cgroup.to_path_buf(),
                        detail: format!("the fencing watchdog exited at start ({st})"),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// The session id of process `pid` (from /proc/PID/stat).
pub fn session_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": state ppid pgrp session ...
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Called first by the watchdog process, before it starts any thread: a session of its
/// own, and SIGHUP, SIGTSTP, SIGTTIN and SIGTTOU blocked (a signal mask is per thread and
/// inherited by the threads started after this; a process-directed signal goes to a
/// thread that does not block it, so no thread may exist yet).
pub fn detach() -> Result<()> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).map_err(|e| Error::Io {
        object: PathBuf::from("ferry supervise"),
        detail: format!("cannot block SIGHUP: {e}"),
    })?;
    // Fails only if we already lead a process group (then we are not in the caller's).
    if let Err(e) = nix::unistd::setsid() {
        if nix::unistd::getpgrp() != nix::unistd::getpid() {
            return Err(Error::Io {
                object: PathBuf::from("ferry supervise"),
                detail: format!("cannot start a session of its own: {e}"),
            });
        }
    }
    Ok(())
}
