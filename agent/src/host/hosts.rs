//! Every host this host's datastores know, merged by name (from their heartbeat
//! regions): what `GET /v1/hosts` shows, and how a move finds its destination's agent.

use datastore::store::Liveness;
use serde::Serialize;

use super::Agent;

/// A host as the datastores see it.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub name: String,
    /// Its agent's management address (empty if it publishes none).
    pub address: String,
    /// `live`, `stale`, `dead`, `unknown`: the liveliest of its slots.
    pub state: &'static str,
    pub datastores: Vec<Slot>,
}

/// A host's slot in one datastore.
#[derive(Debug, Clone, Serialize)]
pub struct Slot {
    pub datastore: String,
    pub host_id: u32,
    pub generation: u64,
    pub state: &'static str,
    pub unchanged_ms: u64,
}

fn liveness(l: Liveness) -> &'static str {
    match l {
        Liveness::Free => "free",
        Liveness::Live => "live",
        Liveness::Dead => "dead",
        Liveness::Unknown => "unknown",
    }
}

/// Every host any of our datastores knows, merged by name, in name order.
pub fn hosts(agent: &Agent) -> Vec<Host> {
    let mut by_name: std::collections::BTreeMap<String, Host> = Default::default();
    for m in &agent.members {
        // Renewed while we watched: live. Not renewed for longer than two renewal
        // intervals but not yet host_dead: stale (stopped, or a dead host we have not
        // watched long enough to call dead).
        let sb = m.ds.superblock();
        let stale_after = (2 * sb.renew_interval() + sb.io_timeout()).as_millis() as u64;
        for v in m.views() {
            let Some(s) = &v.slot else { continue };
            if v.liveness == Liveness::Free {
                continue;
            }
            let entry = by_name.entry(s.name.clone()).or_insert_with(|| Host {
                name: s.name.clone(),
                address: s.address.clone(),
                state: "dead",
                datastores: Vec::new(),
            });
            let state = match liveness(v.liveness) {
                "live" if v.unchanged_ms > stale_after => "stale",
                l => l,
            };
            if state == "live" || entry.state == "dead" {
                entry.state = state;
            }
            if !s.address.is_empty() {
                entry.address = s.address.clone();
            }
            entry.datastores.push(Slot {
                datastore: m.label().to_string(),
                host_id: v.host_id,
                generation: s.host_generation,
                state,
                unchanged_ms: v.unchanged_ms,
            });
        }
    }
    by_name.into_values().collect()
}
