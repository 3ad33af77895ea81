//! The daemon (`ferry agent`): start, signals, the order of recovery, stop. It joins
//! every configured datastore as its host (or resumes the slots of its previous process,
//! see [`membership`]), settles what an earlier process left, serves datastore files
//! over NBD ([`crate::host::exports`]) and answers the control API ([`api`]) on a unix
//! socket and, with the cluster secret, on TCP.
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

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{bail, Context, Result};
use datastore::fence::HostCgroup;
use datastore::Datastore;
use tokio::sync::watch;

use crate::api;
use crate::host::leave::fence_vms;
use crate::host::membership::{self, Member};
use crate::host::{cgroup_name, tasks, Agent, Config, Stop};

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
    crate::relocation::storage::recover(&agent).await?;
    crate::relocation::targets::recover(&agent).await?;
    agent.restore_exports().await?;
    crate::vms::reattach(&agent).await;
    crate::relocation::switchover::recover(&agent);
    crate::relocation::switchover::recover_leaving(&agent);

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
