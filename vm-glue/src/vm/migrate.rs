//! Live host relocation (vMotion): a running VM's memory, CPU and device state move to
//! another host that sees the same datastores; the disks stay and change owner.
//!
//! The source agent drives it (`POST /v1/vms/NAME/relocate` with `host`):
//! 1. checks the destination before anything changes (live, reachable, sees every
//!    datastore, has the memory, the bridges, the machine type and CPU model);
//! 2. asks the destination agent (`POST /v1/vms/NAME/incoming`) to export the VM's
//!    files **inactive** and start QEMU paused with `-incoming defer` and
//!    `late-block-activate`; it answers with the migration address and the owner
//!    (host id, generation) it has on each datastore;
//! 3. migrates with `events` and `pause-before-switchover` (and `auto-converge`); in the
//!    pre-switchover window (source vCPUs stopped, its I/O flushed) each export goes
//!    inactive and drains and every file lock — disks and `vm.toml` — is handed to the
//!    destination by expected version; then the migration completes;
//! 4. asks the destination to finish (`POST /v1/vms/NAME/incoming/finish`): it activates
//!    the exports (the locks are already its own), takes `vm.toml`, sends `cont` and
//!    announces the MACs; the source QEMU quits.
//!
//! Until the destination resumes, the source stays authoritative: any failure or cancel
//! cancels the migration (QEMU resumes the source by itself), hands back whatever locks
//! were handed (the destination hands them back by expected version), reactivates the
//! source exports and removes everything on the destination.
//!
//! With `storage` (host + storage at once, `--host H --datastore DS`) the destination
//! also creates, locks and exports the disks' new files ([`super::targets`]); before the
//! memory moves, the source mirrors each disk into them over NBD on TCP until all are
//! in sync; in the pre-switchover window each mirror ends in sync and its source file's
//! lock is released (instead of handed); the destination commits the definition naming
//! the new files once its side of the migration completed, then resumes; the source
//! deletes the old files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use datastore::{LockMode, Owner};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::spec::VmSpec;
use super::targets::{self, NewDisk, NewStorage};
use super::{config_path, export_name, locate, RunningVm};
use crate::agent::exports::{ExportSpec, Gate};
use crate::agent::tasks::Task;
use crate::agent::Agent;
use crate::qmp::Qmp;
use nbd::NbdClient;

/// Migration settings a caller may give.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// Longest acceptable stop of the guest at switchover (ms; QEMU's default 300).
    pub downtime_ms: Option<u64>,
    /// Bandwidth limit (bytes/s).
    pub bandwidth: Option<u64>,
    /// Parallel migration connections (multifd) when more than 1.
    pub multifd_channels: Option<u32>,
    /// Give up (and stay on the source) after this long (s; default 300).
    pub timeout_s: Option<u64>,
}

impl MigrateParams {
    /// Refuses values out of range (errors name the field), before anything is handed over.
    pub fn check(&self) -> Result<()> {
        fn within<T: PartialOrd + std::fmt::Display + Copy>(
            field: &str,
            v: Option<T>,
            lo: T,
            hi: T,
            unit: &str,
        ) -> Result<()> {
            match v {
                Some(v) if v < lo || v > hi => {
                    bail!("`{field}` = {v}: must be {lo} to {hi}{unit}")
                }
                _ => Ok(()),
            }
        }
        within("downtime_ms", self.downtime_ms, 1, 600_000, " ms")?;
        within("bandwidth", self.bandwidth, 1 << 20, 1 << 40, " bytes/s")?;
        within("multifd_channels", self.multifd_channels, 1, 16, "")?;
        within("timeout_s", self.timeout_s, 1, MAX_TIMEOUT_S, " s")
    }
}

/// The longest relocation a caller may allow (one day).
pub const MAX_TIMEOUT_S: u64 = 86_400;

/// QEMU's own defaults (7.2), set again for every migration.
const DEFAULT_DOWNTIME_MS: u64 = 300;
const DEFAULT_BANDWIDTH: u64 = 128 << 20;

/// What the destination answers to `incoming`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incoming {
    /// Where the source QEMU migrates to (`tcp:ADDR:PORT`).
    pub uri: String,
    /// The destination's owner identity per datastore uuid (for lock handoffs).
    pub owners: BTreeMap<Uuid, Owner>,
    /// With `storage`: the destination's NBD address (TCP) serving the new files.
    #[serde(default)]
    pub nbd: Option<String>,
    /// With `storage`: the definition the VM will run from there (the new files).
    #[serde(default)]
    pub spec: Option<VmSpec>,
}

/// What the source sends to `incoming`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingReq {
    pub spec: VmSpec,
    /// The datastore holding the definition (label).
    pub home: String,
    pub source_host: String,
    /// The source's owner identity per datastore: where locks go back if the source
    /// never finishes or aborts the move.
    #[serde(default)]
    pub source_owners: BTreeMap<Uuid, Owner>,
    /// The destination removes the incoming VM by itself if the move has not finished
    /// this long after it began (s).
    #[serde(default)]
    pub give_up_s: Option<u64>,
    /// Host + storage at once: the disks that move to new files on the destination's
    /// datastores, and the definition's new datastore ([`targets`]).
    #[serde(default)]
    pub storage: Option<NewStorage>,
    /// Parallel migration connections (the destination must expect them too).
    #[serde(default)]
    pub multifd_channels: Option<u32>,
    /// Names this attempt: an abort for another (an earlier attempt's retried abort)
    /// leaves it alone.
    #[serde(default)]
    pub attempt: Option<String>,
    /// A powered-off VM's host + storage move: only the new files, no QEMU
    /// ([`super::cold_move`]).
    #[serde(default)]
    pub cold: bool,
}

// ---------------------------------------------------------------------------------
// Destination side.

