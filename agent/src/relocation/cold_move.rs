//! A powered-off VM moved to another host *and* to datastores this host does not see:
//! the destination creates, locks and exports the new files ([`super::targets`], as for
//! a live move but with no QEMU), and this host copies each disk into them over NBD on
//! TCP with the [`mirror`] engine (nobody writes the source: the definition's lock,
//! held throughout, keeps the VM from starting anywhere).
//!
//! The commit point is the definition naming the new files: written here, into the
//! other slot of the `vm.toml` this host holds, when the definition stays on its
//! datastore; written by the destination into its new `vm.toml` when the definition
//! moves too. Before it, any failure or cancel deletes the new files (the destination's
//! abort, or its journal after a crash); after it, the old files are deleted here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{fail, Context, Error, Kind, Result};
use datastore::LockMode;
use diskfmt::BlockDev;
use mirror::Mirror;
use serde_json::{json, Value};
use uuid::Uuid;

use super::peer::Peer;
use crate::host::membership::Member;
use crate::host::tasks::Task;
use crate::host::Agent;
use crate::vms::{config_path, export_name};
use crate::wire::{Incoming, IncomingReq, NewStorage};
use nbd::NbdClient;
use vm_glue::definition::{self, Stored};

/// Whether this host sees every datastore `st` names (else the copy goes over NBD).
pub fn sees_all(agent: &Agent, st: &NewStorage) -> bool {
    agent.member(&st.home).is_some()
        && st
            .disks
            .values()
            .all(|d| agent.member(&d.datastore).is_some())
}

