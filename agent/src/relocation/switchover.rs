//! The source's side of a host relocation once its outcome can be in doubt.
//!
//! From `migrate-continue` on, the destination may complete the migration and resume
//! the guest even if its answer never arrives here. So from then on the source resumes
//! the guest only once the destination has *acknowledged* that its QEMU is dead and
//! never ran it (it accepted an abort of this attempt); if the guest ran there, the
//! source's QEMU quits; if neither can be told (the destination does not answer), the
//! task ends `unknown` with the guest paused here, and `ferry task resolve ID` — or the
//! next start of this agent — settles it by asking again.
//!
//! The record `state_dir/switchover/VM.json` is written durably before the switchover
//! starts and removed once the outcome is known, so an agent restart in between still
//! settles it. The destination's half: [`super::incoming::finish`] marks the attempt
//! resumed under its VM table's lock before the guest can run there, and refuses aborts
//! of it from then on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{fail, Error, Kind, Result};
use datastore::{LockMode, Owner};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::host::tasks::Task;
use crate::host::Agent;
use crate::vms::config_path;
use vm_glue::qmp::Qmp;

/// What the source must remember while the outcome is open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Switchover {
    pub vm: String,
    /// The destination host.
    pub host: String,
    pub attempt: String,
    /// The datastore of the definition here.
    pub home: String,
    /// This host's owner per datastore (where the destination hands locks back).
    pub handback: BTreeMap<Uuid, Owner>,
    /// The exports whose locks were handed (or released) to the destination.
    pub exports: Vec<String>,
    /// The definition's lock was handed too.
    pub config: bool,
}

/// Where a relocation ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The destination acknowledged that its QEMU is gone and never ran the guest.
    StaysHere,
    /// The guest ran (or is about to run) on the destination.
    MovedThere,
    /// The destination could not be asked.
    Unknown(String),
}

fn path(agent: &Agent, vm: &str) -> PathBuf {
    agent
        .cfg
        .state_dir
        .join("switchover")
        .join(format!("{vm}.json"))
}

pub(super) async fn save(agent: &Agent, s: Switchover) -> Result<()> {
    crate::host::state::write_durably_async(path(agent, &s.vm), s).await
}

pub(super) async fn forget(agent: &Agent, vm: &str) {
    crate::host::state::remove_durably_async(path(agent, vm)).await
}

/// Whether VM `vm`'s relocation from here is in doubt.
pub(super) fn in_doubt(agent: &Agent, vm: &str) -> bool {
    path(agent, vm).exists()
}

