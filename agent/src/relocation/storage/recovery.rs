//! Undoing a storage move that did not commit, and settling the moves an earlier agent
//! process left unfinished, from their journals and the committed definition.

use super::*;

/// Undoes a relocation that did not commit: mirrors stopped, new files deleted.
pub(super) async fn undo(agent: &Agent, name: &str, moving: Vec<Moving>, j: &Journal) {
    for mv in moving {
        match mv.cold {
            None => {
                drop(mv.mirror);
                let gate = {
                    let t = agent.exports.lock().await;
                    t.get(&export_name(name, &mv.mv.disk))
                        .map(|e| Arc::clone(&e.gate))
                };
                if let Some(g) = gate {
                    if let Some(t) = g.abort_mirror().await {
                        let _ = t.close().await;
                    }
                }
            }
            Some((src, target)) => {
                mv.mirror.cancel().await;
                drop(mv.mirror);
                if let Ok(t) = Arc::try_unwrap(target) {
                    let _ = t.close().await;
                }
                if let Ok(s) = Arc::try_unwrap(src) {
                    let _ = s.close().await;
                }
            }
        }
    }
    for mv in &j.moves {
        if let Ok(m) = member(agent, &mv.to_ds) {
            if let Err(e) = m.session.remove(&mv.to_path).await {
                if !matches!(e, datastore::Error::NotFound { .. }) {
                    tracing::error!("VM {name}: removing {}:{}: {e}", m.label(), mv.to_path);
                }
            }
        }
    }
    if j.config_to != j.config_from {
        // The new definition's file, made empty before the pivot: never committed.
        if let Ok(m) = member(agent, &j.config_to) {
            match m.session.remove(&config_path(name)).await {
                Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
                Err(e) => tracing::error!(
                    "VM {name}: removing {}:{}: {e}",
                    m.label(),
                    config_path(name)
                ),
            }
        }
    }
    remove_empty_folders(agent, name).await;
    let _ = std::fs::remove_file(journal_path(agent, name));
}

/// Settles relocations an earlier agent process left unfinished (see the module docs).
/// Runs before the exports are restored, and fixes their table.
pub async fn recover(agent: &Agent) -> Result<()> {
    let dir = agent.cfg.state_dir.join("relocations");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let exports_path = agent.exports_path();
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            let _ = std::fs::remove_file(&p);
            continue;
        }
        let j: Journal = match std::fs::read(&p)
            .map_err(crate::error::Error::from)
            .and_then(|b| serde_json::from_slice(&b).map_err(crate::error::Error::from))
        {
            Ok(j) => j,
            Err(err) => {
                tracing::error!("{}: unreadable relocation journal: {err:#}", p.display());
                continue;
            }
        };
        let name = j.vm.clone();
        let best = locate(agent, &name).await;
        let forward = best.as_ref().is_some_and(|(m, st)| {
            m.ds.uuid() == &j.config_to
                && st.generation >= j.generation
                && j.moves.iter().all(|mv| {
                    st.spec
                        .disks
                        .iter()
                        .any(|d| d.name == mv.disk && d.path == mv.to_path)
                })
        });
        tracing::warn!(
            "VM {name}: an interrupted relocation is {}",
            if forward {
                "finished (its new definition was committed)"
            } else {
                "undone (its new definition was not committed)"
            }
        );
        // Point the disk exports at the files the definition names.
        let mut specs = crate::host::exports::load(&exports_path)?;
        for mv in &j.moves {
            let ename = export_name(&name, &mv.disk);
            for s in specs.iter_mut().filter(|s| s.name == ename) {
                (s.datastore, s.path) = if forward {
                    (mv.to_ds, mv.to_path.clone())
                } else {
                    (mv.from_ds, mv.from_path.clone())
                };
            }
        }
        crate::host::exports::save(&exports_path, &specs)?;
        // Delete the side that lost.
        for mv in &j.moves {
            let (ds, path) = if forward {
                (mv.from_ds, &mv.from_path)
            } else {
                (mv.to_ds, &mv.to_path)
            };
            if let Ok(m) = member(agent, &ds) {
                match m.session.remove(path).await {
                    Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
                    Err(err) => tracing::error!("VM {name}: removing {}:{path}: {err}", m.label()),
                }
            }
        }
        if j.config_to != j.config_from {
            let loser = if forward { j.config_from } else { j.config_to };
            if let Ok(m) = member(agent, &loser) {
                match m.session.remove(&config_path(&name)).await {
                    Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
                    Err(err) => tracing::error!(
                        "VM {name}: removing a stale definition on {}: {err}",
                        m.label()
                    ),
                }
            }
        }
        remove_empty_folders(agent, &name).await;
        let _ = std::fs::remove_file(&p);
    }
    Ok(())
}