/// Runs the move (see the module docs); the task's result on success.
pub(super) async fn run(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    home: Arc<Member>,
    stored: Stored,
    peer: Peer,
    st: NewStorage,
    speed: Option<u64>,
) -> Result<Value> {
    let t0 = Instant::now();
    let name = stored.spec.name.clone();
    let cfg = home
        .session
        .open(&config_path(&name), LockMode::Exclusive)
        .await
        .map_err(|e| fail!("VM {name} cannot be relocated from this host: {e}"))?;
    let mut sources = Vec::new();
    for d in stored
        .spec
        .disks
        .iter()
        .filter(|d| st.disks.contains_key(&d.name))
    {
        let m = agent.member(&d.datastore).ok_or_else(|| {
            fail!(
                "disk {} is on datastore {:?}, not configured here",
                d.name,
                d.datastore
            )
        })?;
        match m.session.open(&d.path, LockMode::Exclusive).await {
            Ok(f) => sources.push((d.clone(), Arc::new(f))),
            Err(e) => {
                close_all(sources, cfg).await;
                return Err(fail!("disk {} of VM {name}: {e}", d.name));
            }
        }
    }
    let attempt = Uuid::new_v4().to_string();
    let inc = peer
        .call(
            "POST",
            &format!("/v1/vms/{name}/incoming"),
            Some(json!(IncomingReq {
                spec: stored.spec.clone(),
                home: home.label().to_string(),
                source_host: agent.cfg.host.clone(),
                source_owners: Default::default(),
                give_up_s: Some(3600),
                storage: Some(st.clone()),
                multifd_channels: None,
                attempt: Some(attempt.clone()),
                cold: true,
            })),
            Duration::from_secs(120),
        )
        .await
        .and_then(|v| serde_json::from_value::<Incoming>(v).map_err(crate::error::Error::from));
    let inc = match inc {
        Ok(i) => i,
        Err(e) => {
            close_all(sources, cfg).await;
            return Err(e);
        }
    };
    let mut clients = Vec::new();
    let mut mirrors: Vec<(String, Arc<Mirror>)> = Vec::new();
    let copied = async {
        let addr = inc.nbd.clone().ok_or_else(|| {
            fail!(
                "host {} serves no NBD over TCP (nbd_listen in its agent config)",
                peer.name
            )
        })?;
        let secret = agent.cfg.secret.clone().unwrap_or_default();
        for (d, src) in &sources {
            let e = export_name(&name, &d.name);
            let c = NbdClient::connect_tcp(&addr, &crate::host::exports::tcp_name(&secret, &e))
                .await
                .with_context(|| {
                    format!(
                        "host {}: the new file of disk {} over NBD",
                        peer.name, d.name
                    )
                })?
                .reconnect_for(Duration::from_secs(2));
            let c = Arc::new(c);
            clients.push(Arc::clone(&c));
            let opts = mirror::Options {
                speed,
                target_timeout: Duration::from_secs(3),
                ..mirror::Options::default()
            };
            let m = Mirror::start(Arc::clone(src) as Arc<dyn BlockDev>, c, opts)?;
            mirrors.push((d.name.clone(), m));
        }
        let labelled: Vec<(String, Arc<Mirror>)> = mirrors
            .iter()
            .map(|(d, m)| (format!("disk {d}"), Arc::clone(m)))
            .collect();
        super::sync::wait_in_sync(task, &labelled, &peer.name, None).await?;
        // Everything is there: the new files are flushed.
        let mut pivots = Vec::new();
        for (_, m) in &mirrors {
            pivots.push(m.prepare_pivot(Duration::from_secs(10)).await?);
        }
        Ok::<_, crate::error::Error>(pivots)
    }
    .await;
    for c in &clients {
        c.close();
    }
    let pivots = match copied {
        Ok(p) => p,
        Err(e) => {
            for (_, m) in &mirrors {
                m.cancel().await;
            }
            drop(mirrors);
            abort(&peer, &name, &attempt).await;
            close_all(sources, cfg).await;
            return Err(e.context(format!("VM {name} stays where it was")));
        }
    };
    // The commit point: here when the definition stays on its datastore; on the
    // destination (its new vm.toml) when it moves.
    task.stage("switching over");
    let new_spec = inc.spec.clone().unwrap_or_else(|| stored.spec.clone());
    let moves_home = st.home != home.label();
    // Written here: the definition naming the new files, or — when the definition moves
    // too — a tombstone naming where it goes, before the destination commits, so the
    // definition here can never start the VM again whatever happens next.
    let here = if moves_home {
        let mut tomb = stored.spec.clone();
        tomb.moved_to = Some(st.home.clone());
        tomb
    } else {
        new_spec.clone()
    };
    if let Err(e) = definition::write_at(&cfg, &here, stored.generation + 1, 1 - stored.slot).await
    {
        let _ = definition::invalidate(&cfg, 1 - stored.slot).await;
        drop(pivots);
        abort(&peer, &name, &attempt).await;
        close_all(sources, cfg).await;
        return Err(Error::from(e).context(format!("VM {name} stays where it was")));
    }
    let finished = peer
        .call(
            "POST",
            &format!("/v1/vms/{name}/incoming/finish"),
            None,
            datastore::failpoint::setting("finish-window-s")
                .map_or(Duration::from_secs(60), Duration::from_secs),
        )
        .await;
    if let Err(e) = finished {
        if moves_home {
            // Whether the destination committed decides, not whether its answer came.
            let old: Vec<(String, String)> = sources
                .iter()
                .map(|(d, _)| (d.datastore.clone(), d.path.clone()))
                .collect();
            match committed_there(&peer, &name, &st.home, &old).await {
                Some(true) => {
                    tracing::warn!(
                        "VM {name}: the destination's answer was lost ({e:#}), but its new \
                         definition is committed: the move stands"
                    );
                }
                Some(false) => {
                    // Not committed when asked — but the destination's finish may still
                    // be committing: only an abort it accepts settles that it never will.
                    let body = json!({"attempt": attempt});
                    let path = format!("/v1/vms/{name}/incoming/abort");
                    if let Err(ae) = peer
                        .call("POST", &path, Some(body), Duration::from_secs(10))
                        .await
                    {
                        drop(pivots);
                        close_all(sources, cfg).await;
                        return Err(e.context(format!(
                            "outcome unknown: host {} has not committed VM {name}'s new \
                             definition on {} yet, nor accepted to undo the move ({ae:#}); \
                             the definition here is marked moved (it cannot start from it) \
                             and its files stay until it answers",
                            peer.name, st.home
                        )));
                    }
                    let _ = definition::invalidate(&cfg, 1 - stored.slot).await;
                    drop(pivots);
                    close_all(sources, cfg).await;
                    return Err(e.context(format!("VM {name} stays where it was")));
                }
                None => {
                    drop(pivots);
                    close_all(sources, cfg).await;
                    return Err(e.context(format!(
                        "outcome unknown: host {} does not say whether VM {name}'s new \
                         definition on {} is committed; the definition here is marked moved \
                         (it cannot start from it) and its files stay until it answers",
                        peer.name, st.home
                    )));
                }
            }
        } else {
            // Committed here already: the destination keeps the files (its journal sees
            // the definition naming them); only its exports linger until it is told
            // again.
            tracing::error!("VM {name}: the destination did not confirm the move: {e:#}");
        }
    }
    drop(pivots);
    let mut disks = Vec::new();
    let mut total = 0;
    for (disk, m) in &mirrors {
        let p = m.progress();
        total += p.done_bytes;
        let from = stored.spec.disks.iter().find(|d| &d.name == disk);
        let to = new_spec.disks.iter().find(|d| &d.name == disk);
        if let (Some(f), Some(t)) = (from, to) {
            disks.push(json!({
                "disk": disk,
                "from": format!("{}:{}", f.datastore, f.path),
                "to": format!("{}:{}", t.datastore, t.path),
                "format": t.provisioning,
                "copied_bytes": p.done_bytes,
                "mirrored_bytes": 0,
            }));
        }
        m.cancel().await;
    }
    drop(mirrors);
    let old: Vec<(String, String)> = sources
        .iter()
        .map(|(d, _)| (d.datastore.clone(), d.path.clone()))
        .chain(moves_home.then(|| (home.label().to_string(), config_path(&name))))
        .collect();
    close_all(sources, cfg).await;
    for (ds, path) in old {
        if let Some(m) = agent.member(&ds) {
            if let Err(e) = m.session.remove(&path).await {
                tracing::error!("VM {name}: removing its old file {ds}:{path}: {e}");
            }
        }
    }
    super::paths::remove_empty_folders(agent, &name).await;
    Ok(json!({
        "vm": name,
        "running": false,
        "host": peer.name,
        "datastore": st.home,
        "disks": disks,
        "copied_bytes": total,
        "duration_s": t0.elapsed().as_secs_f64(),
        "note": format!(
            "VM {name} is powered off; its files are now on datastores host {} sees: it starts there with `ferry vm start {name} --host {}`",
            peer.name, peer.name
        ),
    }))
}

