//! The destination's half of a host + storage move ([`super::host_move`] with
//! `storage`): the VM's new disk files — and its new `vm.toml` when the definition
//! changes datastore — created on this host's datastores, exported (active, their locks
//! ours) for the source to mirror into over NBD and for the incoming QEMU to use (none
//! for a powered-off VM, [`super::cold_move`]), and removed again if the move does not
//! commit. While they are only a copy, writes to them are committed by flushes rather
//! than one by one ([`Gate::from_file`]).
//!
//! A journal in `state_dir/incoming/<vm>.json` names the files before the first one is
//! made. The commit point is this host writing the definition that names them, once the
//! incoming migration has completed and before `cont` ([`commit`]). An agent restarted
//! with a journal left settles it before serving any export ([`recover`]): if the newest
//! definition names the new files they stay; otherwise they are deleted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{bail, fail, Context, Error, Result};
use datastore::files::DsFile;
use diskfmt::Provisioning;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::paths::{remove_empty_folders, target_path};
use crate::host::exports::{ExportSpec, Gate};
use crate::host::Agent;
use crate::vms::{config_path, export_name, locate};
use crate::wire::NewStorage;
use vm_glue::definition::{self, CONFIG_SIZE};
use vm_glue::spec::VmSpec;

/// What this host made for an incoming move.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    vm: String,
    /// The new files: datastore uuid and path.
    files: Vec<(Uuid, String)>,
    /// The new `vm.toml` (its datastore), when the definition changes datastore.
    config: Option<Uuid>,
    /// The generation the committed definition has.
    generation: u64,
}

fn journal_path(agent: &Agent, vm: &str) -> PathBuf {
    agent
        .cfg
        .state_dir
        .join("incoming")
        .join(format!("{vm}.json"))
}

async fn save_journal(agent: &Agent, j: &Journal) -> Result<()> {
    crate::host::state::write_durably_async(journal_path(agent, &j.vm), j.clone()).await
}

/// The files made for an incoming move.
#[derive(Debug)]
pub struct Prepared {
    /// The definition the VM runs from here (new files named).
    pub spec: VmSpec,
    /// Exports of the new files (active).
    pub exports: Vec<String>,
    /// The new `vm.toml` (locked, empty until the commit), if the definition moves.
    pub config: Option<DsFile>,
}

