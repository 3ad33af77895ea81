//! The host: the agent's state while it runs — its configuration ([`config`]), its
//! membership in every datastore ([`membership`]), its NBD exports ([`exports`]), its
//! tasks ([`tasks`]), its durable local state ([`state`]) and the table of VMs running
//! here. Everything above (VMs, relocation, the API, the daemon) works on an [`Agent`].

pub mod config;
pub mod exports;
pub mod hosts;
pub mod leave;
pub mod membership;
pub mod state;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{bail, Result};
use datastore::files::DsFile;
use tokio::sync::watch;
use vm_glue::qmp::Qmp;
use vm_glue::spec::VmSpec;

pub use config::Config;
use exports::{ExportSpec, Gate};
use membership::Member;

/// Why the agent ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM/SIGINT: keep slots and locks for the next agent process.
    Signal,
    /// The host left every datastore.
    Left,
    /// A host lease was lost.
    LeaseLost(String),
}

/// One export and its device.
#[derive(Debug)]
pub struct ExportEntry {
    pub spec: ExportSpec,
    pub gate: Arc<Gate>,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent {
    pub cfg: Config,
    pub members: Vec<Arc<Member>>,
    pub exports: tokio::sync::Mutex<BTreeMap<String, ExportEntry>>,
    pub nbd_unix: Arc<nbd::Server>,
    pub nbd_tcp: Option<Arc<nbd::Server>>,
    pub tasks: tasks::Tasks,
    pub started: Instant,
    pub stop: watch::Sender<Option<Stop>>,
    /// The actual NBD TCP address (the configured port may be 0).
    pub nbd_tcp_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    pub mgmt_addr: std::sync::Mutex<Option<std::net::SocketAddr>>,
    /// Set while the host leaves: its leases end on purpose.
    pub leaving: std::sync::atomic::AtomicBool,
    /// The host cgroup (the agent, and its VMs in child cgroups).
    pub cgroup: PathBuf,
    /// VMs running on this host. Held only for short table changes: a VM being set
    /// up (its files, exports, QEMU) is reserved in `setting_up` instead.
    pub vms: tokio::sync::Mutex<BTreeMap<String, RunningVm>>,
    /// VMs being started or received here, not yet in `vms`.
    pub(crate) setting_up: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// A VM name reserved while it is set up on this host ([`Agent::reserve_vm`]).
#[derive(Debug)]
pub(crate) struct VmSlot<'a> {
    agent: &'a Agent,
    name: String,
}

impl Drop for VmSlot<'_> {
    fn drop(&mut self) {
        self.agent
            .setting_up
            .lock()
            .expect("setting_up")
            .remove(&self.name);
    }
}

/// A VM running on this host.
#[derive(Debug)]
pub struct RunningVm {
    pub spec: VmSpec,
    /// The datastore holding its definition.
    pub datastore: String,
    pub pid: u32,
    pub qmp: Option<Arc<Qmp>>,
    pub exports: Vec<String>,
    pub cgroup: PathBuf,
    pub accel: &'static str,
    /// `vm.toml`, open with its exclusive lock while the VM runs.
    pub(crate) config: Option<DsFile>,
    /// QEMU waits for an incoming migration (this host does not run the VM yet).
    pub incoming: bool,
    /// An incoming host + storage move: where the disks and the definition go.
    pub(crate) storage: Option<crate::wire::NewStorage>,
    /// The incoming move's attempt id (aborts naming another attempt are ignored).
    pub(crate) attempt: Option<String>,
}

/// The host cgroup's name: stable across restarts of the agent of this host name and
/// run directory, distinct for another agent on the same machine.
pub fn cgroup_name(cfg: &Config) -> String {
    let h = blake3::hash(cfg.run_dir.as_os_str().as_encoded_bytes());
    format!("agent-{}-{}", cfg.host, &h.to_hex()[..8])
}