/// Whether the destination's committed definition of `name` is on `home` and names
/// none of the `old` disk files: `None` if it cannot be asked.
async fn committed_there(
    peer: &Peer,
    name: &str,
    home: &str,
    old: &[(String, String)],
) -> Option<bool> {
    match peer
        .call(
            "GET",
            &format!("/v1/vms/{name}"),
            None,
            Duration::from_secs(10),
        )
        .await
    {
        Ok(v) => {
            let disks: Vec<vm_glue::spec::Disk> =
                serde_json::from_value(v["disks"].clone()).ok()?;
            Some(
                v["datastore"] == home
                    && !disks
                        .iter()
                        .any(|d| old.iter().any(|(ds, p)| d.datastore == *ds && d.path == *p)),
            )
        }
        Err(e) if e.kind() == Kind::NotFound => Some(false),
        Err(_) => None,
    }
}

/// Asks the destination to delete what it made (retried in the background).
async fn abort(peer: &Peer, name: &str, attempt: &str) {
    let body = json!({"attempt": attempt});
    let path = format!("/v1/vms/{name}/incoming/abort");
    if let Err(e) = peer
        .call("POST", &path, Some(body.clone()), Duration::from_secs(10))
        .await
    {
        tracing::warn!(
            "VM {name}: the destination did not clean up yet: {e:#}; retrying in the background"
        );
        super::peer::retry_abort(peer, name, body);
    }
}

async fn close_all(
    sources: Vec<(vm_glue::spec::Disk, Arc<datastore::files::DsFile>)>,
    cfg: datastore::files::DsFile,
) {
    for (_, f) in sources {
        if let Ok(f) = Arc::try_unwrap(f) {
            let _ = f.close().await;
        }
    }
    let _ = cfg.close().await;
}
