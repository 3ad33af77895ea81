//! `ferry agent`: the per-host daemon. It joins every configured datastore as its host
//! (or resumes the slots of its previous process, see [`membership`]), serves datastore
//! files over NBD ([`exports`]) and answers the control API ([`api`]) on a unix socket
//! and, with the cluster secret, on TCP.
//!
//! Process layout: the agent moves into the host cgroup `ferry/agent-<host>` (VMs will
//! get child cgroups of it), and one watchdog per datastore runs outside it. The run
//! directory holds the lock file that proves which agent process owns it
//! (`agent.lock`, an exclusive `flock` the kernel drops when the process ends), the
//! sockets, the export table and the per-datastore resume state.
//!
//! Stopping: SIGTERM or SIGINT stops the agent *without* leaving: exports commit and
//! keep their locks, slots keep being counted live until the watchdog's deadline, and an
//! agent started again in time resumes everything. `POST /v1/host/leave` (`ferry host
//! leave`) leaves every datastore cleanly and ends the agent; it is refused while
//! exports exist. A lost host lease freezes the exports, empties every VM cgroup and
//! then ends the agent (the watchdog fences the whole host at its deadline regardless).

pub mod api;
pub mod config;
pub mod exports;
pub mod membership;
pub mod state;
pub mod tasks;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use datastore::fence::HostCgroup;
use datastore::Datastore;
use tokio::sync::watch;

pub use config::Config;
use exports::{ExportSpec, Gate};
use membership::Member;

/// Why the agent ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM/SIGINT: keep slots and locks for the next agent process.
    Signal,
    /// The host left every datastore.
    Left,
    /// A host lease was lost.
    LeaseLost(String),
}

/// One export and its device.
#[derive(Debug)]
pub struct ExportEntry {
    pub spec: ExportSpec,
    pub gate: Arc<Gate>,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    pub members: Vec<Arc<Member>>,
    pub exports: tokio::sync::Mutex<BTreeMap<String, ExportEntry>>,
    pub nbd_unix: Arc<nbd::Server>,
    pub nbd_tcp: Option<Arc<nbd::Server>>,
    pub tasks: tasks::Tasks,
    pub started: Instant,
    pub stop: watch::Sender<Option<Stop>>,
    /// The actual NBD TCP address (the configured port may be 0).
    pub nbd_tcp_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    pub mgmt_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// Set while the host leaves: its leases end on purpose.
    pub leaving: std::sync::atomic::AtomicBool,
    /// The host cgroup (the agent, and its VMs in child cgroups).
    pub cgroup: PathBuf,
    /// VMs running on this host. Held only for short table changes: a VM being set
    /// up (its files, exports, QEMU) is reserved in `setting_up` instead.
    pub vms: tokio::sync::Mutex<BTreeMap<String, crate::vm::RunningVm>>,
    /// VMs being started or received here, not yet in `vms`.
    pub(crate) setting_up: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// A VM name reserved while it is set up on this host ([`Agent::reserve_vm`]).
#[derive(Debug)]
pub(crate) struct VmSlot<'a> {
    agent: &'a Agent,
    name: String,
}

impl Drop for VmSlot<'_> {
    fn drop(&mut self) {
        self.agent
            .setting_up
            .lock()
            .expect("setting_up")
            .remove(&self.name);
    }
}