impl Agent {
    /// Reserves VM `name` for setting it up here (the VM table is not held meanwhile);
    /// refused if it runs here or is being set up already.
    pub(crate) async fn reserve_vm(&self, name: &str) -> Result<VmSlot<'_>> {
        let vms = self.vms.lock().await;
        let mut busy = self.setting_up.lock().expect("setting_up");
        if vms.contains_key(name) {
            bail!("VM {name} already runs on host {}", self.cfg.host);
        }
        if !busy.insert(name.to_string()) {
            bail!(
                "VM {name} is being started on host {} already",
                self.cfg.host
            );
        }
        Ok(VmSlot {
            agent: self,
            name: name.to_string(),
        })
    }

    /// The export table (`state_dir/exports.json`).
    pub(crate) fn exports_path(&self) -> PathBuf {
        self.cfg.state_dir.join("exports.json")
    }

    /// Records the export table.
    pub async fn save_exports(&self, table: &BTreeMap<String, ExportEntry>) -> Result<()> {
        let specs: Vec<ExportSpec> = table.values().map(|e| e.spec.clone()).collect();
        // (Synced to disk: off the runtime's workers.)
        let path = self.exports_path();
        tokio::task::spawn_blocking(move || exports::save(&path, &specs))
            .await
            .expect("save task")
    }

    /// Serves `gate` as export `spec.name` (published, recorded in the table).
    pub async fn add_vm_export(&self, spec: ExportSpec, gate: Arc<Gate>) -> Result<()> {
        self.publish(&spec, &gate);
        let mut table = self.exports.lock().await;
        table.insert(spec.name.clone(), ExportEntry { spec, gate });
        self.save_exports(&table).await
    }

    /// An export's gate and datastore uuid, by export name.
    pub async fn export_gate(&self, name: &str) -> Option<(Arc<Gate>, uuid::Uuid)> {
        let t = self.exports.lock().await;
        t.get(name).map(|x| (Arc::clone(&x.gate), x.spec.datastore))
    }

    pub fn member(&self, key: &str) -> Option<Arc<Member>> {
        self.members
            .iter()
            .find(|m| m.label() == key || m.ds.uuid().to_string() == key)
            .cloned()
    }

    pub fn member_by_uuid(&self, u: &uuid::Uuid) -> Option<Arc<Member>> {
        self.members.iter().find(|m| m.ds.uuid() == u).cloned()
    }

    /// Puts an export on the NBD servers.
    pub fn publish(&self, spec: &ExportSpec, gate: &Arc<Gate>) {
        let description = format!("{}:{}", spec.datastore, spec.path);
        self.nbd_unix.add(nbd::Export {
            name: spec.name.clone(),
            description: description.clone(),
            dev: Arc::clone(gate) as Arc<dyn diskfmt::BlockDev>,
            read_only: spec.read_only,
        });
        if let (Some(tcp), Some(secret)) = (&self.nbd_tcp, &self.cfg.secret) {
            tcp.add(nbd::Export {
                name: exports::tcp_name(secret, &spec.name),
                description,
                dev: Arc::clone(gate) as Arc<dyn diskfmt::BlockDev>,
                read_only: spec.read_only,
            });
        }
    }

    pub fn unpublish(&self, name: &str) {
        self.nbd_unix.remove(name);
        if let (Some(tcp), Some(secret)) = (&self.nbd_tcp, &self.cfg.secret) {
            tcp.remove(&exports::tcp_name(secret, name));
        }
    }

    /// Opens the recorded exports again after a restart.
    pub(crate) async fn restore_exports(&self) -> Result<()> {
        let specs = exports::load(&self.exports_path())?;
        let mut table = self.exports.lock().await;
        for spec in specs {
            let Some(m) = self.member_by_uuid(&spec.datastore) else {
                tracing::error!(
                    "export {}: datastore {} is no longer configured; dropping the export",
                    spec.name,
                    spec.datastore
                );
                continue;
            };
            match Gate::open(
                &m.session,
                &spec.path,
                spec.read_only,
                spec.active,
                self.cfg.write_hold,
            )
            .await
            {
                Ok(g) => {
                    let gate = Arc::new(g);
                    self.publish(&spec, &gate);
                    tracing::info!("export {} restored", spec.name);
                    table.insert(spec.name.clone(), ExportEntry { spec, gate });
                }
                Err(e) => tracing::error!("export {}: cannot restore: {e:#}", spec.name),
            }
        }
        self.save_exports(&table).await
    }
}
