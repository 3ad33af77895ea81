//! What a host + storage move leaves on the source: the old files, named in a journal
//! (`state_dir/leaving/VM.json`) before the destination commits, and deleted only once
//! the committed definition names the new ones — also after an agent restart.

use std::time::{Duration, Instant};

use crate::error::Result;
use serde::{Deserialize, Serialize};

use super::peer::peer;
use crate::host::Agent;
use crate::vms::{config_path, locate};
use crate::wire::NewStorage;
use vm_glue::spec::VmSpec;

/// What a host + storage move leaves on this host, to delete once the destination
/// runs the VM (`state_dir/leaving/VM.json`, written before the destination commits).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leaving {
    pub(super) vm: String,
    /// The destination host.
    pub(super) host: String,
    /// Datastore label and path of each file to delete.
    pub(super) files: Vec<(String, String)>,
    /// The destination confirmed the commit.
    pub(super) committed: bool,
}

pub(super) fn leaving_path(agent: &Agent, vm: &str) -> std::path::PathBuf {
    agent
        .cfg
        .state_dir
        .join("leaving")
        .join(format!("{vm}.json"))
}

pub(super) async fn forget_leaving(agent: &Agent, vm: &str) {
    crate::host::state::remove_durably_async(leaving_path(agent, vm)).await
}

pub(super) async fn save_leaving(agent: &Agent, l: &Leaving) -> Result<()> {
    crate::host::state::write_durably_async(leaving_path(agent, &l.vm), l.clone()).await
}

/// The files a host + storage move leaves here: the disks that moved, and `vm.toml` if
/// the definition moved.
pub(super) fn old_files(
    name: &str,
    spec: &VmSpec,
    home: &str,
    st: &NewStorage,
) -> Vec<(String, String)> {
    spec.disks
        .iter()
        .filter(|d| st.disks.contains_key(&d.name))
        .map(|d| (d.datastore.clone(), d.path.clone()))
        .chain((st.home != home).then(|| (home.to_string(), config_path(name))))
        .collect()
}

/// After a host + storage move: deletes the files the VM left here once its QEMU and
/// exports are gone, then the journal.
pub(super) async fn remove_moved(agent: &Agent, l: &Leaving) {
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
    crate::vms::release_exports(agent, &stale).await;
    for (ds, path) in &l.files {
        let Some(m) = agent.member(ds) else { continue };
        match m.session.remove(path).await {
            Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
            Err(e) => tracing::error!("VM {name}: removing its old file {ds}:{path}: {e}"),
        }
    }
    super::paths::remove_empty_folders(agent, name).await;
    let _ = std::fs::remove_file(leaving_path(agent, name));
}

/// Whether VM `vm`'s newest committed definition no longer names the disk files it
/// left here, read here and else through the destination (the new definition may be on
/// a datastore only it sees): `None` if neither can tell (then nothing is decided).
async fn moved_by_definition(agent: &Agent, l: &Leaving) -> Option<bool> {
    let cfg = config_path(&l.vm);
    let names_old = |disks: &[vm_glue::spec::Disk]| {
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
    let disks: Vec<vm_glue::spec::Disk> = serde_json::from_value(v["disks"].clone()).ok()?;
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
            crate::host::state::remove_durably_async(leaving_path(agent, vm)).await;
        }
        None => tracing::warn!(
            "VM {vm}: its definition cannot be read; its old files stay until it can"
        ),
    }
}
