//! The disks of a host + storage move: mirrored over NBD into the destination's new
//! files, and the rollback that gives a failed move's locks and disks back.

use super::*;

/// Mirrors each moving disk into the destination's export of its new file (NBD over
/// TCP) until every one is in sync; the mirrors stay in their exports and keep the
/// new files in sync until the pre-switchover window ends them.
#[allow(clippy::too_many_arguments)]
pub(super) async fn mirror_disks(
    agent: &Arc<Agent>,
    task: &Arc<Task>,
    name: &str,
    inc: &Incoming,
    peer: &Peer,
    moving: &[String],
    speed: Option<u64>,
    params: &MigrateParams,
    clients: &mut Vec<Arc<NbdClient>>,
) -> Result<()> {
    let addr = inc.nbd.clone().ok_or_else(|| {
        fail!(
            "host {} serves no NBD over TCP (nbd_listen in its agent config): the disks cannot be copied there",
            peer.name
        )
    })?;
    let secret = agent.cfg.secret.clone().unwrap_or_default();
    let mut out = Vec::new();
    for e in moving {
        let (gate, _) = agent
            .export_gate(e)
            .await
            .ok_or_else(|| fail!("export {e} is gone"))?;
        let target = NbdClient::connect_tcp(&addr, &crate::host::exports::tcp_name(&secret, e))
            .await
            .with_context(|| {
                format!(
                    "host {}: the new file of export {e} over NBD at {addr}",
                    peer.name
                )
            })?
            .reconnect_for(Duration::from_secs(2));
        let target = Arc::new(target);
        clients.push(Arc::clone(&target));
        // Over the network a target that stops answering must not hold guest writes
        // long: they are answered from the source after 3 s (the range is sent again).
        let opts = mirror::Options {
            speed,
            target_timeout: Duration::from_secs(3),
            ..mirror::Options::default()
        };
        let m = gate.start_mirror_remote(target, opts).await?;
        tracing::info!(
            "VM {name}: mirroring export {e} to host {} ({addr})",
            peer.name
        );
        out.push((format!("export {e}"), m));
    }
    let limit = params.timeout_s.unwrap_or(300);
    wait_in_sync(task, &out, &peer.name, Some(limit)).await
}

/// Puts the VM back as it was on this host: the migration cancelled (QEMU resumes the
/// source), locks handed back by the destination, exports active again, the destination
/// cleaned. Returns true if the destination already runs the VM (nothing to roll back).
#[allow(clippy::too_many_arguments)]
pub(super) async fn rollback(
    agent: &Arc<Agent>,
    qmp: &Arc<Qmp>,
    name: &str,
    home: &str,
    peer: &Peer,
    handed: &Handed,
    my_owners: &BTreeMap<Uuid, Owner>,
    attempt: &str,
) -> bool {
    // (A disk that moved to a new file was only released: taking it back is immediate.)
    let _ = qmp.execute("migrate_cancel", None).await;
    // Ask the destination to remove its QEMU and exports and hand our locks back. With
    // nothing handed yet the source does not need its answer: the request is retried in
    // the background (say, until a cut link is back) while the VM goes on here.
    let body = json!({"handback": my_owners, "attempt": attempt});
    let path = format!("/v1/vms/{name}/incoming/abort");
    match peer
        .call("POST", &path, Some(body.clone()), Duration::from_secs(10))
        .await
    {
        Ok(_) => {}
        Err(e) if e.kind() == Kind::RunsThere => return true,
        Err(e) => {
            tracing::warn!("VM {name}: the destination did not clean up yet: {e:#}; retrying in the background");
            retry_abort(peer, name, body);
        }
    }
    // Our locks come back (handed back, or broken once the destination is dead if it
    // vanished with them), and the guest runs on here.
    super::super::switchover::take_back(
        agent,
        Some(qmp),
        name,
        home,
        &handed.exports,
        handed.config,
    )
    .await;
    false
}