/// Machine types and CPU models this host's QEMU offers (asked once).
fn qemu_offers(qemu: &str, what: &str) -> Result<String> {
    static CACHE: std::sync::Mutex<BTreeMap<String, String>> =
        std::sync::Mutex::new(BTreeMap::new());
    let key = format!("{qemu} {what}");
    if let Some(v) = CACHE.lock().expect("cache").get(&key) {
        return Ok(v.clone());
    }
    let out = std::process::Command::new(qemu)
        .args([what, "help"])
        .output()
        .with_context(|| format!("running {qemu} {what} help"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    CACHE.lock().expect("cache").insert(key, text.clone());
    Ok(text)
}

fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Everything this host lacks to run `spec` (empty: it can).
fn lacks(agent: &Agent, spec: &VmSpec, home: &str) -> Vec<String> {
    let mut out = Vec::new();
    for ds in std::iter::once(home).chain(spec.disks.iter().map(|d| d.datastore.as_str())) {
        if agent.member(ds).is_none() && !out.iter().any(|o: &String| o.contains(ds)) {
            out.push(format!("datastore {ds:?} is not configured here"));
        }
    }
    let avail = mem_available_mib();
    if avail < spec.memory_mib + 64 {
        out.push(format!(
            "{} MiB of memory (this host has {avail} MiB available)",
            spec.memory_mib
        ));
    }
    for n in &spec.nics {
        if let Some(br) = &n.bridge {
            // Asked over netlink: /sys/class/net may show another network namespace.
            let is_bridge = std::process::Command::new("ip")
                .args(["-o", "link", "show", "dev", br, "type", "bridge"])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
            if !is_bridge {
                out.push(format!("bridge {br}"));
            }
        }
    }
    match qemu_offers(&agent.cfg.qemu, "-machine") {
        Ok(m)
            if m.lines()
                .any(|l| l.split_whitespace().next() == Some(spec.machine.as_str())) => {}
        Ok(_) => out.push(format!("machine type {}", spec.machine)),
        Err(e) => out.push(format!("a working QEMU ({e:#})")),
    }
    match qemu_offers(&agent.cfg.qemu, "-cpu") {
        Ok(c) if c.split_whitespace().any(|w| w == spec.cpu) => {}
        Ok(_) => out.push(format!("CPU model {}", spec.cpu)),
        Err(_) => {}
    }
    out
}

/// `POST /v1/vms/NAME/incoming`: exports the VM's disks inactive and starts QEMU waiting
/// for the migration.
pub async fn incoming(agent: &Arc<Agent>, name: &str, r: IncomingReq) -> Result<Incoming> {
    if r.spec.name != name {
        bail!("the definition is of VM {:?}, not {name:?}", r.spec.name);
    }
    r.spec.validate().map_err(|e| anyhow!(e))?;
    // Reserved, not locked: making the files (eager-thick zeroing included) and starting
    // QEMU take long, and the VM table serves every other call meanwhile.
    let _slot = agent.reserve_vm(name).await?;
    // What this host will run: with storage, the disks' new datastores.
    let mut wanted = r.spec.clone();
    let mut home = r.home.clone();
    if let Some(st) = &r.storage {
        for d in wanted.disks.iter_mut() {
            if let Some(nd) = st.disks.get(&d.name) {
                d.datastore = nd.datastore.clone();
            }
        }
        home = st.home.clone();
    }
    let missing = lacks(agent, &wanted, &home);
    if !missing.is_empty() {
        bail!(
            "host {} cannot run VM {name}: it lacks {}",
            agent.cfg.host,
            missing.join(", ")
        );
    }
    if r.cold && r.storage.is_none() {
        bail!("a powered-off VM's move with nothing to copy needs no incoming VM");
    }
    let mut exports = Vec::new();
    let mut spec = r.spec.clone();
    let mut new_config = None;
    let out = async {
        if let Some(st) = &r.storage {
            let p = targets::prepare(agent, &r.spec, st).await?;
            exports = p.exports;
            spec = p.spec;
            new_config = p.config;
        }
        for d in &spec.disks {
            let ename = export_name(name, &d.name);
            if exports.contains(&ename) || r.cold {
                continue;
            }
            let m = agent.member(&d.datastore).expect("checked");
            let gate = Arc::new(
                Gate::open(&m.session, &d.path, false, false, agent.cfg.write_hold).await?,
            );
            let spec = ExportSpec {
                name: ename.clone(),
                datastore: *m.ds.uuid(),
                path: d.path.clone(),
                read_only: false,
                active: false,
            };
            agent.add_vm_export(spec, gate).await?;
            exports.push(ename);
        }
        // In the definition's disk order.
        let exports: Vec<String> = spec
            .disks
            .iter()
            .map(|d| export_name(name, &d.name))
            .filter(|e| exports.contains(e))
            .collect();
        if r.cold {
            // Only the files: the source copies into them; nothing runs here yet.
            let cg = agent.cgroup.join(format!("vm-{name}"));
            return Ok((0, None, cg, "", String::new(), exports));
        }
        let (pid, qmp, cgroup, accel) = super::launch(agent, &spec, &exports, true).await?;
        // Until this host resumes the guest: an agent restart kills this QEMU.
        let _ = std::fs::write(
            incoming_marker(agent, name),
            r.attempt.as_deref().unwrap_or(""),
        );
        let started = async {
            let multifd = r.multifd_channels.unwrap_or(1) > 1;
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [
                    {"capability": "events", "state": true},
                    {"capability": "late-block-activate", "state": true},
                    {"capability": "multifd", "state": multifd},
                ]})),
            )
            .await?;
            if multifd {
                qmp.execute(
                    "migrate-set-parameters",
                    Some(json!({"multifd-channels": r.multifd_channels})),
                )
                .await?;
            }
            let ip = agent
                .mgmt_addr
                .lock()
                .expect("addr")
                .map(|a| a.ip().to_string())
                .ok_or_else(|| anyhow!("host {} has no management address", agent.cfg.host))?;
            let port = std::net::TcpListener::bind((ip.as_str(), 0))?
                .local_addr()?
                .port();
            let uri = format!("tcp:{ip}:{port}");
            qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
                .await?;
            Ok::<String, anyhow::Error>(uri)
        }
        .await;
        match started {
            Ok(uri) => Ok((pid, Some(qmp), cgroup, accel, uri, exports)),
            Err(e) => {
                super::kill_cgroup(&cgroup);
                Err(e)
            }
        }
    }
    .await;
    match out {
        Ok((pid, qmp, cgroup, accel, uri, exports)) => {
            let owners = agent
                .members
                .iter()
                .map(|m| (*m.ds.uuid(), m.session.owner()))
                .collect();
            let mut vms = agent.vms.lock().await;
            vms.insert(
                name.to_string(),
                RunningVm {
                    spec: spec.clone(),
                    datastore: home.clone(),
                    pid,
                    qmp,
                    exports,
                    cgroup,
                    accel,
                    config: new_config,
                    incoming: true,
                    storage: r.storage.clone(),
                    attempt: r.attempt.clone(),
                },
            );
            drop(vms);
            if pid != 0 {
                super::watch(Arc::clone(agent), name.to_string(), pid);
            }
            // Never left waiting: a source that neither finishes nor aborts (it died, or
            // the network between us did) gets its locks back and nothing stays here.
            let (a, n, back) = (Arc::clone(agent), name.to_string(), r.source_owners.clone());
            let give_up = Duration::from_secs(r.give_up_s.unwrap_or(360));
            tokio::spawn(async move {
                tokio::time::sleep(give_up).await;
                let still = a
                    .vms
                    .lock()
                    .await
                    .get(&n)
                    .is_some_and(|v| v.incoming && v.pid == pid);
                if still {
                    tracing::warn!(
                        "VM {n}: its migration did not finish within {give_up:?}; removing it"
                    );
                    let _ = abort(&a, &n, back, None).await;
                }
            });
            tracing::info!(
                "VM {name}: waiting for its migration from {} at {uri}",
                r.source_host
            );
            let nbd = r
                .storage
                .as_ref()
                .and_then(|_| *agent.nbd_tcp_addr.lock().expect("addr"))
                .map(|a| a.to_string());
            if r.storage.is_some() && nbd.is_none() {
                tracing::warn!("VM {name}: no NBD TCP listener (nbd_listen) for its disks' copy");
            }
            Ok(Incoming {
                uri,
                owners,
                nbd,
                spec: r.storage.as_ref().map(|_| spec),
            })
        }
        Err(e) => {
            super::release_exports(agent, &exports).await;
            if let Some(c) = new_config.take() {
                let _ = c.close().await;
            }
            targets::discard(agent, name).await;
            Err(e)
        }
    }
}

