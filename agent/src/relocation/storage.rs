//! Storage relocation (Storage vMotion): moves a VM's disks — and its definition — to
//! other datastores, live or powered off, with the [`mirror`] engine.
//!
//! Running VM: each disk's export mirrors its file into a new file on the destination
//! datastore; when every disk is in sync, the pivot holds guest I/O on all of them,
//! writes the definition naming the new files (the commit point: `vm.toml` rewritten
//! into its other slot, or created on its new datastore with the next generation), lets
//! I/O go on to the new files, and then deletes the old ones. QEMU is not involved.
//! Powered-off VM: the same engine copies with nobody writing, under the definition's
//! lock so the VM cannot start meanwhile.
//!
//! A journal in `state_dir/relocations/<vm>.json` names the old and new files. An agent
//! restarted after a crash settles it before serving any export ([`recover`]): the
//! newest valid definition decides — if it names the new files, the relocation is
//! finished (exports point there, old files deleted); otherwise it is undone (new files
//! deleted). Either way no acknowledged write is lost: until the commit the old files
//! are the disks and hold everything; from the commit the new ones hold everything the
//! old ones did (all in sync and flushed, guest I/O held).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, fail, Context, Error, Result};
use datastore::files::DsFile;
use datastore::LockMode;
use diskfmt::{BlockDev, Provisioning};
use mirror::{Mirror, Phase};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::paths::{check_disk_names, remove_empty_folders, target_path};
use crate::host::exports::ExportSpec;
use crate::host::membership::Member;
use crate::host::tasks::Task;
use crate::host::Agent;
use crate::vms::{config_path, export_name, locate};
use vm_glue::definition::{self, Stored, CONFIG_SIZE};
use vm_glue::spec::VmSpec;

/// What `POST /v1/vms/NAME/relocate` asks for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelocateReq {
    /// The new home of the definition, and of every disk not named in `disks`.
    pub datastore: Option<String>,
    /// Per-disk destinations: disk name → datastore.
    #[serde(default)]
    pub disks: BTreeMap<String, String>,
    /// `same` (default), `thin`, `lazy-thick` or `eager-thick`.
    pub disk_format: Option<String>,
    /// Bulk copy rate limit in bytes/s.
    pub speed: Option<u64>,
    /// Another host: live host relocation ([`super::host_move`]).
    pub host: Option<String>,
    /// Host relocation: longest acceptable guest stop at switchover (ms).
    pub downtime_ms: Option<u64>,
    /// Host relocation: bandwidth limit (bytes/s).
    pub bandwidth: Option<u64>,
    /// Host relocation: parallel migration connections.
    pub multifd_channels: Option<u32>,
    /// Host relocation: give up after this long (s).
    pub timeout_s: Option<u64>,
}

impl RelocateReq {
    /// The host relocation's settings.
    pub fn params(&self) -> crate::wire::MigrateParams {
        crate::wire::MigrateParams {
            downtime_ms: self.downtime_ms,
            bandwidth: self.bandwidth,
            multifd_channels: self.multifd_channels,
            timeout_s: self.timeout_s,
        }
    }
}

/// One disk's move.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskMove {
    disk: String,
    size: u64,
    from_ds: Uuid,
    from_path: String,
    to_ds: Uuid,
    to_path: String,
    to_prov: Provisioning,
}

/// The journal of a relocation in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    vm: String,
    config_from: Uuid,
    config_to: Uuid,
    /// The generation the committed definition has.
    generation: u64,
    moves: Vec<DiskMove>,
}

