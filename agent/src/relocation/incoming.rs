//! The destination's half of a host move: `incoming` prepares this host (the VM's files
//! exported inactive, QEMU started paused and waiting, or — host + storage — the new
//! files made, [`super::targets`]); `finish` takes over once the source's migration
//! completed (locks activated, the definition taken or committed, the guest resumed
//! under a claim no abort can undo); `abort` removes whatever an unfinished move left;
//! `check` says whether this host could run a VM at all.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, fail, Context, Error, Kind, Result};
use datastore::{LockMode, Owner};
use serde_json::{json, Value};
use uuid::Uuid;

use super::targets;
use crate::host::exports::{ExportSpec, Gate};
use crate::host::Agent;
use crate::host::RunningVm;
use crate::vms::{config_path, export_name, locate};
use crate::wire::{Incoming, IncomingReq, NewStorage, COMPLETION_WAIT};
use vm_glue::spec::VmSpec;

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
    r.spec.validate().map_err(Error::invalid)?;
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
        let (pid, qmp, cgroup, accel) = crate::vms::launch(agent, &spec, &exports, true).await?;
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
                .ok_or_else(|| fail!("host {} has no management address", agent.cfg.host))?;
            let port = std::net::TcpListener::bind((ip.as_str(), 0))?
                .local_addr()?
                .port();
            let uri = format!("tcp:{ip}:{port}");
            qmp.execute("migrate-incoming", Some(json!({"uri": uri})))
                .await?;
            Ok::<String, crate::error::Error>(uri)
        }
        .await;
        match started {
            Ok(uri) => Ok((pid, Some(qmp), cgroup, accel, uri, exports)),
            Err(e) => {
                crate::vms::kill_cgroup(&cgroup);
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
                crate::vms::watch(Arc::clone(agent), name.to_string(), pid);
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
            crate::vms::release_exports(agent, &exports).await;
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
            .ok_or_else(|| fail!("VM {name} is not migrating to this host"))?;
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
            .ok_or_else(|| fail!("export {e} is gone"))?;
        let m = agent
            .member_by_uuid(&ds)
            .ok_or_else(|| fail!("datastore {ds} is gone"))?;
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
                    .ok_or_else(|| fail!("datastore {home} is gone"))?;
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
                let _ = std::fs::remove_file(crate::vms::vm_dir(agent, name).join("resuming"));
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
    let _ = std::fs::remove_file(crate::vms::vm_dir(agent, name).join("resuming"));
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

/// This host's QEMU of an incoming move that has not resumed the guest yet.
fn incoming_marker(agent: &Agent, name: &str) -> std::path::PathBuf {
    crate::vms::vm_dir(agent, name).join("incoming")
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
        .ok_or_else(|| fail!("VM {name}: its incoming move was aborted"))?;
    if let Some(a) = &vm.attempt {
        crate::host::state::write_durably_async(resumed_path(agent, a), json!({"vm": name}))
            .await?;
    }
    // An agent restarted before `cont` went through resumes the guest.
    let dir = crate::vms::vm_dir(agent, name);
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
        .ok_or_else(|| fail!("VM {name}: its incoming move was aborted"))?;
    if let Some(a) = &vm.attempt {
        crate::host::state::write_durably_async(
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
    let st = storage.ok_or_else(|| fail!("VM {name}: no QMP connection"))?;
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
                Err(e) if e.kind() == Kind::InDoubt => {
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
                            crate::host::state::remove_durably_async(resumed_path(agent, a)).await;
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
    crate::vms::release_exports(agent, exports).await;
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
            return Err(Error::of(
                Kind::RunsThere,
                format!("VM {name} already runs here (this host resumed that move); it cannot be aborted"),
            ));
        }
        match vms.get(name) {
            // A late abort of an earlier attempt: this one is not its business.
            Some(v) if v.incoming && attempt.is_some() && v.attempt.as_deref() != attempt => {
                tracing::info!("VM {name}: ignoring the abort of an earlier move attempt");
                return Ok(());
            }
            Some(v) if v.incoming => vms.remove(name),
            Some(_) => {
                return Err(Error::of(
                    Kind::RunsThere,
                    format!("VM {name} already runs here; it cannot be aborted"),
                ))
            }
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
            crate::vms::release_exports(agent, &left).await;
        }
        targets::discard(agent, name).await;
        return Ok(());
    };
    let mut vm = vm;
    // QEMU first: nothing may write once the locks go back.
    crate::vms::kill_cgroup(&vm.cgroup);
    let _ = std::fs::remove_file(crate::vms::vm_dir(agent, name).join("pid"));
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