/// Takes the run directory's lock file: held for the life of this process.
/// Takes `dir/agent.lock` (an exclusive `flock`): one agent per run or state directory.
fn lock_dir(dir: &Path, what: &str) -> Result<File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the {what}", dir.display()))?;
    let p = dir.join("agent.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .with_context(|| format!("{}: cannot open", p.display()))?;
    if f.try_lock().is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        bail!(
            "another ferry agent (pid {}) is running with {what} {}",
            pid.trim(),
            dir.display()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Tells systemd (if it started us with `Type=notify`) how we are.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(abs) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(abs.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!("sd_notify to {path}: {e}");
    }
}

/// The host cgroup's name: stable across restarts of the agent of this host name and
/// run directory, distinct for another agent on the same machine.
pub fn cgroup_name(cfg: &Config) -> String {
    let h = blake3::hash(cfg.run_dir.as_os_str().as_encoded_bytes());
    format!("agent-{}-{}", cfg.host, &h.to_hex()[..8])
}

/// Joins (or resumes) every datastore. Blocking; runs before the control plane starts.
fn start_members(
    cfg: &Config,
    exe: &Path,
    address: &str,
) -> Result<(Vec<Arc<Member>>, HostCgroup)> {
    let mut dss = Vec::new();
    for d in &cfg.datastores {
        let ds = Datastore::open(&d.device)
            .with_context(|| format!("{}: cannot open the datastore", d.device.display()))?;
        if let Some((_, other)) = dss.iter().find(|(_, o): &&(PathBuf, Arc<Datastore>)| {
            o.uuid() == ds.uuid() || o.superblock().label == ds.superblock().label
        }) {
            bail!(
                "{} and {} are the same datastore or have the same label {:?}: list each datastore once",
                other.path().display(),
                d.device.display(),
                ds.superblock().label
            );
        }
        dss.push((d.device.clone(), Arc::new(ds)));
    }
    let cg = HostCgroup::create(&cgroup_name(cfg))?;
    // Every watchdog starts (or is found) before this process enters the cgroup it
    // guards.
    let mut plans = Vec::new();
    for (_, ds) in &dss {
        plans.push(membership::plan(exe, &cfg.run_dir, ds, cg.path())?);
    }
    cg.enter(std::process::id())?;
    let mut members: Vec<Arc<Member>> = Vec::new();
    let mut plans = plans.into_iter();
    for (device, ds) in dss {
        let plan = plans.next().expect("one plan per datastore");
        match Member::start(
            ds,
            &device,
            &cfg.host,
            address,
            &cfg.run_dir,
            cg.path(),
            plan,
        ) {
            Ok(m) => members.push(Arc::new(m)),
            Err(e) => {
                // Slots joined just now are given back; resumed ones are kept (their
                // locks protect running VMs until the watchdog's deadline).
                for m in members.iter().filter(|m| !m.resumed) {
                    let _ = m.leave();
                }
                for p in plans {
                    membership::abandon(&cfg.run_dir, p);
                }
                if !members.iter().any(|m| m.resumed) {
                    if let Some(root) = membership_home() {
                        let _ = HostCgroup::at(root).enter(std::process::id());
                    }
                    cg.remove();
                }
                return Err(e);
            }
        }
    }
    Ok((members, cg))
}

impl Agent {
    /// Reserves VM `name` for setting it up here (the VM table is not held meanwhile);
    /// refused if it runs here or is being set up already.
    pub(crate) async fn reserve_vm(&self, name: &str) -> Result<VmSlot<'_>> {
        let vms = self.vms.lock().await;
        let mut busy = self.setting_up.lock().expect("setting_up");
        if vms.contains_key(name) {
            bail!("VM {name} already runs on host {}", self.cfg.host);
        }
        if !busy.insert(name.to_string()) {
            bail!(
                "VM {name} is being started on host {} already",
                self.cfg.host
            );
        }
        Ok(VmSlot {
            agent: self,
            name: name.to_string(),
        })
    }

    /// The export table (`state_dir/exports.json`).
    pub(crate) fn exports_path(&self) -> PathBuf {
        self.cfg.state_dir.join("exports.json")
    }

    /// Records the export table.
    pub async fn save_exports(&self, table: &BTreeMap<String, ExportEntry>) -> Result<()> {
        let specs: Vec<ExportSpec> = table.values().map(|e| e.spec.clone()).collect();
        // (Synced to disk: off the runtime's workers.)
        let path = self.exports_path();
        tokio::task::spawn_blocking(move || exports::save(&path, &specs))
            .await
            .expect("save task")
    }

    /// Serves `gate` as export `spec.name` (published, recorded in the table).
    pub async fn add_vm_export(&self, spec: ExportSpec, gate: Arc<Gate>) -> Result<()> {
        self.publish(&spec, &gate);
        let mut table = self.exports.lock().await;
        table.insert(spec.name.clone(), ExportEntry { spec, gate });
        self.save_exports(&table).await
    }

    /// An export's gate and datastore uuid, by export name.
    pub async fn export_gate(&self, name: &str) -> Option<(Arc<Gate>, uuid::Uuid)> {
        let t = self.exports.lock().await;
        t.get(name).map(|x| (Arc::clone(&x.gate), x.spec.datastore))
    }

    pub fn member(&self, key: &str) -> Option<Arc<Member>> {
        self.members
            .iter()
            .find(|m| m.label() == key || m.ds.uuid().to_string() == key)
            .cloned()
    }

    pub fn member_by_uuid(&self, u: &uuid::Uuid) -> Option<Arc<Member>> {
        self.members.iter().find(|m| m.ds.uuid() == u).cloned()
    }

    /// Puts an export on the NBD servers.
    pub fn publish(&self, spec: &ExportSpec, gate: &Arc<Gate>) {
        let description = format!("{}:{}", spec.datastore, spec.path);
        self.nbd_unix.add(nbd::Export {
            name: spec.name.clone(),
            description: description.clone(),
            dev: Arc::clone(gate) as Arc<dyn diskfmt::BlockDev>,
            read_only: spec.read_only,
        });
        if let (Some(tcp), Some(secret)) = (&self.nbd_tcp, &self.cfg.secret) {
            tcp.add(nbd::Export {
                name: exports::tcp_name(secret, &spec.name),
                description,
                dev: Arc::clone(gate) as Arc<dyn diskfmt::BlockDev>,
                read_only: spec.read_only,
            });
        }
    }

    pub fn unpublish(&self, name: &str) {
        self.nbd_unix.remove(name);
        if let (Some(tcp), Some(secret)) = (&self.nbd_tcp, &self.cfg.secret) {
            tcp.remove(&exports::tcp_name(secret, name));
        }
    }

    /// Opens the recorded exports again after a restart.
    async fn restore_exports(&self) -> Result<()> {
        let specs = exports::load(&self.exports_path())?;
        let mut table = self.exports.lock().await;
        for spec in specs {
            let Some(m) = self.member_by_uuid(&spec.datastore) else {
                tracing::error!(
                    "export {}: datastore {} is no longer configured; dropping the export",
                    spec.name,
                    spec.datastore
                );
                continue;
            };
            match Gate::open(
                &m.session,
                &spec.path,
                spec.read_only,
                spec.active,
                self.cfg.write_hold,
            )
            .await
            {
                Ok(g) => {
                    let gate = Arc::new(g);
                    self.publish(&spec, &gate);
                    tracing::info!("export {} restored", spec.name);
                    table.insert(spec.name.clone(), ExportEntry { spec, gate });
                }
                Err(e) => tracing::error!("export {}: cannot restore: {e:#}", spec.name),
            }
        }
        self.save_exports(&table).await
    }
}

fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    // The run-directory lock is ours: a socket file left there is stale.
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("{}: cannot listen", path.display()))?;
    l.set_nonblocking(true)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves NBD on a thread of its own with a single-threaded runtime: a request's
/// reader, its task, the I/O engine's completion and the reply writer then meet on one
/// thread, with no hand-offs between runtime workers on the data path (at queue depth
/// 1 such hand-offs cost more than the I/O itself).
fn spawn_nbd_thread(
    unix: (Arc<nbd::Server>, std::os::unix::net::UnixListener),
    tcp: Option<(Arc<nbd::Server>, std::net::TcpListener)>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("ferry-nbd".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the NBD runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                if let Some((srv, l)) = tcp {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(srv.serve_tcp(l));
                        }
                        Err(e) => tracing::error!("NBD TCP listener: {e}"),
                    }
                }
                let (srv, l) = unix;
                match tokio::net::UnixListener::from_std(l) {
                    Ok(l) => {
                        if let Err(e) = srv.serve_unix(l).await {
                            tracing::error!("NBD socket: {e}");
                        }
                    }
                    Err(e) => tracing::error!("NBD socket: {e}"),
                }
            });
        })?;
    Ok(())
}

/// Runs the agent until it is stopped, leaves, or loses a lease.
pub async fn run(cfg: Config, exe: PathBuf) -> Result<Stop> {
    let lockfile = lock_dir(&cfg.run_dir, "run directory")?;
    // One agent per state directory too (its journals are this host's).
    let _state_lock = lock_dir(&cfg.state_dir, "state directory")?;
    // Listen first, so the heartbeat slot publishes the address actually bound.
    let tcp = |addr: std::net::SocketAddr, what: &str| -> Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("{addr}: cannot listen for {what}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let nbd_tcp_l = cfg.nbd_listen.map(|a| tcp(a, "NBD")).transpose()?;
    let mgmt_l = cfg
        .management_listen
        .map(|a| tcp(a, "the control API"))
        .transpose()?;
    let address = match &mgmt_l {
        Some(l) => cfg.published(l.local_addr()?).to_string(),
        None => String::new(),
    };
    let cfg2 = cfg.clone();
    let (members, cg) = tokio::task::spawn_blocking(move || start_members(&cfg2, &exe, &address))
        .await
        .expect("join task")?;
    let nbd_tcp = cfg.nbd_listen.map(|_| nbd::Server::new_private());
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        members,
        exports: tokio::sync::Mutex::new(BTreeMap::new()),
        nbd_unix: nbd::Server::new(),
        nbd_tcp,
        tasks: tasks::Tasks::default(),
        started: Instant::now(),
        stop: stop_tx,
        nbd_tcp_addr: std::sync::Mutex::new(None),
        mgmt_addr: std::sync::Mutex::new(None),
        leaving: std::sync::atomic::AtomicBool::new(false),
        cgroup: cg.path().to_path_buf(),
        vms: tokio::sync::Mutex::new(BTreeMap::new()),
        setting_up: std::sync::Mutex::new(Default::default()),
    });
    // Heartbeat watchers: liveness of every slot, and our own lease.
    for m in &agent.members {
        let m = Arc::clone(m);
        let a = Arc::downgrade(&agent);
        std::thread::Builder::new()
            .name("ferry-observe".into())
            .spawn(move || {
                let every = m.ds.superblock().io_timeout() / 2;
                loop {
                    let Some(agent) = a.upgrade() else { return };
                    if agent.stop.borrow().is_some() {
                        return;
                    }
                    if let Err(e) = m.observe() {
                        tracing::warn!("{}: heartbeat read failed: {e}", m.ds.path().display());
                    }
                    if let Err(e) = m.check() {
                        let leaving = agent.leaving.load(std::sync::atomic::Ordering::SeqCst);
                        if agent.stop.borrow().is_none() && !leaving {
                            agent
                                .stop
                                .send_replace(Some(Stop::LeaseLost(format!("{e:#}"))));
                        }
                        return;
                    }
                    drop(agent);
                    std::thread::sleep(every);
                }
            })?;
    }
    crate::vm::relocate::recover(&agent).await?;
    crate::vm::targets::recover(&agent).await?;
    agent.restore_exports().await?;
    crate::vm::reattach(&agent).await;
    crate::vm::switchover::recover(&agent);
    crate::vm::migrate::recover_leaving(&agent);

    let nbd_sock = bind_unix(&cfg.nbd_socket())?;
    let nbd_tcp = match (nbd_tcp_l, &agent.nbd_tcp) {
        (Some(l), Some(srv)) => {
            *agent.nbd_tcp_addr.lock().expect("addr") = Some(cfg.published(l.local_addr()?));
            Some((Arc::clone(srv), l))
        }
        _ => None,
    };
    spawn_nbd_thread((Arc::clone(&agent.nbd_unix), nbd_sock), nbd_tcp)?;
    let ctl = tokio::net::UnixListener::from_std(bind_unix(&cfg.control_socket)?)?;
    tokio::spawn(api::serve_unix(Arc::clone(&agent), ctl));
    if let Some(l) = mgmt_l {
        *agent.mgmt_addr.lock().expect("addr") = Some(cfg.published(l.local_addr()?));
        tokio::spawn(api::serve_tcp(
            Arc::clone(&agent),
            tokio::net::TcpListener::from_std(l)?,
        ));
    }
    let resumed = agent.members.iter().filter(|m| m.resumed).count();
    tracing::info!(
        "agent {} ready: {} datastore(s) ({} resumed), {} export(s), control {}",
        cfg.host,
        agent.members.len(),
        resumed,
        agent.exports.lock().await.len(),
        cfg.control_socket.display()
    );
    sd_notify("READY=1\nSTATUS=serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = term.recv() => Stop::Signal,
        _ = int.recv() => Stop::Signal,
        r = stop_rx.wait_for(|s| s.is_some()) => r.map(|s| s.clone().expect("set")).unwrap_or(Stop::Signal),
    };
    agent.stop.send_replace(Some(why.clone()));
    sd_notify("STOPPING=1");
    match &why {
        Stop::Signal => {
            tracing::info!(
                "stopping; slots, locks and exports are kept for the next agent process"
            );
            for e in agent.exports.lock().await.values() {
                if let Err(err) = e.gate.freeze().await {
                    tracing::error!("export {}: {err:#}", e.spec.name);
                }
            }
            // Exit here, without destructors: an open file's drop would release its
            // lock, and every lock must stay held for the next agent process.
            let _ = std::fs::remove_file(&cfg.control_socket);
            std::process::exit(0);
        }
        Stop::LeaseLost(e) => {
            tracing::error!(
                "host lease lost ({e}); fencing this host's VMs before stopping (the \
                 watchdog fences the whole host at its deadline in any case)"
            );
            // No commit, no unlock: the locks are no longer ours to use. The exports
            // acknowledge nothing more (their writes are refused past the deadline
            // anyway), and the VMs are killed here: the agent never leaves while a VM
            // it served may still run.
            for e in agent.exports.lock().await.values() {
                let _ = e.gate.freeze().await;
            }
            fence_vms(&agent.cgroup);
            std::process::exit(1);
        }
        Stop::Left => {
            let _ = std::fs::remove_file(agent.exports_path());
            let home = membership_home();
            if let Some(home) = home {
                let _ = HostCgroup::at(home).enter(std::process::id());
            }
            cg.remove();
        }
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    let _ = std::fs::remove_file(cfg.nbd_socket());
    drop(lockfile);
    Ok(why)
}