/// `POST /v1/vms/NAME/incoming/finish`: the locks are ours now; activate, take the
/// definition, wait for the migration to complete, resume, announce. Returns the
/// RESUME time (µs since the epoch).
pub async fn finish(agent: &Arc<Agent>, name: &str) -> Result<Value> {
    let (qmp, exports, spec, home, storage, pid) = {
        let vms = agent.vms.lock().await;
        let vm = vms
            .get(name)
            .filter(|v| v.incoming)
            .ok_or_else(|| anyhow!("VM {name} is not migrating to this host"))?;
        (
            vm.qmp.clone(),
            vm.exports.clone(),
            vm.spec.clone(),
            vm.datastore.clone(),
            vm.storage.clone(),
            vm.pid,
        )
    };
    let Some(qmp) = qmp else {
        return finish_cold(agent, name, &spec, storage, &exports).await;
    };
    for e in &exports {
        let (gate, ds) = agent
            .export_gate(e)
            .await
            .ok_or_else(|| anyhow!("export {e} is gone"))?;
        let m = agent
            .member_by_uuid(&ds)
            .ok_or_else(|| anyhow!("datastore {ds} is gone"))?;
        gate.activate(&m.session)
            .await
            .with_context(|| format!("activating export {e}"))?;
        let mut t = agent.exports.lock().await;
        if let Some(x) = t.get_mut(e) {
            x.spec.active = true;
        }
        agent.save_exports(&t).await?;
    }
    // The source finished sending; wait until this side has loaded everything.
    let t0 = Instant::now();
    loop {
        let st = qmp.execute("query-migrate", None).await?;
        match st["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                bail!(
                    "the incoming migration {}",
                    st["status"].as_str().unwrap_or("failed")
                );
            }
            _ => {}
        }
        if t0.elapsed() > COMPLETION_WAIT {
            bail!(
                "the incoming migration did not complete within {} s",
                COMPLETION_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The point of no return here: from now on the guest may run on this host, so the
    // source must never resume it; aborts of this attempt are refused.
    claim_resume(agent, name, pid).await?;
    // A host + storage move commits here: the definition naming the new files is
    // written (the source can no longer resume: its side of the migration completed).
    let mut cfg = None;
    if let Some(st) = &storage {
        let own = agent
            .vms
            .lock()
            .await
            .get_mut(name)
            .and_then(|v| v.config.take());
        let f = match own {
            Some(f) => f,
            None => {
                // The definition stays on its datastore: its lock was handed to us.
                let m = agent
                    .member(&home)
                    .ok_or_else(|| anyhow!("datastore {home} is gone"))?;
                m.session
                    .open(&config_path(name), LockMode::Exclusive)
                    .await
                    .context("taking the definition's lock")?
            }
        };
        let f = match commit_into(agent, name, f, &spec, st).await {
            Ok(f) => f,
            Err(e) => {
                // Resumed here it would run on files its definition may not name; the
                // source was told nothing yet but may have been refused an abort: the
                // guest stays paused (on neither host) for an operator.
                let _ = std::fs::remove_file(super::vm_dir(agent, name).join("resuming"));
                tracing::error!("VM {name}: {e:#}; the guest stays paused here");
                return Err(e);
            }
        };
        // The new files are the disks now (the guest's writes commit write by write).
        for e in &exports {
            if let Some((gate, _)) = agent.export_gate(e).await {
                gate.make_disk().await;
            }
        }
        let mut vms = agent.vms.lock().await;
        if let Some(vm) = vms.get_mut(name) {
            vm.storage = None;
        }
        cfg = Some(f);
    }
    let mut ev = qmp.events();
    qmp.execute("cont", None).await?;
    let resumed = qmp
        .wait_event(&mut ev, "RESUME", Duration::from_secs(10))
        .await
        .map(|e| e.timestamp_us)
        .unwrap_or(0);
    let _ = std::fs::remove_file(super::vm_dir(agent, name).join("resuming"));
    // The definition's lock was handed to us before the migration began.
    let cfg = match (cfg, agent.member(&home)) {
        (Some(f), _) => Some(f),
        (None, Some(m)) => match m
            .session
            .open(&config_path(name), LockMode::Exclusive)
            .await
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!("VM {name}: taking the definition's lock after the move: {e}");
                None
            }
        },
        (None, None) => None,
    };
    // Tell the network where the MACs are now (RARP from each NIC).
    let _ = qmp
        .execute(
            "announce-self",
            Some(json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})),
        )
        .await;
    {
        let mut vms = agent.vms.lock().await;
        if let Some(vm) = vms.get_mut(name) {
            vm.config = cfg;
            vm.spec = spec;
        }
    }
    tracing::info!("VM {name}: resumed here after its migration");
    Ok(json!({"resumed_us": resumed}))
}

/// How long the destination waits for its side of the migration to complete once the
/// source asked it to finish.
const COMPLETION_WAIT: Duration = Duration::from_secs(30);

/// This host's QEMU of an incoming move that has not resumed the guest yet.
fn incoming_marker(agent: &Agent, name: &str) -> std::path::PathBuf {
    super::vm_dir(agent, name).join("incoming")
}

/// The attempts this host resumed (one file each, written before the guest can run).
fn resumed_path(agent: &Agent, attempt: &str) -> std::path::PathBuf {
    agent
        .cfg
        .state_dir
        .join("resumed")
        .join(format!("{attempt}.json"))
}

/// Whether this host resumed (or was about to resume) the guest of `attempt`.
fn resumed_here(agent: &Agent, attempt: Option<&str>) -> bool {
    attempt.is_some_and(|a| resumed_path(agent, a).exists())
}

/// Under the VM table's lock, with QEMU `pid` still this move's: records durably that
/// this host resumes attempt's guest and ends the incoming state, so that an abort —
/// which takes the same lock — either came first (and killed QEMU: this fails) or is
/// refused from now on, even after an agent restart.
async fn claim_resume(agent: &Agent, name: &str, pid: u32) -> Result<()> {
    let mut vms = agent.vms.lock().await;
    let vm = vms
        .get_mut(name)
        .filter(|v| v.incoming && v.pid == pid)
        .ok_or_else(|| anyhow!("VM {name}: its incoming move was aborted"))?;
    if let Some(a) = &vm.attempt {
        crate::agent::state::write_durably_async(resumed_path(agent, a), json!({"vm": name}))
            .await?;
    }
    // An agent restarted before `cont` went through resumes the guest.
    let dir = super::vm_dir(agent, name);
    std::fs::write(dir.join("resuming"), "")?;
    let _ = std::fs::remove_file(dir.join("incoming"));
    vm.incoming = false;
    Ok(())
}

/// The commit point of a host + storage move on this side: the definition naming the
/// new files written into `f`. If it fails, `f` goes back to the VM's entry (its abort
/// closes it).
async fn commit_into(
    agent: &Agent,
    name: &str,
    f: datastore::files::DsFile,
    spec: &VmSpec,
    st: &NewStorage,
) -> Result<datastore::files::DsFile> {
    match targets::commit(agent, &f, spec, st).await {
        Ok(()) => Ok(f),
        Err(e) => {
            if let Some(v) = agent.vms.lock().await.get_mut(name) {
                v.config = Some(f);
            }
            Err(e.context(format!("VM {name}: committing its new definition")))
        }
    }
}

/// Under the VM table's lock: this host finishes attempt's powered-off move (recorded
/// durably, as a resumed move is), so that an abort — which takes the same lock — either
/// came first (this fails) or is refused from now on: it can never delete the new files
/// while, or after, the new definition naming them is committed. Returns the new
/// definition's file (when the definition moves here) and the attempt.
async fn claim_cold_finish(
    agent: &Agent,
    name: &str,
) -> Result<(Option<datastore::files::DsFile>, Option<String>)> {
    let mut vms = agent.vms.lock().await;
    let vm = vms
        .get_mut(name)
        .filter(|v| v.incoming)
        .ok_or_else(|| anyhow!("VM {name}: its incoming move was aborted"))?;
    if let Some(a) = &vm.attempt {
        crate::agent::state::write_durably_async(
            resumed_path(agent, a),
            json!({"vm": name, "powered_off": true}),
        )
        .await?;
    }
    vm.incoming = false;
    Ok((vm.config.take(), vm.attempt.clone()))
}

