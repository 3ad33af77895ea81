//! The agent's membership in one datastore: its host lease, its fencing watchdog, its
//! file session, and what survives an agent restart.
//!
//! The watchdog (`ferry supervise --fifo`) is a separate process outside the host's
//! cgroup that reads pets from a FIFO in the run directory and empties the cgroup (the
//! agent and every VM it started) when `fence_after` passes without one. It outlives the
//! agent process on purpose: an agent that stops or crashes and starts again within the
//! deadline reopens the same FIFO and **resumes** its slot (same host id, generation and
//! incarnation, so its locks stay held) instead of joining anew. The state file
//! `run_dir/hosts/<datastore uuid>.json` records what resuming needs, including the
//! issue time of the last good renewal. The proof that the previous agent process has
//! exited is the run directory's lock file (see `mod.rs`), released by the kernel when
//! that process ends.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{bail, Context, Result};
use datastore::clock::boottime;
use datastore::files::Session;
use datastore::hostlease::HostLease;
use datastore::store::SlotView;
use datastore::{Datastore, Owner};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What an agent restart needs to resume a slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotState {
    pub datastore: Uuid,
    pub device: PathBuf,
    pub host_id: u32,
    pub generation: u64,
    pub incarnation: Uuid,
    pub supervisor_pid: u32,
    pub cgroup: PathBuf,
    /// `CLOCK_BOOTTIME` issue time of the last good renewal, in nanoseconds.
    pub last_good_ns: u64,
}

fn state_path(run_dir: &Path, ds: &Uuid) -> PathBuf {
    run_dir.join("hosts").join(format!("{ds}.json"))
}

fn fifo_path(run_dir: &Path, ds: &Uuid) -> PathBuf {
    run_dir.join("hosts").join(format!("{ds}.watchdog"))
}

fn write_state(path: &Path, st: &SlotState) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, path)
}

fn read_state(path: &Path) -> Option<SlotState> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Whether `pid` is a running `ferry supervise` reading `fifo`.
fn supervisor_alive(pid: u32, fifo: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    args.contains(&&b"supervise"[..]) && args.contains(&fifo.as_os_str().as_encoded_bytes())
}

/// Opens the watchdog FIFO for writing; fails if nobody reads it.
fn open_fifo(fifo: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
}

/// The pet callback's state: the FIFO and the state file to keep current.
struct Petter {
    fifo: std::fs::File,
    state: Option<(PathBuf, SlotState)>,
}

impl Petter {
    fn pet(&mut self, issue: Duration) {
        if let Err(e) = writeln!(self.fifo, "pet {}", issue.as_nanos()) {
            tracing::error!("cannot pet the fencing watchdog: {e}");
        }
        if let Some((path, st)) = &mut self.state {
            st.last_good_ns = issue.as_nanos() as u64;
            if let Err(e) = write_state(path, st) {
                tracing::warn!("{}: cannot record the renewal: {e}", path.display());
            }
        }
    }
}

/// One joined datastore.
#[derive(Debug)]
pub struct Member {
    pub ds: Arc<Datastore>,
    pub device: PathBuf,
    pub session: Arc<Session>,
    lease: Mutex<Option<HostLease>>,
    pub resumed: bool,
    supervisor_pid: u32,
    fifo: PathBuf,
    state: PathBuf,
    views: Mutex<Vec<SlotView>>,
}

