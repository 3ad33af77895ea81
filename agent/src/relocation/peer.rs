//! Another host's agent, as the source of a move talks to it: a control-API client over
//! TCP with the cluster secret, found from the datastores' heartbeat regions, and an
//! abort that is sent again until it is answered.

use std::time::Duration;

use crate::error::{bail, fail, Error, Kind, Result};
use serde_json::Value;

use crate::host::Agent;

/// A control-API client for another host's agent (TCP, with the cluster secret).
#[derive(Debug, Clone)]
pub(super) struct Peer {
    addr: String,
    secret: String,
    pub(super) name: String,
}

impl Peer {
    pub(super) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        within: Duration,
    ) -> Result<Value> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Error::peer_unreachable(format!("host {} at {}: {e}", self.name, self.addr))
        };
        let go = async {
            let s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(|e| unreachable(&e))?;
            let auth = format!("Bearer {}", self.secret);
            let r = crate::http::call(
                s,
                method,
                path,
                &[("Authorization", auth.as_str())],
                body.as_ref(),
            )
            .await
            .map_err(|e| unreachable(&e))?;
            if r.status >= 300 {
                // The peer's kind, or (from an agent that sends none) one by its status.
                let kind =
                    serde_json::from_value(r.body["kind"].clone()).unwrap_or(match r.status {
                        404 => Kind::NotFound,
                        400 => Kind::Invalid,
                        409 => Kind::Conflict,
                        507 => Kind::NoSpace,
                        _ => Kind::Failed,
                    });
                return Err(Error::Peer {
                    host: self.name.clone(),
                    kind,
                    message: r.body["error"]
                        .as_str()
                        .map_or_else(|| r.body.to_string(), str::to_string),
                });
            }
            Ok(r.body)
        };
        tokio::time::timeout(within, go).await.map_err(|_| {
            Error::peer_unreachable(format!(
                "host {} at {} did not answer within {} s",
                self.name,
                self.addr,
                within.as_secs()
            ))
        })?
    }
}

/// Finds host `name`'s agent from the heartbeat regions.
pub(super) fn peer(agent: &Agent, name: &str) -> Result<Peer> {
    let secret = agent
        .cfg
        .secret
        .clone()
        .ok_or_else(|| fail!("host relocation needs the cluster secret in the agent config"))?;
    let hosts = crate::host::hosts::hosts(agent);
    let h = hosts
        .iter()
        .find(|h| h.name == name)
        .ok_or_else(|| Error::not_found(format!("no host {name:?} in this host's datastores")))?;
    if h.state != "live" {
        return Err(Error::peer_unreachable(format!(
            "host {name} is {}, not live",
            h.state
        )));
    }
    let addr = h.address.as_str();
    if addr.is_empty() {
        bail!(
            "host {name} publishes no management address (management_listen in its agent config)"
        );
    }
    Ok(Peer {
        addr: addr.to_string(),
        secret,
        name: name.to_string(),
    })
}

/// Sends an incoming VM's abort to `peer` again every 2 s (for two minutes) until it
/// is answered — say, once a cut link is back — while the VM goes on here.
pub(super) fn retry_abort(peer: &Peer, name: &str, body: Value) {
    let (peer, n) = (peer.clone(), name.to_string());
    let path = format!("/v1/vms/{name}/incoming/abort");
    tokio::spawn(async move {
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            match peer
                .call("POST", &path, Some(body.clone()), Duration::from_secs(10))
                .await
            {
                Ok(_) => {
                    tracing::info!("VM {n}: the destination cleaned up");
                    return;
                }
                Err(e) => tracing::debug!("VM {n}: abort on the destination: {e:#}"),
            }
        }
    });
}
