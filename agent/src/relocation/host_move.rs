//! Live host relocation (vMotion), the source's half: a running VM's memory, CPU and
//! device state move to another host that sees the same datastores; the disks stay and
//! change owner. The destination's half is [`super::incoming`].
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

use crate::error::{bail, fail, Context, Error, Kind, Result};
use datastore::Owner;
use serde_json::{json, Value};
use uuid::Uuid;

use super::decide::{decide, Move};
use super::leaving::{leaving_path, old_files, remove_moved, save_leaving, Leaving};
use super::peer::{peer, retry_abort, Peer};
use super::sync::wait_in_sync;
use crate::host::membership::Member;
use crate::host::tasks::Task;
use crate::host::Agent;
use crate::vms::{config_path, export_name, locate};
use crate::wire::{Incoming, IncomingReq, MigrateParams, NewDisk, NewStorage, COMPLETION_WAIT};
use nbd::NbdClient;
use vm_glue::definition::Stored;
use vm_glue::qmp::Qmp;
use vm_glue::spec::VmSpec;

mod disks;
use disks::{mirror_disks, rollback};

/// QEMU's own defaults (7.2), set again for every migration.
const DEFAULT_DOWNTIME_MS: u64 = 300;
const DEFAULT_BANDWIDTH: u64 = 128 << 20;

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
    stored: &vm_glue::definition::Stored,
    home: &str,
    req: &StorageReq,
) -> Result<Option<NewStorage>> {
    let spec = &stored.spec;
    let format: Option<diskfmt::Provisioning> = match req.disk_format.as_deref() {
        None | Some("same") => None,
        Some(f) => Some(f.parse().map_err(|e: String| fail!("disk format: {e}"))?),
    };
    super::paths::check_disk_names(name, spec, req.disks.keys())?;
    let mut disks = BTreeMap::new();
    for d in &spec.disks {
        let to = req
            .disks
            .get(&d.name)
            .or(req.datastore.as_ref())
            .cloned()
            .unwrap_or_else(|| d.datastore.clone());
        let cur: diskfmt::Provisioning = d.provisioning.parse().map_err(|e: String| fail!(e))?;
        let prov = format.unwrap_or(cur);
        if to == d.datastore && prov == cur {
            continue;
        }
        let m = agent.member(&d.datastore).ok_or_else(|| {
            fail!(
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
    let (home, stored) = locate(agent, name).await.ok_or_else(|| {
        Error::not_found(format!("no VM named {name:?} on this host's datastores"))
    })?;
    let new_storage = plan_storage(agent, name, &stored, home.label(), &storage).await?;
    let running = match agent.vms.lock().await.get(name).map(|v| v.incoming) {
        Some(true) => bail!("VM {name} is itself migrating to this host"),
        r => r.is_some(),
    };
    let p = peer(agent, host)?;
    if !running {
        let st = datastore::files::stat(&home.ds, &config_path(name))?;
        if let Some(holder) = st.lock {
            bail!(
                "VM {name} is running elsewhere ({holder}): relocate it from the host that runs it"
            );
        }
    }
    let sees = new_storage
        .as_ref()
        .is_none_or(|st| super::cold_move::sees_all(agent, st));
    match decide(true, running, new_storage.is_some(), sees) {
        Move::Host { .. } => {}
        Move::PoweredOffOverNbd => {
            let st = new_storage.ok_or_else(|| fail!("VM {name}: no storage to copy"))?;
            let task = agent.tasks.start("relocate-vm", name, true);
            let (a, t, st) = (Arc::clone(agent), Arc::clone(&task), st);
            tokio::spawn(async move {
                let out = super::cold_move::run(&a, &t, home, stored, p, st, storage.speed).await;
                t.finish(out.map_err(|e| format!("{e:#}")));
            });
            return Ok(task);
        }
        Move::Storage => bail!("VM {name}: moving to host {host} is not a storage move"),
        Move::PoweredOffCheck | Move::PoweredOffStorageHere => {
            return powered_off_elsewhere(agent, name, host, home, stored, p, new_storage, storage)
                .await;
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

/// A powered-off VM to another host that sees (or will see, once its files moved here)
/// all of its files: the files move first if they must, then the destination is
/// checked; the VM starts there by `vm start --host`.
#[allow(clippy::too_many_arguments)]
async fn powered_off_elsewhere(
    agent: &Arc<Agent>,
    name: &str,
    host: &str,
    home: Arc<Member>,
    stored: Stored,
    p: Peer,
    new_storage: Option<NewStorage>,
    storage: StorageReq,
) -> Result<Arc<Task>> {
    // With storage: the files move here first (to datastores this host sees as
    // well); the destination is checked before.
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
        let r = super::storage::RelocateReq {
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
            let out = super::storage::relocate_here(&a, &t, &n, &r).await;
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
    Ok(task)
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
        let vm = vms.get(&name).ok_or_else(|| fail!("VM {name} stopped"))?;
        (
            vm.qmp
                .clone()
                .ok_or_else(|| fail!("VM {name}: no QMP connection"))?,
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
        Ok::<Value, crate::error::Error>(v)
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
            quit_source(agent, &qmp, &name).await;
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
            .ok_or_else(|| fail!("datastore {home} is gone"))?;
        let to = *inc
            .owners
            .get(m.ds.uuid())
            .ok_or_else(|| fail!("host {} does not see datastore {home}", peer.name))?;
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
            .ok_or_else(|| fail!("export {e} is gone"))?;
        if moving.contains(e) {
            let p = gate
                .release_synced(Duration::from_secs(10))
                .await
                .with_context(|| format!("completing the copy of export {e}"))?;
            handed.copies.push((e.clone(), p));
        } else {
            let m = agent
                .member_by_uuid(&ds)
                .ok_or_else(|| fail!("datastore {ds} is gone"))?;
            let to = *inc
                .owners
                .get(&ds)
                .ok_or_else(|| fail!("host {} does not see datastore {}", peer.name, m.label()))?;
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
                Some("completed") => break Ok::<Value, crate::error::Error>(st),
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

/// Ends the source's QEMU once the destination runs the guest, and waits until this
/// host no longer lists the VM as its own (its exports and locks released), so that
/// when the move is reported done only the destination shows the VM running. A QEMU
/// that does not quit is killed.
async fn quit_source(agent: &Arc<Agent>, qmp: &Qmp, name: &str) {
    let _ = qmp
        .execute_within("quit", None, Duration::from_secs(5))
        .await;
    let gone = || async { !agent.vms.lock().await.contains_key(name) };
    let until = Instant::now() + Duration::from_secs(10);
    while !gone().await && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if gone().await {
        return;
    }
    let cgroup = agent.vms.lock().await.get(name).map(|v| v.cgroup.clone());
    if let Some(cg) = cgroup {
        tracing::warn!("VM {name}: the source QEMU did not quit after the move; killing it");
        let _ = tokio::task::spawn_blocking(move || crate::vms::kill_cgroup(&cg)).await;
    }
    let until = Instant::now() + Duration::from_secs(5);
    while !gone().await && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
