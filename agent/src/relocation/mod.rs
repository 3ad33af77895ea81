//! Relocation: moving a VM to other datastores, to another host, or both, running or
//! powered off — one entry point ([`start`]) and one decision table ([`decide`]).
//!
//! Layered bottom to top: [`decide`] (which move), [`paths`] (where new files go),
//! [`peer`] (the other host's agent), [`sync`] (waiting for disk copies), [`targets`]
//! (the destination's new files), [`leaving`] (the source's old files after a host +
//! storage move), [`switchover`] (settling a switchover in doubt); the moves:
//! [`storage`] (storage, on this host), [`cold_move`] (a powered-off VM's files to
//! datastores only the destination sees), [`incoming`] (the destination's half of a
//! host move) and [`host_move`] (the source's half); [`start`] on top.

pub mod cold_move;
pub mod decide;
mod fault;
pub mod host_move;
pub mod incoming;
pub mod leaving;
pub mod paths;
pub mod peer;
pub mod storage;
pub mod switchover;
pub mod sync;
pub mod targets;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{fail, Error, Result};

use crate::host::tasks::Task;
use crate::host::Agent;
pub use storage::RelocateReq;

/// Relocations running in this agent process (one per VM at a time).
static BUSY: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

struct BusyGuard(String);
impl Drop for BusyGuard {
    fn drop(&mut self) {
        BUSY.lock().expect("busy").remove(&self.0);
    }
}

/// `POST /v1/vms/NAME/relocate`: checks a request and starts the move as a task;
/// returns the task. One relocation per VM at a time.
pub async fn start(agent: &Arc<Agent>, name: &str, r: RelocateReq) -> Result<Arc<Task>> {
    let params = r.params();
    params
        .check()
        .map_err(|e| fail!("relocation of VM {name}: {e:#}"))?;
    {
        let mut busy = BUSY.lock().expect("busy");
        if !busy.insert(name.to_string()) {
            return Err(Error::busy(format!(
                "VM {name} is already being relocated; wait for that task or cancel it"
            )));
        }
    }
    let guard = BusyGuard(name.to_string());
    let to = r.host.clone().filter(|h| *h != agent.cfg.host);
    let running = agent.vms.lock().await.contains_key(name);
    // Which datastores the files go to, and whether this host sees them, matter only
    // for a move to another host: the host move asks the table again once it knows.
    match (decide::decide(to.is_some(), running, false, true), to) {
        (decide::Move::Storage, _) | (_, None) => storage::start(agent, name, r, guard).await,
        (_, Some(h)) => {
            let storage = host_move::StorageReq {
                datastore: r.datastore.clone(),
                disks: r.disks.clone(),
                disk_format: r.disk_format.clone(),
                speed: r.speed,
            };
            let task = host_move::start(agent, name, &h, params, storage).await?;
            let t = Arc::clone(&task);
            tokio::spawn(async move {
                let _guard = guard;
                while t.state() == crate::host::tasks::TaskState::Running {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            Ok(task)
        }
    }
}