/// `finish` of a powered-off VM's move: commits the definition if it moves to a new
/// `vm.toml` here (else the source committed it in place), and lets the new files go.
async fn finish_cold(
    agent: &Arc<Agent>,
    name: &str,
    spec: &VmSpec,
    storage: Option<NewStorage>,
    exports: &[String],
) -> Result<Value> {
    let st = storage.ok_or_else(|| anyhow!("VM {name}: no QMP connection"))?;
    let (own, attempt) = claim_cold_finish(agent, name).await?;
    if datastore::failpoint::fires("cold-finish-hold") {
        let go = agent.cfg.run_dir.join("cold-finish.go");
        tracing::warn!(
            "failpoint cold-finish-hold: holding the commit until {} exists",
            go.display()
        );
        while !go.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    match own {
        Some(f) => {
            let f = match commit_into(agent, name, f, spec, &st).await {
                Ok(f) => f,
                Err(e) if e.downcast_ref::<targets::InDoubt>().is_some() => {
                    // Claimed for good: no abort may delete files a committed
                    // definition may name. The source keeps its tombstone.
                    return Err(e);
                }
                Err(e) => {
                    // Surely not committed: an abort may clean up again.
                    if let Some(v) = agent.vms.lock().await.get_mut(name) {
                        v.incoming = true;
                    }
                    if let Some(a) = &attempt {
                        let _ =
                            crate::agent::state::remove_durably_async(resumed_path(agent, a)).await;
                    }
                    return Err(e);
                }
            };
            let _ = f.close().await;
        }
        // The source wrote it: the journal sees the files named and keeps them.
        None => targets::discard(agent, name).await,
    }
    agent.vms.lock().await.remove(name);
    super::release_exports(agent, exports).await;
    tracing::info!("VM {name}: its files arrived here (powered off)");
    Ok(json!({"resumed_us": 0}))
}

/// `POST /v1/vms/NAME/incoming/abort`: removes everything of an incoming VM; locks it
/// was handed go back to `handback` (per datastore uuid) by expected version.
pub async fn abort(
    agent: &Arc<Agent>,
    name: &str,
    handback: BTreeMap<Uuid, Owner>,
    attempt: Option<&str>,
) -> Result<()> {
    let vm = {
        let mut vms = agent.vms.lock().await;
        // (Reserved names are checked under the VM table's lock, as reservations are.)
        if agent.setting_up.lock().expect("setting_up").contains(name) {
            bail!("VM {name} is still being set up on this host; abort it again in a moment");
        }
        if resumed_here(agent, attempt) {
            bail!(
                "VM {name} already runs here (this host resumed that move); it cannot be aborted"
            );
        }
        match vms.get(name) {
            // A late abort of an earlier attempt: this one is not its business.
            Some(v) if v.incoming && attempt.is_some() && v.attempt.as_deref() != attempt => {
                tracing::info!("VM {name}: ignoring the abort of an earlier move attempt");
                return Ok(());
            }
            Some(v) if v.incoming => vms.remove(name),
            Some(_) => bail!("VM {name} already runs here; it cannot be aborted"),
            None => None,
        }
    };
    let Some(vm) = vm else {
        // No incoming QEMU (it ended, or an agent restart removed it): drop inactive
        // exports of the VM that may be left.
        if let Some((_, st)) = locate(agent, name).await {
            let mut left = Vec::new();
            {
                let t = agent.exports.lock().await;
                for d in &st.spec.disks {
                    let n = export_name(name, &d.name);
                    if t.get(&n).is_some_and(|e| !e.gate.is_active()) {
                        left.push(n);
                    }
                }
            }
            super::release_exports(agent, &left).await;
        }
        targets::discard(agent, name).await;
        return Ok(());
    };
    let mut vm = vm;
    // QEMU first: nothing may write once the locks go back.
    super::kill_cgroup(&vm.cgroup);
    let _ = std::fs::remove_file(super::vm_dir(agent, name).join("pid"));
    let _ = std::fs::remove_file(incoming_marker(agent, name));
    for e in &vm.exports {
        let entry = agent.exports.lock().await.remove(e);
        let Some(entry) = entry else { continue };
        agent.unpublish(e);
        let m = agent.member_by_uuid(&entry.spec.datastore);
        let _ = entry.gate.shut(false).await;
        // Handed to us but never activated: hand it back if it is ours.
        if let (Some(m), Some(to)) = (m, handback.get(&entry.spec.datastore)) {
            give_back(&m.session, &entry.spec.path, *to).await;
        }
    }
    // A host + storage move's new vm.toml (never committed) is not handed anywhere.
    if let Some(c) = vm.config.take() {
        let _ = c.close().await;
    }
    if let (Some(m), Some(to)) = (
        agent.member(&vm.datastore),
        agent
            .member(&vm.datastore)
            .and_then(|m| handback.get(m.ds.uuid()).copied()),
    ) {
        give_back(&m.session, &config_path(name), to).await;
    }
    // A host + storage move: its new files (and new vm.toml) go.
    targets::discard(agent, name).await;
    let t = agent.exports.lock().await;
    agent.save_exports(&t).await?;
    tracing::info!("VM {name}: incoming migration aborted and removed");
    Ok(())
}

/// Hands a file's lock to `to` if this host holds it.
async fn give_back(session: &Arc<datastore::files::Session>, path: &str, to: Owner) {
    let dev = session.datastore().path().to_path_buf();
    let p = path.to_string();
    let Ok(Ok(f)) =
        tokio::task::spawn_blocking(move || datastore::files::DsFile::open_readonly(&dev, &p))
            .await
    else {
        return;
    };
    let uuid = f.uuid();
    let s = Arc::clone(session);
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(Some(v)) = s.lock_version(&uuid) {
            if let Err(e) = s.handoff(&uuid, to, Some(v)) {
                tracing::error!("handing back {uuid}: {e}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Source side.

/// A control-API client for another host's agent (TCP, with the cluster secret).
#[derive(Debug, Clone)]
pub(super) struct Peer {
    addr: String,
    secret: String,
    pub(super) name: String,
}

impl Peer {
    pub(super) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        within: Duration,
    ) -> Result<Value> {
        let go = async {
            let s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("host {} at {}", self.name, self.addr))?;
            let auth = format!("Bearer {}", self.secret);
            let r = crate::http::call(
                s,
                method,
                path,
                &[("Authorization", auth.as_str())],
                body.as_ref(),
            )
            .await
            .with_context(|| format!("host {} at {}", self.name, self.addr))?;
            if r.status >= 300 {
                bail!(
                    "host {}: {}",
                    self.name,
                    r.body["error"].as_str().unwrap_or(&r.body.to_string())
                );
            }
            Ok(r.body)
        };
        tokio::time::timeout(within, go).await.map_err(|_| {
            anyhow!(
                "host {} at {} did not answer within {} s",
                self.name,
                self.addr,
                within.as_secs()
            )
        })?
    }
}

/// Finds host `name`'s agent from the heartbeat regions.
pub(super) fn peer(agent: &Agent, name: &str) -> Result<Peer> {
    let secret =
        agent.cfg.secret.clone().ok_or_else(|| {
            anyhow!("host relocation needs the cluster secret in the agent config")
        })?;
    let hosts = crate::agent::api::hosts_json(agent);
    let h = hosts
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["name"] == name)
        .ok_or_else(|| anyhow!("no host {name:?} in this host's datastores"))?;
    if h["state"] != "live" {
        bail!(
            "host {name} is {}, not live",
            h["state"].as_str().unwrap_or("unknown")
        );
    }
    let addr = h["address"].as_str().unwrap_or_default();
    if addr.is_empty() {
        bail!(
            "host {name} publishes no management address (management_listen in its agent config)"
        );
    }
    Ok(Peer {
        addr: addr.to_string(),
        secret,
        name: name.to_string(),
    })
}

/// The storage half of `relocate-vm --host H --datastore DS [--disk NAME=DS]...`.
#[derive(Debug, Clone, Default)]
pub struct StorageReq {
    /// The definition's new datastore, and every disk's not named in `disks`.
    pub datastore: Option<String>,
    /// Per-disk datastores (on the destination host).
    pub disks: BTreeMap<String, String>,
    /// `same`, `thin`, `lazy-thick` or `eager-thick`.
    pub disk_format: Option<String>,
    /// Copy rate limit (bytes/s).
    pub speed: Option<u64>,
}

/// Works out which disks move to new files (and whether the definition moves); `None`
/// when nothing but the host changes.
async fn plan_storage(
    agent: &Agent,
    name: &str,
    stored: &super::config::Stored,
    home: &str,
    req: &StorageReq,
) -> Result<Option<NewStorage>> {
    let spec = &stored.spec;
    let format: Option<diskfmt::Provisioning> = match req.disk_format.as_deref() {
        None | Some("same") => None,
        Some(f) => Some(f.parse().map_err(|e: String| anyhow!("disk format: {e}"))?),
    };
    super::relocate::check_disk_names(name, spec, req.disks.keys())?;
    let mut disks = BTreeMap::new();
    for d in &spec.disks {
        let to = req
            .disks
            .get(&d.name)
            .or(req.datastore.as_ref())
            .cloned()
            .unwrap_or_else(|| d.datastore.clone());
        let cur: diskfmt::Provisioning = d.provisioning.parse().map_err(|e: String| anyhow!(e))?;
        let prov = format.unwrap_or(cur);
        if to == d.datastore && prov == cur {
            continue;
        }
        let m = agent.member(&d.datastore).ok_or_else(|| {
            anyhow!(
                "disk {} is on datastore {:?}, not configured here",
                d.name,
                d.datastore
            )
        })?;
        let st = datastore::files::stat(&m.ds, &d.path)
            .with_context(|| format!("disk {} of VM {name}", d.name))?;
        if st
            .lock
            .as_deref()
            .is_some_and(|l| l.contains("multi-writer"))
        {
            bail!(
                "disk {} of VM {name} ({}:{}) is open multi-writer; one host cannot mirror a \
                 disk others write: close it there first",
                d.name,
                m.label(),
                d.path
            );
        }
        disks.insert(
            d.name.clone(),
            NewDisk {
                datastore: to,
                provisioning: prov.as_str().to_string(),
                allocated: st.allocated_bytes,
            },
        );
    }
    let new_home = req.datastore.clone().unwrap_or_else(|| home.to_string());
    if disks.is_empty() && new_home == home {
        return Ok(None);
    }
    Ok(Some(NewStorage {
        disks,
        home: new_home,
        generation: stored.generation,
        slot: stored.slot,
    }))
}

/// Checks a host relocation and starts it as a task.
pub async fn start(
    agent: &Arc<Agent>,
    name: &str,
    host: &str,
    params: MigrateParams,
    storage: StorageReq,
) -> Result<Arc<Task>> {
    let (home, stored) = locate(agent, name)
        .await
        .ok_or_else(|| anyhow!("no VM named {name:?} on this host's datastores"))?;
    let new_storage = plan_storage(agent, name, &stored, home.label(), &storage).await?;
    let running = agent.vms.lock().await.get(name).map(|v| v.incoming);
    let p = peer(agent, host)?;
    match running {
        Some(false) => {}
        Some(true) => bail!("VM {name} is itself migrating to this host"),
        None => {
            // Powered off: nothing moves on a shared datastore; check it can run there.
            let st = datastore::files::stat(&home.ds, &config_path(name))?;
            if let Some(holder) = st.lock {
                bail!("VM {name} is running elsewhere ({holder}): relocate it from the host that runs it");
            }
            // With storage the destination datastores do not all show here: copied over
            // NBD into files the destination makes.
            if let Some(st) = new_storage
                .as_ref()
                .filter(|st| !super::cold_move::sees_all(agent, st))
            {
                let task = agent.tasks.start("relocate-vm", name, true);
                let (a, t, st) = (Arc::clone(agent), Arc::clone(&task), st.clone());
                tokio::spawn(async move {
                    let out =
                        super::cold_move::run(&a, &t, home, stored, p, st, storage.speed).await;
                    t.finish(out.map_err(|e| format!("{e:#}")));
                });
                return Ok(task);
            }
            // With storage too: the files move here first (to datastores this host sees
            // as well), then it is a check like the above.
            let mut there = stored.spec.clone();
            let mut there_home = home.label().to_string();
            if let Some(st) = &new_storage {
                for d in there.disks.iter_mut() {
                    if let Some(nd) = st.disks.get(&d.name) {
                        d.datastore = nd.datastore.clone();
                    }
                }
                there_home = st.home.clone();
            }
            let check = p
                .call(
                    "POST",
                    &format!("/v1/vms/{name}/check"),
                    Some(json!({"spec": there, "home": there_home, "source_host": agent.cfg.host})),
                    Duration::from_secs(20),
                )
                .await;
            if let Some(st) = new_storage {
                check?;
                let task = agent.tasks.start("relocate-vm", name, true);
                let r = super::relocate::RelocateReq {
                    datastore: Some(st.home.clone()),
                    disks: st
                        .disks
                        .iter()
                        .map(|(d, nd)| (d.clone(), nd.datastore.clone()))
                        .collect(),
                    disk_format: storage.disk_format.clone(),
                    speed: storage.speed,
                    ..Default::default()
                };
                let (a, t, n, h) = (
                    Arc::clone(agent),
                    Arc::clone(&task),
                    name.to_string(),
                    host.to_string(),
                );
                tokio::spawn(async move {
                    let out = super::relocate::relocate_here(&a, &t, &n, &r).await;
                    t.finish(match out {
                        Ok(mut v) => {
                            v["host"] = json!(h);
                            v["note"] = json!(format!(
                                "VM {n} is powered off; its files moved to datastores host {h} sees: \
                                 it starts there with `ferry vm start {n} --host {h}`"
                            ));
                            Ok(v)
                        }
                        Err(e) => Err(format!("{e:#}")),
                    });
                });
                return Ok(task);
            }
            let task = agent.tasks.start("relocate-vm", name, false);
            let v = check;
            task.finish(match v {
                Ok(_) => Ok(json!({"vm": name, "running": false, "host": host,
                    "note": format!("VM {name} is powered off and its files are on datastores host {host} sees: it starts there with `ferry vm start {name} --host {host}`")})),
                Err(e) => Err(format!("{e:#}")),
            });
            return Ok(task);
        }
    }
    let task = agent.tasks.start("relocate-vm", name, true);
    let (a, t, spec, label) = (
        Arc::clone(agent),
        Arc::clone(&task),
        stored.spec,
        home.label().to_string(),
    );
    tokio::spawn(async move {
        let out = run(&a, &t, spec, label, p, params, new_storage, storage.speed).await;
        match out {
            Ok(v) => t.finish(Ok(v)),
            // Left for `resolve` (or the next agent start) to settle.
            Err(_) if t.is_unknown() => {}
            Err(e) => {
                tracing::error!("host relocation of {}: {e:#}", t.object);
                t.finish(Err(format!("{e:#}")))
            }
        }
    });
    Ok(task)
}

/// `POST /v1/vms/NAME/check`: whether this host could run the VM.
pub fn check(agent: &Agent, r: &IncomingReq) -> Result<()> {
    let missing = lacks(agent, &r.spec, &r.home);
    if !missing.is_empty() {
        bail!(
            "host {} cannot run VM {}: it lacks {}",
            agent.cfg.host,
            r.spec.name,
            missing.join(", ")
        );
    }
    Ok(())
}

/// What the source handed over (to be handed back on failure).
struct Handed {
    /// Export name → (datastore uuid, file uuid).
    exports: Vec<String>,
    config: bool,
    /// Disks copied to the destination: export name and the copy's final progress.
    copies: Vec<(String, mirror::Progress)>,
}

#[allow(clippy::too_many_arguments)]
async fn run(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    spec: VmSpec,
    home: String,
    peer: Peer,
    params: MigrateParams,
    storage: Option<NewStorage>,
    speed: Option<u64>,
) -> Result<Value> {
    let name = spec.name.clone();
    let t0 = Instant::now();
    let (qmp, exports) = {
        let vms = agent.vms.lock().await;
        let vm = vms.get(&name).ok_or_else(|| anyhow!("VM {name} stopped"))?;
        (
            vm.qmp
                .clone()
                .ok_or_else(|| anyhow!("VM {name}: no QMP connection"))?,
            vm.exports.clone(),
        )
    };
    let my_owners: BTreeMap<Uuid, Owner> = agent
        .members
        .iter()
        .map(|m| (*m.ds.uuid(), m.session.owner()))
        .collect();
    let attempt = Uuid::new_v4().to_string();
    let inc: Incoming = serde_json::from_value(
        peer.call(
            "POST",
            &format!("/v1/vms/{name}/incoming"),
            Some(json!(IncomingReq {
                spec: spec.clone(),
                home: home.clone(),
                source_host: agent.cfg.host.clone(),
                source_owners: my_owners.clone(),
                give_up_s: Some(2 * params.timeout_s.unwrap_or(300) + 60),
                storage: storage.clone(),
                multifd_channels: params.multifd_channels,
                attempt: Some(attempt.clone()),
                cold: false,
            })),
            Duration::from_secs(60),
        )
        .await?,
    )?;
    let mut handed = Handed {
        exports: Vec::new(),
        config: false,
        copies: Vec::new(),
    };
    // Host + storage: the disks that move to new files on the destination.
    let moving: Vec<String> = storage
        .iter()
        .flat_map(|s| s.disks.keys().map(|d| export_name(&name, d)))
        .collect();
    let hand_config = storage.as_ref().is_none_or(|s| s.home == home);
    let leaving = storage.as_ref().map(|st| Leaving {
        vm: name.clone(),
        host: peer.name.clone(),
        files: old_files(&name, &spec, &home, st),
        committed: false,
    });
    let mut clients = Vec::new();
    let switching = std::sync::atomic::AtomicBool::new(false);
    let out = async {
        let mut mirror_s = 0.0;
        if !moving.is_empty() {
            let m0 = Instant::now();
            mirror_disks(
                agent,
                task,
                &name,
                &inc,
                &peer,
                &moving,
                speed,
                &params,
                &mut clients,
            )
            .await?;
            mirror_s = m0.elapsed().as_secs_f64();
        }
        let mut v = migrate(
            agent,
            task,
            &qmp,
            &name,
            &home,
            &exports,
            &inc,
            &peer,
            &params,
            &moving,
            hand_config,
            leaving.as_ref(),
            &mut handed,
            (&attempt, &my_owners, &switching),
        )
        .await?;
        if !moving.is_empty() {
            v["mirror_s"] = json!(mirror_s);
        }
        Ok::<Value, anyhow::Error>(v)
    }
    .await;
    // The copies ended (in sync, or cancelled): nothing may reach the new files from
    // here any more, not even a request that was held up.
    for c in &clients {
        c.close();
    }
    match out {
        Ok(mut v) => {
            v["duration_s"] = json!(t0.elapsed().as_secs_f64());
            v["host"] = json!(peer.name);
            v["vm"] = json!(name);
            // The source QEMU's work is done.
            let _ = qmp
                .execute_within("quit", None, Duration::from_secs(5))
                .await;
            super::switchover::forget(agent, &name).await;
            if let Some(st) = &storage {
                let mut copied = 0;
                let mut disks = Vec::new();
                let new_spec = inc.spec.as_ref().unwrap_or(&spec);
                for (e, p) in &handed.copies {
                    copied += p.done_bytes;
                    let d = spec
                        .disks
                        .iter()
                        .find(|d| export_name(&name, &d.name) == *e);
                    let n = d.and_then(|d| new_spec.disks.iter().find(|x| x.name == d.name));
                    if let (Some(d), Some(n)) = (d, n) {
                        disks.push(json!({
                            "disk": d.name,
                            "from": format!("{}:{}", d.datastore, d.path),
                            "to": format!("{}:{}", n.datastore, n.path),
                            "format": n.provisioning,
                            "copied_bytes": p.done_bytes,
                            "mirrored_bytes": p.mirrored_bytes,
                        }));
                    }
                }
                v["disks"] = json!(disks);
                v["copied_bytes"] = json!(copied);
                v["datastore"] = json!(st.home);
                if let Some(mut l) = leaving {
                    l.committed = true;
                    let _ = save_leaving(agent, &l).await;
                    if datastore::failpoint::fires("both-after-commit") {
                        tracing::warn!("failpoint both-after-commit: killing the agent");
                        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                    }
                    remove_moved(agent, &l).await;
                }
            }
            Ok(v)
        }
        Err(e) if switching.load(std::sync::atomic::Ordering::SeqCst) => {
            // The destination may have completed and resumed: never resume here unless
            // it acknowledges that it did not.
            let sw = switchover_record(&name, &peer, &attempt, &home, &my_owners, &handed);
            tracing::warn!(
                "VM {name}: the switchover to host {} failed ({e:#}); asking it where the guest runs",
                peer.name
            );
            let o =
                super::switchover::ask_within(agent, &sw, super::switchover::ask_window()).await;
            if let super::switchover::Outcome::Unknown(why) = &o {
                let msg = format!(
                    "outcome unknown: VM {name} may run on host {} ({e:#}; it does not answer: \
                     {why}); the guest stays paused here; settle it with `ferry task resolve {}` \
                     once that host answers",
                    peer.name, task.id
                );
                tracing::error!("{msg}");
                task.unknown(msg.clone());
                bail!(msg);
            }
            let said = super::switchover::apply(agent, &sw, &o).await?;
            match o {
                super::switchover::Outcome::MovedThere => Ok(json!({"vm": name, "host": peer.name,
                    "running": true, "duration_s": t0.elapsed().as_secs_f64(),
                    "note": format!("{said} (its answer was lost: {e:#})")})),
                _ => Err(e.context(format!("VM {name} stays on host {}", agent.cfg.host))),
            }
        }
        Err(e) => {
            tracing::warn!("VM {name}: host relocation failed, staying here: {e:#}");
            for e in &moving {
                if let Some((gate, _)) = agent.export_gate(e).await {
                    gate.abort_mirror().await;
                }
            }
            if rollback(
                agent, &qmp, &name, &home, &peer, &handed, &my_owners, &attempt,
            )
            .await
            {
                // The destination had resumed it after all (its answer was lost).
                let _ = qmp
                    .execute_within("quit", None, Duration::from_secs(5))
                    .await;
                return Ok(json!({"vm": name, "host": peer.name, "running": true,
                    "duration_s": t0.elapsed().as_secs_f64(),
                    "note": format!("the destination resumed the VM but its answer was lost: {e:#}")}));
            }
            let _ = std::fs::remove_file(leaving_path(agent, &name));
            Err(e.context(format!("VM {name} stays on host {}", agent.cfg.host)))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    qmp: &Arc<Qmp>,
    name: &str,
    home: &str,
    exports: &[String],
    inc: &Incoming,
    peer: &Peer,
    params: &MigrateParams,
    moving: &[String],
    hand_config: bool,
    leaving: Option<&Leaving>,
    handed: &mut Handed,
    (attempt, my_owners, switching): (&str, &BTreeMap<Uuid, Owner>, &std::sync::atomic::AtomicBool),
) -> Result<Value> {
    // Every setting is given each time: QEMU keeps them from an earlier (failed) attempt.
    let multifd = params.multifd_channels.unwrap_or(1) > 1;
    let caps = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "pause-before-switchover", "state": true}),
        json!({"capability": "auto-converge", "state": true}),
        json!({"capability": "multifd", "state": multifd}),
    ];
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": caps})),
    )
    .await?;
    let mut p = serde_json::Map::new();
    p.insert(
        "downtime-limit".into(),
        json!(params.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
    );
    p.insert(
        "max-bandwidth".into(),
        json!(params.bandwidth.unwrap_or(DEFAULT_BANDWIDTH)),
    );
    if multifd {
        p.insert("multifd-channels".into(), json!(params.multifd_channels));
    }
    qmp.execute("migrate-set-parameters", Some(Value::Object(p)))
        .await?;
    // The definition's lock goes first, before the guest stops: it only says which host
    // runs the VM (a third host is refused either way), and it is handed back if the
    // move fails. The disks' locks wait for the pre-switchover window. (When the
    // definition changes datastore, its new file is the destination's from the start
    // and the old one stays locked here until it is deleted.)
    if hand_config {
        let m = agent
            .member(home)
            .ok_or_else(|| anyhow!("datastore {home} is gone"))?;
        let to = *inc
            .owners
            .get(m.ds.uuid())
            .ok_or_else(|| anyhow!("host {} does not see datastore {home}", peer.name))?;
        let cfg = agent
            .vms
            .lock()
            .await
            .get_mut(name)
            .and_then(|v| v.config.take());
        if let Some(cfg) = cfg {
            let uuid = cfg.uuid();
            cfg.detach().await?;
            let s = Arc::clone(&m.session);
            tokio::task::spawn_blocking(move || {
                let v = s.lock_version(&uuid)?;
                s.handoff(&uuid, to, v)
            })
            .await
            .expect("handoff task")
            .context("handing the definition's lock over")?;
            handed.config = true;
        }
    }
    let mut ev = qmp.events();
    let started = Instant::now();
    task.stage("migrating memory");
    qmp.execute("migrate", Some(json!({"uri": inc.uri})))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(params.timeout_s.unwrap_or(300));
    let mut stopped_us = 0u64;
    // Until the pre-switchover window: woken by QEMU's MIGRATION events (and every
    // 200 ms for progress, cancel and the deadline).
    loop {
        if task.cancelled() {
            bail!("cancelled");
        }
        if Instant::now() > deadline {
            bail!(
                "the migration did not converge within {} s",
                params.timeout_s.unwrap_or(300)
            );
        }
        let st = qmp.execute("query-migrate", None).await?;
        if let Some(ram) = st.get("ram") {
            let total = ram["total"].as_u64().unwrap_or(0);
            let left = ram["remaining"].as_u64().unwrap_or(0);
            task.progress(total.saturating_sub(left), total);
        }
        match st["status"].as_str() {
            Some("pre-switchover") => break,
            Some("failed") => bail!(
                "the migration failed: {}",
                st["error-desc"].as_str().unwrap_or("(QEMU gave no reason)")
            ),
            Some("cancelled") => bail!("the migration was cancelled"),
            _ => {}
        }
        let tick = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                _ = &mut tick => break,
                e = ev.recv() => match e {
                    Ok(e) if e.name == "STOP" => stopped_us = e.timestamp_us,
                    Ok(e) if e.name == "MIGRATION" => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
            }
        }
    }
    while let Ok(e) = ev.try_recv() {
        if e.name == "STOP" {
            stopped_us = e.timestamp_us;
        }
    }
    task.stage("switching over");
    // Pre-switchover: the source is stopped and its I/O flushed. Before handing any lock
    // over, make sure the destination agent is still there to take it (handing locks to
    // a host whose agent died would leave the VM waiting for host_dead).
    peer.call("GET", "/v1/host", None, Duration::from_secs(5))
        .await
        .context("the destination agent stopped answering before the lock handoff")?;
    // Hand every lock over; a disk moving to a new file instead ends its mirror, in
    // sync (the new file is the destination's own), and lets its lock go.
    for e in exports {
        let (gate, ds) = agent
            .export_gate(e)
            .await
            .ok_or_else(|| anyhow!("export {e} is gone"))?;
        if moving.contains(e) {
            let p = gate
                .release_synced(Duration::from_secs(10))
                .await
                .with_context(|| format!("completing the copy of export {e}"))?;
            handed.copies.push((e.clone(), p));
        } else {
            let m = agent
                .member_by_uuid(&ds)
                .ok_or_else(|| anyhow!("datastore {ds} is gone"))?;
            let to = *inc.owners.get(&ds).ok_or_else(|| {
                anyhow!("host {} does not see datastore {}", peer.name, m.label())
            })?;
            let version = gate.lock_version(&m.session).await;
            gate.deactivate(&m.session, Some(to), version)
                .await
                .with_context(|| format!("handing export {e} to host {}", peer.name))?;
        }
        handed.exports.push(e.clone());
        let mut t = agent.exports.lock().await;
        if let Some(x) = t.get_mut(e) {
            x.spec.active = false;
        }
        agent.save_exports(&t).await?;
    }
    if datastore::failpoint::fires("migrate-after-handoff") {
        bail!("failpoint migrate-after-handoff");
    }
    // A host + storage move commits on the destination next: from here a restarted
    // agent must find out whether it did, to delete the old files (or keep them).
    if let Some(l) = leaving {
        save_leaving(agent, l).await?;
    }
    // From here the destination may complete and resume the guest without this host
    // hearing of it: the outcome is settled by asking it ([`super::switchover`]).
    super::switchover::save(
        agent,
        switchover_record(name, peer, attempt, home, my_owners, handed),
    )
    .await?;
    switching.store(true, std::sync::atomic::Ordering::SeqCst);
    // The destination takes the disks (its locks now) while QEMU sends the device state;
    // it resumes the guest as soon as its side of the migration has completed.
    let finish_path = format!("/v1/vms/{name}/incoming/finish");
    let finish = async {
        if datastore::failpoint::fires("switchover-hold-finish") {
            let go = agent.cfg.run_dir.join("switchover.go");
            tracing::warn!(
                "failpoint switchover-hold-finish: holding the finish call until {} exists",
                go.display()
            );
            while !go.exists() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let within = datastore::failpoint::setting("finish-window-s")
            .map(Duration::from_secs)
            .unwrap_or_else(|| finish_window(agent));
        peer.call("POST", &finish_path, None, within).await
    };
    let complete = async {
        qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
            .await?;
        loop {
            let st = qmp.execute("query-migrate", None).await?;
            match st["status"].as_str() {
                Some("completed") => break Ok::<Value, anyhow::Error>(st),
                Some("failed") | Some("cancelled") => bail!(
                    "the migration {} after the switchover began: {}",
                    st["status"].as_str().unwrap_or("failed"),
                    st["error-desc"].as_str().unwrap_or("(no reason)")
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("the migration did not complete");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (done, final_state) = tokio::join!(finish, complete);
    let final_state = final_state?;
    let done = done?;
    let resumed_us = done["resumed_us"].as_u64().unwrap_or(0);
    let pause_ms = if resumed_us > stopped_us && stopped_us > 0 {
        (resumed_us - stopped_us) as f64 / 1000.0
    } else {
        f64::NAN
    };
    Ok(json!({
        "running": true,
        "pause_ms": pause_ms,
        "migration_s": started.elapsed().as_secs_f64(),
        "ram_transferred_bytes": final_state["ram"]["transferred"],
        "ram_total_bytes": final_state["ram"]["total"],
    }))
}

/// How long the source waits for the destination's `finish`: the longest legitimate
/// lock wait there (a datastore's host_dead plus four I/O timeouts) and the completion.
fn finish_window(agent: &Agent) -> Duration {
    let locks = agent
        .members
        .iter()
        .map(|m| {
            let sb = m.ds.superblock();
            sb.host_dead() + 4 * sb.io_timeout()
        })
        .max()
        .unwrap_or_default();
    locks + COMPLETION_WAIT + Duration::from_secs(10)
}

fn switchover_record(
    name: &str,
    peer: &Peer,
    attempt: &str,
    home: &str,
    my_owners: &BTreeMap<Uuid, Owner>,
    handed: &Handed,
) -> super::switchover::Switchover {
    super::switchover::Switchover {
        vm: name.to_string(),
        host: peer.name.clone(),
        attempt: attempt.to_string(),
        home: home.to_string(),
        handback: my_owners.clone(),
        exports: handed.exports.clone(),
        config: handed.config,
    }
}

/// Mirrors each moving disk into the destination's export of its new file (NBD over
/// TCP) until every one is in sync; the mirrors stay in their exports and keep the
/// new files in sync until the pre-switchover window ends them.
#[allow(clippy::too_many_arguments)]
async fn mirror_disks(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    name: &str,
    inc: &Incoming,
    peer: &Peer,
    moving: &[String],
    speed: Option<u64>,
    params: &MigrateParams,
    clients: &mut Vec<Arc<NbdClient>>,
) -> Result<()> {
    let addr = inc.nbd.clone().ok_or_else(|| {
        anyhow!(
            "host {} serves no NBD over TCP (nbd_listen in its agent config): the disks cannot be copied there",
            peer.name
        )
    })?;
    let secret = agent.cfg.secret.clone().unwrap_or_default();
    let mut out = Vec::new();
    for e in moving {
        let (gate, _) = agent
            .export_gate(e)
            .await
            .ok_or_else(|| anyhow!("export {e} is gone"))?;
        let target = NbdClient::connect_tcp(&addr, &crate::agent::exports::tcp_name(&secret, e))
            .await
            .with_context(|| {
                format!(
                    "host {}: the new file of export {e} over NBD at {addr}",
                    peer.name
                )
            })?
            .reconnect_for(Duration::from_secs(2));
        let target = Arc::new(target);
        clients.push(Arc::clone(&target));
        // Over the network a target that stops answering must not hold guest writes
        // long: they are answered from the source after 3 s (the range is sent again).
        let opts = mirror::Options {
            speed,
            target_timeout: Duration::from_secs(3),
            ..mirror::Options::default()
        };
        let m = gate.start_mirror_remote(target, opts).await?;
        tracing::info!(
            "VM {name}: mirroring export {e} to host {} ({addr})",
            peer.name
        );
        out.push((format!("export {e}"), m));
    }
    let limit = params.timeout_s.unwrap_or(300);
    wait_in_sync(task, &out, &peer.name, Some(limit)).await
}

/// Waits until every mirror (labelled for messages) is in sync, reporting progress in
/// `task` (stage `copying disks`); fails on a mirror's failure, a cancel, or after
/// `limit_s`.
pub(super) async fn wait_in_sync(
    task: &Task,
    mirrors: &[(String, Arc<mirror::Mirror>)],
    host: &str,
    limit_s: Option<u64>,
) -> Result<()> {
    task.stage("copying disks");
    let deadline = limit_s.map(|l| Instant::now() + Duration::from_secs(l));
    loop {
        let (mut done, mut total, mut ready) = (0u64, 0u64, true);
        for (what, m) in mirrors {
            let p = m.progress();
            done += p.done_bytes;
            total += p.total_bytes;
            match m.phase() {
                mirror::Phase::Ready => {}
                mirror::Phase::Failed(err) => bail!("copying {what} to host {host}: {err}"),
                mirror::Phase::Cancelled => bail!("the copy of {what} was cancelled"),
                _ => ready = false,
            }
        }
        task.progress(done.min(total), total);
        if ready {
            return Ok(());
        }
        if task.cancelled() {
            bail!("cancelled while copying the disks");
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            bail!(
                "the disks' copy to host {host} was not in sync within {} s",
                limit_s.unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a host + storage move leaves on this host, to delete once the destination
/// runs the VM (`state_dir/leaving/VM.json`, written before the destination commits).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leaving {
    vm: String,
    /// The destination host.
    host: String,
    /// Datastore label and path of each file to delete.
    files: Vec<(String, String)>,
    /// The destination confirmed the commit.
    committed: bool,
}

fn leaving_path(agent: &Agent, vm: &str) -> std::path::PathBuf {
    agent
        .cfg
        .state_dir
        .join("leaving")
        .join(format!("{vm}.json"))
}

pub(super) async fn forget_leaving(agent: &Agent, vm: &str) {
    super::relocate::remove_durably_async(leaving_path(agent, vm)).await
}

async fn save_leaving(agent: &Agent, l: &Leaving) -> Result<()> {
    super::relocate::write_durably_async(leaving_path(agent, &l.vm), l.clone()).await
}

/// The files a host + storage move leaves here: the disks that moved, and `vm.toml` if
/// the definition moved.
fn old_files(name: &str, spec: &VmSpec, home: &str, st: &NewStorage) -> Vec<(String, String)> {
    spec.disks
        .iter()
        .filter(|d| st.disks.contains_key(&d.name))
        .map(|d| (d.datastore.clone(), d.path.clone()))
        .chain((st.home != home).then(|| (home.to_string(), config_path(name))))
        .collect()
}

/// After a host + storage move: deletes the files the VM left here once its QEMU and
/// exports are gone, then the journal.
async fn remove_moved(agent: &Agent, l: &Leaving) {
    let name = &l.vm;
    let t0 = Instant::now();
    while agent.vms.lock().await.contains_key(name) && t0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exports still naming the old files (an agent restarted meanwhile restored them).
    let stale: Vec<String> = {
        let t = agent.exports.lock().await;
        t.iter()
            .filter(|(_, e)| {
                l.files.iter().any(|(ds, path)| {
                    agent
                        .member(ds)
                        .is_some_and(|m| m.ds.uuid() == &e.spec.datastore)
                        && e.spec.path == *path
                })
            })
            .map(|(n, _)| n.clone())
            .collect()
    };
    super::release_exports(agent, &stale).await;
    for (ds, path) in &l.files {
        let Some(m) = agent.member(ds) else { continue };
        match m.session.remove(path).await {
            Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
            Err(e) => tracing::error!("VM {name}: removing its old file {ds}:{path}: {e}"),
        }
    }
    super::relocate::remove_empty_folders(agent, name).await;
    let _ = std::fs::remove_file(leaving_path(agent, name));
}

/// Whether VM `vm`'s newest committed definition no longer names the disk files it
/// left here, read here and else through the destination (the new definition may be on
/// a datastore only it sees): `None` if neither can tell (then nothing is decided).
async fn moved_by_definition(agent: &Agent, l: &Leaving) -> Option<bool> {
    let cfg = config_path(&l.vm);
    let names_old = |disks: &[super::spec::Disk]| {
        disks.iter().any(|d| {
            l.files
                .iter()
                .any(|(ds, p)| *p != cfg && d.datastore == *ds && d.path == *p)
        })
    };
    if let Some((_, st)) = locate(agent, &l.vm).await {
        if !names_old(&st.spec.disks) {
            return Some(true);
        }
    }
    let v = peer(agent, &l.host)
        .ok()?
        .call(
            "GET",
            &format!("/v1/vms/{}", l.vm),
            None,
            Duration::from_secs(10),
        )
        .await
        .ok()?;
    let disks: Vec<super::spec::Disk> = serde_json::from_value(v["disks"].clone()).ok()?;
    Some(!names_old(&disks))
}

/// After the guest moved (or may have): deletes the old files of a host + storage move
/// only if the committed definition names the new ones; keeps them, forgetting the
/// journal, if it names the old ones; decides nothing (keeps the journal) if it cannot
/// be read.
pub(super) async fn settle_leaving(agent: &Agent, vm: &str) {
    let Some(l) = std::fs::read(leaving_path(agent, vm))
        .ok()
        .and_then(|b| serde_json::from_slice::<Leaving>(&b).ok())
    else {
        return;
    };
    if l.committed {
        remove_moved(agent, &l).await;
        return;
    }
    match moved_by_definition(agent, &l).await {
        Some(true) => {
            tracing::warn!(
                "VM {vm}: its definition names its new files; deleting the old ones here"
            );
            remove_moved(agent, &l).await;
        }
        Some(false) => {
            tracing::warn!("VM {vm}: its definition still names the files here; they stay");
            super::relocate::remove_durably_async(leaving_path(agent, vm)).await;
        }
        None => tracing::warn!(
            "VM {vm}: its definition cannot be read; its old files stay until it can"
        ),
    }
}

/// Settles host + storage moves an earlier agent process left (after the exports were
/// restored): a confirmed commit deletes the old files at once; otherwise the committed
/// definition decides ([`settle_leaving`]), read again until it can be. A move whose
/// switchover is still in doubt is left to [`super::switchover`].
pub fn recover_leaving(agent: &Arc<Agent>) {
    let Ok(rd) = std::fs::read_dir(agent.cfg.state_dir.join("leaving")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(l) = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Leaving>(&b).ok())
        else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let a = Arc::clone(agent);
        tokio::spawn(async move {
            for _ in 0..360 {
                if super::switchover::in_doubt(&a, &l.vm) {
                    return;
                }
                settle_leaving(&a, &l.vm).await;
                if !leaving_path(&a, &l.vm).exists() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
}

/// Sends an incoming VM's abort to `peer` again every 2 s (for two minutes) until it
/// is answered — say, once a cut link is back — while the VM goes on here.
pub(super) fn retry_abort(peer: &Peer, name: &str, body: Value) {
    let (peer, n) = (peer.clone(), name.to_string());
    let path = format!("/v1/vms/{name}/incoming/abort");
    tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            match peer
                .call("POST", &path, Some(body.clone()), Duration::from_secs(10))
                .await
            {
                Ok(_) => {
                    tracing::info!("VM {n}: the destination cleaned up");
                    return;
                }
                Err(e) => tracing::debug!("VM {n}: abort on the destination: {e:#}"),
            }
        }
    });
}

/// Puts the VM back as it was on this host: the migration cancelled (QEMU resumes the
/// source), locks handed back by the destination, exports active again, the destination
/// cleaned. Returns true if the destination already runs the VM (nothing to roll back).
#[allow(clippy::too_many_arguments)]
async fn rollback(
    agent: &Arc<Agent>,
    qmp: &Arc<Qmp>,
    name: &str,
    home: &str,
    peer: &Peer,
    handed: &Handed,
    my_owners: &BTreeMap<Uuid, Owner>,
    attempt: &str,
) -> bool {
    // (A disk that moved to a new file was only released: taking it back is immediate.)
    let _ = qmp.execute("migrate_cancel", None).await;
    // Ask the destination to remove its QEMU and exports and hand our locks back. With
    // nothing handed yet the source does not need its answer: the request is retried in
    // the background (say, until a cut link is back) while the VM goes on here.
    let body = json!({"handback": my_owners, "attempt": attempt});
    let path = format!("/v1/vms/{name}/incoming/abort");
    match peer
        .call("POST", &path, Some(body.clone()), Duration::from_secs(10))
        .await
    {
        Ok(_) => {}
        Err(e) if format!("{e:#}").contains("already runs here") => return true,
        Err(e) => {
            tracing::warn!("VM {name}: the destination did not clean up yet: {e:#}; retrying in the background");
            retry_abort(peer, name, body);
        }
    }
    // Our locks come back (handed back, or broken once the destination is dead if it
    // vanished with them), and the guest runs on here.
    super::switchover::take_back(agent, Some(qmp), name, home, &handed.exports, handed.config)
        .await;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_out_of_range_are_refused_by_name() {
        let ok = MigrateParams {
            downtime_ms: Some(300),
            bandwidth: Some(1 << 30),
            multifd_channels: Some(4),
            timeout_s: Some(600),
        };
        ok.check().unwrap();
        MigrateParams::default().check().unwrap();
        // A huge timeout overflowed the destination's give-up time (a panic after the
        // definition was handed over).
        for (p, field) in [
            (
                MigrateParams {
                    timeout_s: Some(u64::MAX),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                MigrateParams {
                    timeout_s: Some(0),
                    ..ok.clone()
                },
                "timeout_s",
            ),
            (
                MigrateParams {
                    downtime_ms: Some(0),
                    ..ok.clone()
                },
                "downtime_ms",
            ),
            (
                MigrateParams {
                    bandwidth: Some(1),
                    ..ok.clone()
                },
                "bandwidth",
            ),
            (
                MigrateParams {
                    multifd_channels: Some(1000),
                    ..ok.clone()
                },
                "multifd_channels",
            ),
        ] {
            let e = p.check().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