/// Checks room, then creates, locks and exports the new files for `spec` (the
/// definition as the source runs it). Leaves nothing behind if it fails.
pub async fn prepare(agent: &Arc<Agent>, spec: &VmSpec, st: &NewStorage) -> Result<Prepared> {
    // Test hook: hold here (files about to be made) until run_dir/prepare.go exists.
    if datastore::failpoint::fires("incoming-prepare-hold") {
        let go = agent.cfg.run_dir.join("prepare.go");
        tracing::warn!(
            "failpoint incoming-prepare-hold: waiting for {}",
            go.display()
        );
        while !go.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let name = spec.name.clone();
    let ds = |label: &str| {
        agent.member(label).ok_or_else(|| {
            fail!(
                "host {} has no datastore {label:?} (it has: {})",
                agent.cfg.host,
                agent
                    .members
                    .iter()
                    .map(|m| m.label().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    };
    let home = ds(&st.home)?;
    let mut new = spec.clone();
    let mut need: BTreeMap<Uuid, u64> = BTreeMap::new();
    let mut files = Vec::new();
    for (disk, nd) in &st.disks {
        let d = new
            .disks
            .iter_mut()
            .find(|d| &d.name == disk)
            .ok_or_else(|| fail!("VM {name} has no disk {disk:?}"))?;
        let to = ds(&nd.datastore)?;
        let prov: Provisioning = nd
            .provisioning
            .parse()
            .map_err(|e: String| fail!("disk {disk}: {e}"))?;
        *need.entry(*to.ds.uuid()).or_default() += match prov {
            Provisioning::Thin => nd.allocated,
            _ => d.size,
        };
        // On a datastore the source sees too, never the file the VM runs from.
        let avoid = (to.label() == d.datastore).then(|| d.path.clone());
        d.path = target_path(&to, &name, disk, avoid.as_deref());
        d.datastore = to.label().to_string();
        d.provisioning = prov.as_str().to_string();
        files.push((*to.ds.uuid(), d.path.clone(), d.size, prov, disk.clone()));
    }
    for (u, bytes) in &need {
        let m = agent.member_by_uuid(u).expect("found above");
        let s = Arc::clone(&m.session);
        let sp = tokio::task::spawn_blocking(move || s.space())
            .await
            .expect("space task")?;
        let free = sp.free_blocks * sp.block_size;
        if free < bytes + bytes / 64 + (8 << 20) {
            bail!(
                "datastore {} on host {} has {} MiB free; VM {name}'s disks need about {} MiB \
                 there: free space or choose another datastore",
                m.label(),
                agent.cfg.host,
                free >> 20,
                bytes >> 20
            );
        }
    }
    let moves_home = locate(agent, &name)
        .await
        .is_none_or(|(m, _)| m.ds.uuid() != home.ds.uuid());
    let j = Journal {
        vm: name.clone(),
        files: files.iter().map(|f| (f.0, f.1.clone())).collect(),
        config: moves_home.then(|| *home.ds.uuid()),
        generation: st.generation + 1,
    };
    save_journal(agent, &j).await?;
    let mut exports = Vec::new();
    let made = async {
        for (u, path, size, prov, disk) in &files {
            let m = agent.member_by_uuid(u).expect("found above");
            let s = Arc::clone(&m.session);
            let folder = format!("/{name}");
            let _ = tokio::task::spawn_blocking(move || s.mkdir(&folder)).await;
            let f = m
                .session
                .create(path, *size, *prov)
                .await
                .with_context(|| format!("creating {}:{path}", m.label()))?;
            let gate = Arc::new(Gate::from_file(&m.session, f, path, agent.cfg.write_hold));
            let ename = export_name(&name, disk);
            let spec = ExportSpec {
                name: ename.clone(),
                datastore: *u,
                path: path.clone(),
                read_only: false,
                active: true,
            };
            agent.add_vm_export(spec, gate).await?;
            exports.push(ename);
        }
        if moves_home {
            let s = Arc::clone(&home.session);
            let folder = format!("/{name}");
            let _ = tokio::task::spawn_blocking(move || s.mkdir(&folder)).await;
            let f = home
                .session
                .create(&config_path(&name), CONFIG_SIZE, Provisioning::Thin)
                .await
                .with_context(|| format!("creating {}:{}", home.label(), config_path(&name)))?;
            return Ok::<_, crate::error::Error>(Some(f));
        }
        Ok(None)
    }
    .await;
    match made {
        Ok(config) => Ok(Prepared {
            spec: new,
            exports,
            config,
        }),
        Err(e) => {
            crate::vms::release_exports(agent, &exports).await;
            discard(agent, &name).await;
            Err(e)
        }
    }
}

/// The commit point: writes the definition naming the new files into `f` — the new
/// `vm.toml` (first slot), or the VM's own one, handed over by the source (the slot
/// the source does not run from) — and flushes it.
/// An error of kind [`Kind::InDoubt`](crate::error::Kind::InDoubt) says the new definition
/// may have landed.
pub async fn commit(agent: &Agent, f: &DsFile, spec: &VmSpec, st: &NewStorage) -> Result<()> {
    let j: Journal = read_journal(agent, &spec.name)?;
    let slot = if j.config.is_some() { 0 } else { 1 - st.slot };
    if let Err(e) = definition::write_at(f, spec, j.generation, slot).await {
        // Never leave a half-committed definition behind: that slot is invalid again.
        if let Err(e2) = definition::invalidate(f, slot).await {
            return Err(Error::in_doubt(format!(
                "whether the new definition is committed is unknown: writing it failed \
                 ({e}) and clearing the slot again failed too ({e2})"
            )));
        }
        return Err(e.into());
    }
    let _ = std::fs::remove_file(journal_path(agent, &spec.name));
    Ok(())
}

fn read_journal(agent: &Agent, vm: &str) -> Result<Journal> {
    let p = journal_path(agent, vm);
    let b = std::fs::read(&p).with_context(|| format!("{}: no incoming journal", p.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("{}: unreadable", p.display()))
}

/// Deletes what an incoming move that did not commit made (its exports must be gone);
/// keeps it (and only forgets the journal) if the newest definition names the files.
/// Keeps everything (and the journal) while some definition of the VM cannot be read:
/// the new files may hold the only copy.
pub async fn discard(agent: &Agent, vm: &str) {
    let Ok(j) = read_journal(agent, vm) else {
        return;
    };
    match committed(agent, &j).await {
        Some(true) => {
            let _ = std::fs::remove_file(journal_path(agent, vm));
        }
        Some(false) => drop_files(agent, &j).await,
        None => tracing::error!(
            "VM {vm}: a definition of it cannot be read; the files of its incoming move \
             stay until it can (journal {})",
            journal_path(agent, vm).display()
        ),
    }
}

/// Whether the newest definition of the VM names the journal's files; `None` if a
/// datastore holds a definition of it that cannot be read.
async fn committed(agent: &Agent, j: &Journal) -> Option<bool> {
    for m in &agent.members {
        let path = crate::vms::config_path(&j.vm);
        if datastore::files::stat(&m.ds, &path).is_err() {
            continue;
        }
        // (A vm.toml read whole but holding no valid definition is an answer: a new
        // one never committed.)
        let dev = m.ds.path().to_path_buf();
        let p = path.clone();
        let read = match tokio::task::spawn_blocking(move || {
            datastore::files::DsFile::open_readonly(&dev, &p)
        })
        .await
        .expect("open task")
        {
            Ok(f) => vm_glue::definition::read_opt(&f, &format!("{}:{path}", m.label()))
                .await
                .map(|_| ())
                .map_err(Error::from),
            Err(e) => Err(Error::from(e)),
        };
        if let Err(e) = read {
            tracing::warn!("VM {}: {e:#}", j.vm);
            return None;
        }
    }
    Some(locate(agent, &j.vm).await.is_some_and(|(_, st)| {
        st.generation >= j.generation
            && j.files
                .iter()
                .all(|(_, path)| st.spec.disks.iter().any(|d| &d.path == path))
    }))
}

async fn drop_files(agent: &Agent, j: &Journal) {
    let name = &j.vm;
    let doomed = j
        .files
        .iter()
        .cloned()
        .chain(j.config.map(|u| (u, config_path(name))));
    for (u, path) in doomed {
        if let Some(m) = agent.member_by_uuid(&u) {
            match m.session.remove(&path).await {
                Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
                Err(e) => tracing::error!("VM {name}: removing {}:{path}: {e}", m.label()),
            }
        }
    }
    remove_empty_folders(agent, name).await;
    let _ = std::fs::remove_file(journal_path(agent, name));
}

/// Settles incoming moves an earlier agent process left (see the module docs). Runs
/// before the exports are restored, and drops the exports of files it deletes.
pub async fn recover(agent: &Agent) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(agent.cfg.state_dir.join("incoming")) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        let Some(j) = std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        else {
            let _ = std::fs::remove_file(&p);
            continue;
        };
        match committed(agent, &j).await {
            Some(true) => {
                tracing::info!("VM {}: its incoming move had committed", j.vm);
                let _ = std::fs::remove_file(&p);
                continue;
            }
            Some(false) => {}
            None => {
                tracing::error!(
                    "VM {}: a definition of it cannot be read; the files of its incoming \
                     move stay until it can ({})",
                    j.vm,
                    p.display()
                );
                continue;
            }
        }
        tracing::warn!(
            "VM {}: an incoming move did not commit; removing its new files",
            j.vm
        );
        let exports_path = agent.exports_path();
        let mut specs = crate::host::exports::load(&exports_path)?;
        specs.retain(|s| {
            !j.files
                .iter()
                .any(|(u, path)| s.datastore == *u && s.path == *path)
        });
        crate::host::exports::save(&exports_path, &specs)?;
        drop_files(agent, &j).await;
    }
    Ok(())
}
