//! Ending the host's membership: fencing its VMs when a lease is lost, and leaving
//! every datastore cleanly on request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{bail, Result};
use datastore::fence::HostCgroup;

use super::{Agent, Stop};

/// Empties every VM cgroup under the host's `cgroup`, waiting as long as that takes (a
/// process stuck in uninterruptible I/O keeps its cgroup populated: then the agent waits
/// for the watchdog, which fences the whole host cgroup, this agent included).
pub fn fence_vms(cgroup: &Path) {
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

/// Processes in the host cgroup tree other than this agent (VMs, and whatever else the
/// host runs under its leases).
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