/// The cgroup to return to after leaving: the parent of the `ferry` cgroup tree.
fn membership_home() -> Option<PathBuf> {
    datastore::fence::cgroup2_root().ok()
}

/// Processes in the host cgroup tree other than this agent (VMs, and whatever else the
/// host runs under its leases).
/// Empties every VM cgroup under the host's `cgroup`, waiting as long as that takes (a
/// process stuck in uninterruptible I/O keeps its cgroup populated: then the agent waits
/// for the watchdog, which fences the whole host cgroup, this agent included).
fn fence_vms(cgroup: &Path) {
    let vms: Vec<PathBuf> = std::fs::read_dir(cgroup)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("vm-"))
                })
                .collect()
        })
        .unwrap_or_default();
    for vm in vms {
        let c = HostCgroup::at(vm.clone());
        loop {
            match c.kill(Duration::from_secs(5)) {
                Ok(()) => {
                    tracing::warn!("{}: VM fenced (cgroup emptied)", vm.display());
                    break;
                }
                Err(e) => tracing::error!("{}: not empty yet: {e}; still waiting", vm.display()),
            }
        }
    }
}

pub fn host_processes(cgroup: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(d) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .filter(|p| *p != std::process::id()),
            );
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            dirs.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
        }
    }
    out
}

/// Leaves every datastore (the API's `host/leave`); refused while exports exist or
/// while processes other than the agent (VMs) run in the host cgroup.
pub async fn leave(agent: &Arc<Agent>) -> Result<()> {
    let others = host_processes(&agent.cgroup);
    if !others.is_empty() {
        bail!(
            "this host still runs {} process(es) under its leases (pids {:?} in {}): stop its \
             VMs first",
            others.len(),
            others,
            agent.cgroup.display()
        );
    }
    let table = agent.exports.lock().await;
    if !table.is_empty() {
        bail!(
            "this host still serves {} export(s) ({}): remove them (and stop their VMs) first",
            table.len(),
            table.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    // Hold the table lock so no export is added while we leave.
    agent
        .leaving
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let members = agent.members.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for m in members {
            m.leave()?;
        }
        Ok(())
    })
    .await
    .expect("leave task")?;
    agent.stop.send_replace(Some(Stop::Left));
    drop(table);
    Ok(())
}