/// Starts the watchdog for `ds`, reading `fifo` (made here), outside our cgroup.
pub fn spawn_supervisor(exe: &Path, run_dir: &Path, ds: &Datastore, cgroup: &Path) -> Result<u32> {
    let fifo = fifo_path(run_dir, ds.uuid());
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .with_context(|| format!("{}: cannot make the watchdog FIFO", fifo.display()))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(
        run_dir
            .join("hosts")
            .join(format!("{}.watchdog.log", ds.uuid())),
    )?;
    let child = datastore::fence::spawn_watchdog(datastore::fence::WatchdogSpec {
        exe,
        cgroup,
        fence_after: ds.superblock().fence_after(),
        fifo: Some(&fifo),
        log: Some(log),
        // Negative-control and agent-path tests only (a test hook, absent from releases).
        no_fence: datastore::failpoint::fires("unsafe-no-fence"),
        report: std::env::var_os("FERRY_FENCE_REPORT").map(PathBuf::from),
        kill_grace: ds.superblock().kill_grace(),
        escalation: datastore::fence::Escalation::default_for(ds.superblock().profile),
    })?;
    // Reaped by a thread, so it never lingers as a zombie while the agent runs.
    let pid = child.id();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    // Ready once it has the FIFO open for reading.
    let deadline = boottime() + Duration::from_secs(10);
    loop {
        match open_fifo(&fifo) {
            Ok(_) => return Ok(pid),
            Err(e) if boottime() > deadline => {
                bail!(
                    "{}: the fencing watchdog (pid {pid}) did not open its FIFO: {e}",
                    fifo.display()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// What to do for one datastore at startup.
#[derive(Debug)]
pub enum Plan {
    /// An earlier agent process left a slot and a live watchdog: resume them.
    Resume(SlotState),
    /// Join anew; the watchdog to pet.
    Join { supervisor_pid: u32, fifo: PathBuf },
}

/// Decides, before the agent enters its cgroup, whether `ds` is resumed or joined, and
/// starts a watchdog for a join. A watchdog of an earlier process that can no longer
/// be resumed (too close to its deadline) is waited for: it fences the cgroup the new
/// agent is about to enter.
pub fn plan(exe: &Path, run_dir: &Path, ds: &Datastore, cgroup: &Path) -> Result<Plan> {
    std::fs::create_dir_all(run_dir.join("hosts"))?;
    let sp = state_path(run_dir, ds.uuid());
    let fifo = fifo_path(run_dir, ds.uuid());
    if let Some(st) = read_state(&sp) {
        if supervisor_alive(st.supervisor_pid, &fifo) {
            let since = boottime().saturating_sub(Duration::from_nanos(st.last_good_ns));
            let sb = ds.superblock();
            if since + 2 * sb.io_timeout() < sb.fence_after() && st.cgroup == cgroup {
                return Ok(Plan::Resume(st));
            }
            tracing::warn!(
                "{}: the previous agent's last renewal was {:.1}s ago; too late to resume, \
                 waiting for its watchdog to fence the host",
                ds.path().display(),
                since.as_secs_f64()
            );
            let deadline = boottime() + sb.fence_after() * 3;
            while supervisor_alive(st.supervisor_pid, &fifo) {
                if boottime() > deadline {
                    bail!(
                        "{}: the previous agent's watchdog (pid {}) is still running; stop it \
                         and start the agent again",
                        ds.path().display(),
                        st.supervisor_pid
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_file(&sp);
    }
    Ok(Plan::Join {
        supervisor_pid: spawn_supervisor(exe, run_dir, ds, cgroup)?,
        fifo,
    })
}

/// Stops the watchdog started for a join that will not happen.
pub fn abandon(_run_dir: &Path, plan: Plan) {
    if let Plan::Join {
        supervisor_pid,
        fifo,
    } = plan
    {
        stop_supervisor(supervisor_pid, &fifo);
    }
}

/// Tells a watchdog its host left (or never joined) and waits for it to exit.
fn stop_supervisor(pid: u32, fifo: &Path) {
    if let Ok(mut f) = open_fifo(fifo) {
        let _ = writeln!(f, "done");
    }
    let deadline = boottime() + Duration::from_secs(5);
    while supervisor_alive(pid, fifo) && boottime() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(fifo);
}

impl Member {
    /// Resumes or joins `ds` as `host` (the agent is in its cgroup by now).
    pub fn start(
        ds: Arc<Datastore>,
        device: &Path,
        host: &str,
        address: &str,
        run_dir: &Path,
        cgroup: &Path,
        plan: Plan,
    ) -> Result<Member> {
        let sp = state_path(run_dir, ds.uuid());
        let fifo = fifo_path(run_dir, ds.uuid());
        let fifo_file = match open_fifo(&fifo) {
            Ok(f) => f,
            Err(e) => {
                if let Plan::Join { supervisor_pid, .. } = &plan {
                    stop_supervisor(*supervisor_pid, &fifo);
                }
                return Err(crate::error::fail!(
                    "{}: the fencing watchdog is not running: {e}",
                    fifo.display()
                ));
            }
        };
        let petter = Arc::new(Mutex::new(Petter {
            fifo: fifo_file,
            state: None,
        }));
        let p2 = Arc::clone(&petter);
        let pet = Box::new(move |issue: Duration| p2.lock().expect("petter").pet(issue));
        let (lease, supervisor_pid, resumed) = match plan {
            Plan::Resume(st) => {
                let lease = HostLease::resume(
                    Arc::clone(&ds),
                    st.host_id,
                    st.incarnation,
                    address,
                    Duration::from_nanos(st.last_good_ns),
                    pet,
                )
                .with_context(|| {
                    format!("{}: cannot resume slot {}", ds.path().display(), st.host_id)
                })?;
                (lease, st.supervisor_pid, true)
            }
            Plan::Join { supervisor_pid, .. } => {
                match HostLease::join(Arc::clone(&ds), host, address, pet) {
                    Ok(lease) => (lease, supervisor_pid, false),
                    Err(e) => {
                        stop_supervisor(supervisor_pid, &fifo);
                        return Err(e.into());
                    }
                }
            }
        };
        let owner = lease.owner();
        let st = SlotState {
            datastore: *ds.uuid(),
            device: device.to_path_buf(),
            host_id: owner.host_id,
            generation: owner.generation,
            incarnation: lease.incarnation(),
            supervisor_pid,
            cgroup: cgroup.to_path_buf(),
            last_good_ns: lease.last_good().as_nanos() as u64,
        };
        write_state(&sp, &st)?;
        {
            let mut p = petter.lock().expect("petter");
            p.state = Some((sp.clone(), st));
            let last = lease.last_good();
            p.pet(last);
        }
        let session = if resumed {
            Session::resume(Arc::clone(&ds), owner)
        } else {
            Session::start(Arc::clone(&ds), owner)
        };
        let session = match session.and_then(|s| lease.check().map(|_| s)) {
            Ok(s) => s,
            Err(e) => {
                if !resumed {
                    // Nothing depends on a slot joined just now: give it back.
                    let _ = lease.leave();
                    let _ = std::fs::remove_file(&sp);
                    stop_supervisor(supervisor_pid, &fifo);
                }
                // A resumed slot is kept: its locks protect running VMs until the
                // watchdog's deadline.
                return Err(e.into());
            }
        };
        tracing::info!(
            "{}: {} as {host} (host id {}, generation {})",
            ds.path().display(),
            if resumed { "resumed" } else { "joined" },
            owner.host_id,
            owner.generation
        );
        Ok(Member {
            ds,
            device: device.to_path_buf(),
            session,
            lease: Mutex::new(Some(lease)),
            resumed,
            supervisor_pid,
            fifo,
            state: sp,
            views: Mutex::new(Vec::new()),
        })
    }

    pub fn owner(&self) -> Owner {
        self.session.owner()
    }

    pub fn label(&self) -> &str {
        &self.ds.superblock().label
    }

    /// Fails if the host lease is lost (the watchdog fences the host soon after).
    pub fn check(&self) -> Result<()> {
        match &*self.lease.lock().expect("lease") {
            Some(l) => Ok(l.check()?),
            None => bail!("{}: this host left the datastore", self.ds.path().display()),
        }
    }

    /// Observes the heartbeat region through the session's own observer (called
    /// periodically by the agent, so liveness — shown and acted on when breaking locks —
    /// reflects how long each slot has gone unchanged).
    pub fn observe(&self) -> Result<()> {
        let v = self.session.observe()?;
        *self.views.lock().expect("views") = v;
        Ok(())
    }

    pub fn views(&self) -> Vec<SlotView> {
        self.views.lock().expect("views").clone()
    }

    /// The live owner named `host` in this datastore, if any.
    pub fn owner_of(&self, host: &str) -> Option<Owner> {
        self.views().iter().find_map(|v| {
            let s = v.slot.as_ref()?;
            (s.name == host && v.liveness == datastore::store::Liveness::Live).then_some(Owner {
                host_id: v.host_id,
                generation: s.host_generation,
            })
        })
    }

    /// Leaves cleanly: frees the slot, stops the watchdog, forgets the state.
    pub fn leave(&self) -> Result<()> {
        if let Some(l) = self.lease.lock().expect("lease").take() {
            l.leave()?;
        }
        stop_supervisor(self.supervisor_pid, &self.fifo);
        let _ = std::fs::remove_file(&self.state);
        Ok(())
    }
}