/// Test hooks ([`datastore::failpoint`]): `pivot-before-config`, `pivot-after-config`,
/// `pivot-after-switch` kill the agent (SIGKILL) at that pivot step; `mirror-freeze`
/// freezes the bulk copiers once every disk is ready and holds the pivot until
/// `run_dir/relocations/<vm>.go` exists; `pivot-flush-fails=N` fails the N-th disk's new
/// file from the pivot on ([`super::fault`]).
fn crash_at(name: &str) {
    if datastore::failpoint::fires(name) {
        tracing::warn!("failpoint {name}: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

fn journal_path(agent: &Agent, vm: &str) -> PathBuf {
    agent
        .cfg
        .state_dir
        .join("relocations")
        .join(format!("{vm}.json"))
}

async fn save_journal(agent: &Agent, j: &Journal) -> Result<()> {
    write_durably_async(journal_path(agent, &j.vm), j.clone()).await
}

use crate::host::state::write_durably_async;

mod recovery;
pub use recovery::recover;
use recovery::undo;

fn member(agent: &Agent, u: &Uuid) -> Result<Arc<Member>> {
    agent
        .member_by_uuid(u)
        .ok_or_else(|| fail!("datastore {u} is not configured on this host"))
}

/// Validates a request and works out what moves where.
async fn plan(
    agent: &Agent,
    name: &str,
    r: &RelocateReq,
) -> Result<(Arc<Member>, Stored, Journal)> {
    let (home, stored) = locate(agent, name).await.ok_or_else(|| {
        Error::not_found(format!("no VM named {name:?} on this host's datastores"))
    })?;
    let spec = &stored.spec;
    let ds_of = |label: &str| {
        agent.member(label).ok_or_else(|| {
            fail!(
                "this host has no datastore {label:?} (datastores here: {})",
                agent
                    .members
                    .iter()
                    .map(|m| m.label().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    };
    check_disk_names(name, spec, r.disks.keys())?;
    let format: Option<Provisioning> = match r.disk_format.as_deref() {
        None | Some("same") => None,
        Some(f) => Some(f.parse().map_err(|e: String| fail!("disk format: {e}"))?),
    };
    let config_to = match &r.datastore {
        Some(l) => ds_of(l)?,
        None => Arc::clone(&home),
    };
    let mut moves = Vec::new();
    let mut need: BTreeMap<Uuid, u64> = BTreeMap::new();
    for d in &spec.disks {
        let from = ds_of(&d.datastore)
            .with_context(|| format!("disk {} is on datastore {:?}", d.name, d.datastore))?;
        let to = match r.disks.get(&d.name).or(r.datastore.as_ref()) {
            Some(l) => ds_of(l)?,
            None => Arc::clone(&from),
        };
        let cur: Provisioning = d.provisioning.parse().map_err(|e: String| fail!(e))?;
        let prov = format.unwrap_or(cur);
        if to.ds.uuid() == from.ds.uuid() && prov == cur {
            continue;
        }
        let st = datastore::files::stat(&from.ds, &d.path)
            .with_context(|| format!("disk {} of VM {name}", d.name))?;
        if st
            .lock
            .as_deref()
            .is_some_and(|l| l.contains("multi-writer"))
        {
            bail!(
                "disk {} of VM {name} ({}:{}) is open multi-writer ({}); one host cannot \
                 mirror a disk others write: close it there first",
                d.name,
                from.label(),
                d.path,
                st.lock.as_deref().unwrap_or_default()
            );
        }
        // One host mirrors a disk only if it is the disk's only user: an export of the
        // file other than the VM's own (a second reader or writer) is refused.
        let own = export_name(name, &d.name);
        if let Some((other, _)) = agent.exports.lock().await.iter().find(|(n, e)| {
            **n != own && e.spec.datastore == *from.ds.uuid() && e.spec.path == d.path
        }) {
            bail!(
                "disk {} of VM {name} ({}:{}) is also open as export {other:?}; a disk with \
                 more than one user cannot be mirrored: remove that export first",
                d.name,
                from.label(),
                d.path
            );
        }
        *need.entry(*to.ds.uuid()).or_default() += match prov {
            Provisioning::Thin => st.allocated_bytes,
            _ => d.size,
        };
        moves.push(DiskMove {
            disk: d.name.clone(),
            size: d.size,
            from_ds: *from.ds.uuid(),
            from_path: d.path.clone(),
            to_ds: *to.ds.uuid(),
            to_path: target_path(
                &to,
                name,
                &d.name,
                (to.ds.uuid() == from.ds.uuid()).then_some(d.path.as_str()),
            ),
            to_prov: prov,
        });
    }
    if moves.is_empty() && config_to.ds.uuid() == home.ds.uuid() {
        bail!(
            "VM {name} is already where it was asked to go (definition on {}, disks: {}): nothing to relocate",
            home.label(),
            spec.disks
                .iter()
                .map(|d| format!("{} on {} ({})", d.name, d.datastore, d.provisioning))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (u, bytes) in &need {
        let m = member(agent, u)?;
        let s = Arc::clone(&m.session);
        let sp = tokio::task::spawn_blocking(move || s.space())
            .await
            .expect("space task")?;
        let free = sp.free_blocks * sp.block_size;
        // Room for the data plus the file's own metadata and a little slack.
        if free < bytes + bytes / 64 + (8 << 20) {
            bail!(
                "datastore {} has {} MiB free; VM {name}'s disks need about {} MiB there: free \
                 space or choose another datastore",
                m.label(),
                free >> 20,
                bytes >> 20
            );
        }
    }
    let j = Journal {
        vm: name.to_string(),
        config_from: *home.ds.uuid(),
        config_to: *config_to.ds.uuid(),
        generation: stored.generation + 1,
        moves,
    };
    Ok((home, stored, j))
}

/// Starts a relocation that keeps the VM on this host as a task; `guard` is held until
/// it ends.
pub(super) async fn start(
    agent: &Arc<Agent>,
    name: &str,
    r: RelocateReq,
    guard: impl Send + 'static,
) -> Result<Arc<Task>> {
    let (home, stored, j) = plan(agent, name, &r).await?;
    let task = agent.tasks.start("relocate-vm", name, true);
    let total: u64 = j.moves.iter().map(|m| m.size).sum();
    task.progress(0, total);
    let (a, t) = (Arc::clone(agent), Arc::clone(&task));
    tokio::spawn(async move {
        let _guard = guard;
        let out = run(&a, &t, home, stored, j, r.speed).await;
        match out {
            Ok(v) => t.finish(Ok(v)),
            Err(e) => {
                tracing::error!("relocation of {}: {e:#}", t.object);
                t.finish(Err(format!("{e:#}")))
            }
        }
    });
    Ok(task)
}

/// Relocates a powered-off VM's files on this host (part of a cold host + storage
/// move whose destination datastores this host sees).
pub(super) async fn relocate_here(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    name: &str,
    r: &RelocateReq,
) -> Result<Value> {
    let (home, stored, j) = plan(agent, name, r).await?;
    run(agent, task, home, stored, j, r.speed).await
}

/// One disk being mirrored.
struct Moving {
    mv: DiskMove,
    mirror: Arc<Mirror>,
    /// Cold relocation: the files the mirror uses (the source locked by us).
    cold: Option<(Arc<DsFile>, Arc<DsFile>)>,
}

async fn run(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    home: Arc<Member>,
    stored: Stored,
    j: Journal,
    speed: Option<u64>,
) -> Result<Value> {
    let t0 = Instant::now();
    let name = j.vm.clone();
    let running = agent.vms.lock().await.contains_key(&name);
    // A powered-off VM: its definition's lock keeps it from starting meanwhile.
    let cold_cfg = if running {
        None
    } else {
        Some(
            home.session
                .open(&config_path(&name), LockMode::Exclusive)
                .await
                .map_err(|e| fail!("VM {name} cannot be relocated from this host: {e}"))?,
        )
    };
    save_journal(agent, &j).await?;
    let mut moving: Vec<Moving> = Vec::new();
    // The definition's new file, made now (empty: not yet a definition) so that the
    // pivot only writes and flushes it.
    let mut new_cfg: Option<DsFile> = None;
    // Test hooks that fail a disk's new file once the pivot begins ([`super::fault`]).
    let mut faults = Vec::new();
    let out = async {
        if j.config_to != j.config_from {
            new_cfg = Some(create_config(agent, &name, &j).await?);
        }
        for (i, mv) in j.moves.iter().enumerate() {
            let to = member(agent, &mv.to_ds)?;
            let s = Arc::clone(&to.session);
            let folder = format!("/{name}");
            let _ = tokio::task::spawn_blocking(move || s.mkdir(&folder)).await;
            let target = to
                .session
                .create(&mv.to_path, mv.size, mv.to_prov)
                .await
                .with_context(|| format!("creating {}:{}", to.label(), mv.to_path))?;
            let opts = mirror::Options {
                speed,
                ..mirror::Options::default()
            };
            let m = if running {
                let gate = {
                    let t = agent.exports.lock().await;
                    let e = t.get(&export_name(&name, &mv.disk)).ok_or_else(|| {
                        fail!("disk {} of VM {name} is not exported here", mv.disk)
                    })?;
                    Arc::clone(&e.gate)
                };
                let m = match super::fault::for_disk(i) {
                    None => gate.start_mirror(target, opts, |dev| dev).await?,
                    Some(armed) => {
                        faults.push(Arc::clone(&armed));
                        let wrap = move |dev| super::fault::wrap(dev, armed);
                        gate.start_mirror(target, opts, wrap).await?
                    }
                };
                moving.push(Moving {
                    mv: mv.clone(),
                    mirror: Arc::clone(&m),
                    cold: None,
                });
                m
            } else {
                let from = member(agent, &mv.from_ds)?;
                let src = match from.session.open(&mv.from_path, LockMode::Exclusive).await {
                    Ok(f) => Arc::new(f),
                    Err(e) => {
                        let _ = target.close().await;
                        return Err(e.into());
                    }
                };
                let target = Arc::new(target);
                let m = Mirror::start(
                    Arc::clone(&src) as Arc<dyn BlockDev>,
                    Arc::clone(&target) as Arc<dyn BlockDev>,
                    opts,
                )?;
                moving.push(Moving {
                    mv: mv.clone(),
                    mirror: Arc::clone(&m),
                    cold: Some((src, target)),
                });
                m
            };
            tracing::info!(
                "VM {name}: mirroring disk {} to {}:{}",
                mv.disk,
                to.label(),
                mv.to_path
            );
            let _ = m;
        }
        // Until every disk is in sync.
        loop {
            let (mut done, mut total, mut ready, mut failed) = (0u64, 0u64, true, None);
            for mv in &moving {
                let p = mv.mirror.progress();
                done += p.done_bytes;
                total += p.total_bytes;
                match mv.mirror.phase() {
                    Phase::Ready => {}
                    Phase::Failed(e) => failed = Some(format!("disk {}: {e}", mv.mv.disk)),
                    Phase::Cancelled => failed = Some(format!("disk {}: cancelled", mv.mv.disk)),
                    _ => ready = false,
                }
            }
            task.progress(done.min(total), total);
            if let Some(e) = failed {
                bail!("{e}; the VM stays on its current disks");
            }
            if task.cancelled() {
                bail!("cancelled; the VM stays on its current disks");
            }
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if datastore::failpoint::fires("mirror-freeze") {
            for mv in &moving {
                mv.mirror.freeze_copier(true);
            }
            let go = agent
                .cfg
                .run_dir
                .join("relocations")
                .join(format!("{name}.go"));
            let _ = std::fs::create_dir_all(go.parent().expect("a parent"));
            tracing::warn!(
                "failpoint mirror-freeze: copiers frozen; waiting for {}",
                go.display()
            );
            while !go.exists() && !task.cancelled() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = std::fs::remove_file(&go);
        }
        Ok(())
    }
    .await;
    if let Err(e) = out {
        if let Some(f) = new_cfg.take() {
            let _ = f.close().await;
        }
        undo(agent, &name, moving, &j).await;
        if let Some(c) = cold_cfg {
            let _ = c.close().await;
        }
        return Err(e);
    }

    // The pivot: hold guest I/O on every disk, commit the new definition, let I/O go
    // on to the new files.
    // Every disk is ready before any is held; then all are held at once, so the hold is
    // the slowest disk's final catch-up and flush.
    let mirrors: Vec<Arc<mirror::Mirror>> =
        moving.iter().map(|mv| Arc::clone(&mv.mirror)).collect();
    let pause0 = Instant::now();
    for f in &faults {
        f.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let prepared = mirror::prepare_pivots(&mirrors, Duration::from_secs(10)).await;
    // (Only the pivots may keep the mirrors: each export must hold the last reference
    // to its mirror when it switches files.)
    drop(mirrors);
    let pivots = match prepared {
        Ok(p) => p,
        Err(e) => {
            if let Some(f) = new_cfg.take() {
                let _ = f.close().await;
            }
            undo(agent, &name, moving, &j).await;
            if let Some(c) = cold_cfg {
                let _ = c.close().await;
            }
            return Err(fail!("{e}; the VM stays on its current disks"));
        }
    };
    crash_at("pivot-before-config");
    let mut spec = stored.spec.clone();
    for mv in &j.moves {
        let to = member(agent, &mv.to_ds)?;
        if let Some(d) = spec.disks.iter_mut().find(|d| d.name == mv.disk) {
            d.datastore = to.label().to_string();
            d.path = mv.to_path.clone();
            d.provisioning = mv.to_prov.as_str().to_string();
        }
    }
    let committed = commit_config(
        agent,
        &name,
        &stored,
        &spec,
        &j,
        cold_cfg.as_ref(),
        new_cfg.as_ref(),
    )
    .await;
    match committed {
        Ok(()) => {}
        Err(e) => {
            if let Err(e2) =
                uncommit_config(agent, &name, &stored, cold_cfg.as_ref(), new_cfg.as_ref()).await
            {
                // Whether the new definition landed is unknown: the journal stays, and
                // the next agent start decides from what the definition names.
                drop(pivots);
                return Err(e.context(format!(
                    "committing the new definition failed and clearing it failed too \
                     ({e2:#}); nothing is undone: the relocation journal is settled when \
                     the agent next starts"
                )));
            }
            drop(pivots);
            if let Some(f) = new_cfg.take() {
                let _ = f.close().await;
            }
            undo(agent, &name, moving, &j).await;
            if let Some(c) = cold_cfg {
                let _ = c.close().await;
            }
            return Err(
                e.context("committing the new definition; the VM stays on its current disks")
            );
        }
    };
    crash_at("pivot-after-config");
    for p in pivots {
        // (Cannot fail: nothing cancels these mirrors while their pivots hold I/O.)
        if let Err(e) = p.commit() {
            tracing::error!("VM {name}: {e}");
        }
    }
    let pause = pause0.elapsed();
    tracing::info!("VM {name}: pivoted to its new disks (guest I/O held {pause:?})");

    // Committed: from here on only forward.
    let mut old_files: Vec<(Uuid, String, Option<DsFile>)> = Vec::new();
    let mut copied = 0u64;
    let mut disks_out = Vec::new();
    for Moving { mv, mirror, cold } in moving {
        let p = mirror.progress();
        copied += p.done_bytes;
        let to = member(agent, &mv.to_ds)?;
        disks_out.push(json!({
            "disk": mv.disk,
            "from": format!("{}:{}", member(agent, &mv.from_ds).map(|m| m.label().to_string()).unwrap_or_default(), mv.from_path),
            "to": format!("{}:{}", to.label(), mv.to_path),
            "format": mv.to_prov.as_str(),
            "copied_bytes": p.done_bytes,
            "mirrored_bytes": p.mirrored_bytes,
        }));
        match cold {
            None => {
                // The export holds the last reference to the mirror (and so to the files).
                drop(mirror);
                let ename = export_name(&name, &mv.disk);
                let mut t = agent.exports.lock().await;
                if let Some(e) = t.get_mut(&ename) {
                    match e.gate.finish_pivot(to.device.clone(), &mv.to_path).await {
                        Ok(old) => old_files.push((mv.from_ds, mv.from_path.clone(), Some(old))),
                        Err(err) => tracing::error!("export {ename}: {err:#}"),
                    }
                    e.spec = ExportSpec {
                        datastore: mv.to_ds,
                        path: mv.to_path.clone(),
                        ..e.spec.clone()
                    };
                }
                agent.save_exports(&t).await?;
            }
            Some((src, target)) => {
                mirror.finish().await;
                drop(mirror);
                if let Ok(t) = Arc::try_unwrap(target) {
                    t.close().await?;
                }
                old_files.push((mv.from_ds, mv.from_path.clone(), Arc::try_unwrap(src).ok()));
            }
        }
    }
    crash_at("pivot-after-switch");
    // The running VM now holds its new definition's lock.
    let old_cfg = {
        let mut vms = agent.vms.lock().await;
        match vms.get_mut(&name) {
            Some(vm) => {
                vm.spec = spec.clone();
                vm.datastore = member(agent, &j.config_to)?.label().to_string();
                match new_cfg {
                    Some(f) => vm.config.replace(f),
                    None => None,
                }
            }
            None => new_cfg,
        }
    };
    if let Some(c) = old_cfg {
        let _ = c.close().await;
    }
    if let Some(c) = cold_cfg {
        let _ = c.close().await;
    }
    // The old files go.
    for (ds, path, f) in old_files {
        if let Some(f) = f {
            let _ = f.close().await;
        }
        let m = member(agent, &ds)?;
        if let Err(e) = m.session.remove(&path).await {
            tracing::error!("VM {name}: removing the old disk {}:{path}: {e}", m.label());
        }
    }
    if j.config_to != j.config_from {
        let m = member(agent, &j.config_from)?;
        if let Err(e) = m.session.remove(&config_path(&name)).await {
            tracing::error!(
                "VM {name}: removing the old definition on {}: {e}",
                m.label()
            );
        }
    }
    remove_empty_folders(agent, &name).await;
    let _ = std::fs::remove_file(journal_path(agent, &name));
    let total = t0.elapsed();
    Ok(json!({
        "vm": name,
        "running": running,
        "datastore": member(agent, &j.config_to)?.label(),
        "disks": disks_out,
        "copied_bytes": copied,
        "duration_s": total.as_secs_f64(),
        "io_pause_ms": pause.as_secs_f64() * 1000.0,
    }))
}

/// Creates the definition's file on its new datastore (no valid slot yet).
async fn create_config(agent: &Agent, name: &str, j: &Journal) -> Result<DsFile> {
    let to = member(agent, &j.config_to)?;
    let s = Arc::clone(&to.session);
    let folder = format!("/{name}");
    let _ = tokio::task::spawn_blocking(move || s.mkdir(&folder)).await;
    to.session
        .create(&config_path(name), CONFIG_SIZE, Provisioning::Thin)
        .await
        .with_context(|| format!("creating {}:{}", to.label(), config_path(name)))
}

/// Writes the definition naming the new files: the commit point. In place (the other
/// slot of the open `vm.toml`), or into the new file made by [`create_config`].
async fn commit_config(
    agent: &Agent,
    name: &str,
    stored: &Stored,
    spec: &VmSpec,
    j: &Journal,
    cold_cfg: Option<&DsFile>,
    new_cfg: Option<&DsFile>,
) -> Result<()> {
    if let Some(f) = new_cfg {
        definition::write_at(f, spec, j.generation, 0).await?;
        return landed_then_failed();
    }
    let vms = agent.vms.lock().await;
    let f = open_config(&vms, name, cold_cfg)?;
    definition::write_at(f, spec, j.generation, 1 - stored.slot).await?;
    landed_then_failed()
}

/// The VM's open `vm.toml`: the running VM's, else the one a powered-off move opened.
fn open_config<'a>(
    vms: &'a BTreeMap<String, crate::host::RunningVm>,
    name: &str,
    cold_cfg: Option<&'a DsFile>,
) -> Result<&'a DsFile> {
    match (vms.get(name).and_then(|v| v.config.as_ref()), cold_cfg) {
        (Some(f), _) | (None, Some(f)) => Ok(f),
        _ => bail!("VM {name}: its definition is not open here"),
    }
}

/// Test hook `commit-lands-then-fails`: the definition is written but reported failed
/// (as a write that landed before its flush failed).
fn landed_then_failed() -> Result<()> {
    if datastore::failpoint::fires("commit-lands-then-fails") {
        bail!("failpoint commit-lands-then-fails: the write landed, then failed");
    }
    Ok(())
}

/// After a failed commit: clears the slot [`commit_config`] wrote, which may hold the
/// new definition after all (a failed write can land), so the undo never deletes files
/// the newest valid definition names.
async fn uncommit_config(
    agent: &Agent,
    name: &str,
    stored: &Stored,
    cold_cfg: Option<&DsFile>,
    new_cfg: Option<&DsFile>,
) -> Result<()> {
    if let Some(f) = new_cfg {
        return Ok(definition::invalidate(f, 0).await?);
    }
    let vms = agent.vms.lock().await;
    Ok(definition::invalidate(open_config(&vms, name, cold_cfg)?, 1 - stored.slot).await?)
}