fn load(agent: &Agent, vm: &str) -> Option<Switchover> {
    let b = std::fs::read(path(agent, vm)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Asks the destination, once, to abort this attempt.
pub(super) async fn ask(agent: &Agent, s: &Switchover) -> Outcome {
    let peer = match super::peer::peer(agent, &s.host) {
        Ok(p) => p,
        Err(e) => return Outcome::Unknown(format!("{e:#}")),
    };
    let body = json!({"handback": s.handback, "attempt": s.attempt});
    match peer
        .call(
            "POST",
            &format!("/v1/vms/{}/incoming/abort", s.vm),
            Some(body),
            Duration::from_secs(10),
        )
        .await
    {
        Ok(_) => Outcome::StaysHere,
        Err(e) if e.kind() == Kind::RunsThere => Outcome::MovedThere,
        Err(e) => Outcome::Unknown(format!("{e:#}")),
    }
}

/// Asks until the outcome is known or `within` has passed.
pub(super) async fn ask_within(agent: &Agent, s: &Switchover, within: Duration) -> Outcome {
    let until = Instant::now() + within;
    loop {
        match ask(agent, s).await {
            Outcome::Unknown(e) if Instant::now() < until => {
                tracing::warn!(
                    "VM {}: cannot tell yet whether host {} runs it: {e}; asking again",
                    s.vm,
                    s.host
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            o => return o,
        }
    }
}

/// How long the source keeps asking before the outcome is reported unknown.
pub(super) fn ask_window() -> Duration {
    datastore::failpoint::setting("settle-window-s")
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(30))
}

/// Acts on a known outcome: the guest resumes here with every lock taken back, or
/// this host's QEMU quits. Forgets the record. Returns what happened, in words.
pub(super) async fn apply(agent: &Arc<Agent>, s: &Switchover, outcome: &Outcome) -> Result<String> {
    let qmp = agent
        .vms
        .lock()
        .await
        .get(&s.vm)
        .and_then(|v| v.qmp.clone());
    let said = match outcome {
        Outcome::StaysHere => {
            take_back(agent, qmp.as_ref(), &s.vm, &s.home, &s.exports, s.config).await;
            // A host + storage move's old files stay the disks.
            super::leaving::forget_leaving(agent, &s.vm).await;
            format!(
                "host {} confirmed it never ran VM {}: it resumed here",
                s.host, s.vm
            )
        }
        Outcome::MovedThere => {
            if let Some(q) = &qmp {
                let _ = q.execute_within("quit", None, Duration::from_secs(5)).await;
            }
            super::leaving::settle_leaving(agent, &s.vm).await;
            format!("VM {} runs on host {}; its QEMU here quit", s.vm, s.host)
        }
        Outcome::Unknown(e) => return Err(Error::in_doubt(e)),
    };
    forget(agent, &s.vm).await;
    Ok(said)
}

/// Takes back the locks handed to the destination (it handed them back, or they are
/// broken once it is dead), then resumes the guest if it is paused.
pub(super) async fn take_back(
    agent: &Arc<Agent>,
    qmp: Option<&Arc<Qmp>>,
    name: &str,
    home: &str,
    exports: &[String],
    config: bool,
) {
    for e in exports {
        let Some((gate, ds)) = agent.export_gate(e).await else {
            continue;
        };
        let Some(m) = agent.member_by_uuid(&ds) else {
            continue;
        };
        let until = Instant::now() + m.ds.superblock().host_dead() * 2;
        loop {
            match gate.activate(&m.session).await {
                Ok(()) => break,
                Err(err) if Instant::now() < until => {
                    tracing::warn!(
                        "VM {name}: export {e}: taking its lock back: {err:#}; retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => {
                    tracing::error!("VM {name}: export {e}: cannot take its lock back: {err:#}");
                    break;
                }
            }
        }
        let mut t = agent.exports.lock().await;
        if let Some(x) = t.get_mut(e) {
            x.spec.active = gate.is_active();
        }
        let _ = agent.save_exports(&t).await;
    }
    if config {
        if let Some(m) = agent.member(home) {
            let until = Instant::now() + m.ds.superblock().host_dead() * 2;
            loop {
                match m
                    .session
                    .open(&config_path(name), LockMode::Exclusive)
                    .await
                {
                    Ok(f) => {
                        if let Some(vm) = agent.vms.lock().await.get_mut(name) {
                            vm.config = Some(f);
                        }
                        break;
                    }
                    Err(err) if Instant::now() < until => {
                        tracing::warn!("VM {name}: taking vm.toml back: {err}; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(err) => {
                        tracing::error!("VM {name}: cannot take vm.toml back: {err}");
                        break;
                    }
                }
            }
        }
    }
    // QEMU resumes the source by itself when a migration fails; make sure it runs.
    if let Some(qmp) = qmp {
        if let Ok(st) = qmp.execute("query-status", None).await {
            if st["running"] != true {
                let _ = qmp.execute("cont", None).await;
            }
        }
    }
}

/// One settling at a time (a resolve by hand and the restart's retries).
static SETTLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asks the destination of VM `vm`'s relocation in doubt once and acts on a known
/// answer. `Ok(None)`: nothing (left) in doubt.
async fn settle_once(agent: &Arc<Agent>, vm: &str) -> Result<Option<(Outcome, String)>> {
    let _one = SETTLING.lock().await;
    let Some(s) = load(agent, vm) else {
        return Ok(None);
    };
    let o = ask(agent, &s).await;
    if let Outcome::Unknown(e) = &o {
        return Err(fail!(
            "host {} still cannot say whether it runs VM {vm} ({e}); the guest stays paused \
             here; try again when it answers",
            s.host
        ));
    }
    let said = apply(agent, &s, &o).await?;
    Ok(Some((o, said)))
}

/// `POST /v1/tasks/ID/resolve`: asks the destination of a relocation whose outcome is
/// unknown once more, and acts on the answer.
pub async fn resolve(agent: &Arc<Agent>, task: &Arc<Task>) -> Result<Value> {
    if !task.is_unknown() {
        return Err(fail!(
            "task {}: its outcome is not in doubt (only a relocation that ended `unknown` \
             is resolved)",
            task.id
        ));
    }
    let v = match settle_once(agent, &task.object)
        .await
        .map_err(|e| fail!("task {}: {e:#}", task.id))?
    {
        Some((o, said)) => json!({"vm": task.object, "moved": matches!(o, Outcome::MovedThere),
            "note": said}),
        None => json!({"vm": task.object, "note": "already settled"}),
    };
    task.finish(Ok(v.clone()));
    Ok(v)
}

/// At agent start: every relocation left in doubt becomes an `unknown` task again and
/// is settled as soon as its destination answers.
pub fn recover(agent: &Arc<Agent>) {
    let Ok(rd) = std::fs::read_dir(agent.cfg.state_dir.join("switchover")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(s) = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Switchover>(&b).ok())
        else {
            continue;
        };
        let task = agent.tasks.start("relocate-vm", &s.vm, false);
        task.unknown(format!(
            "the agent restarted during the switchover of VM {} to host {}; asking it",
            s.vm, s.host
        ));
        let (a, t) = (Arc::clone(agent), task);
        tokio::spawn(async move {
            while t.is_unknown() {
                match settle_once(&a, &s.vm).await {
                    Ok(Some((_, said))) => {
                        tracing::warn!("{said}");
                        t.finish(Ok(json!({"vm": s.vm, "note": said})));
                    }
                    Ok(None) => t.finish(Ok(json!({"vm": s.vm, "note": "already settled"}))),
                    Err(e) => {
                        tracing::warn!("VM {}: relocation outcome still unknown: {e:#}", s.vm);
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
    }
}

/// Settles host + storage moves an earlier agent process left (after the exports were
/// restored): a confirmed commit deletes the old files at once; otherwise the committed
/// definition decides ([`super::leaving::settle_leaving`]), read again until it can be. A
/// move whose switchover is still in doubt is left to [`recover`].
pub fn recover_leaving(agent: &Arc<Agent>) {
    let Ok(rd) = std::fs::read_dir(agent.cfg.state_dir.join("leaving")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(l) = std::fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice::<super::leaving::Leaving>(&b).ok())
        else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let a = Arc::clone(agent);
        tokio::spawn(async move {
            for _ in 0..360 {
                if in_doubt(&a, &l.vm) {
                    return;
                }
                super::leaving::settle_leaving(&a, &l.vm).await;
                if !super::leaving::leaving_path(&a, &l.vm).exists() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
}
