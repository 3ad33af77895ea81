//! VMs run by the agent under QEMU.
//!
//! A VM is its definition (`/<name>/vm.toml` in a datastore, see [`spec`]) and its disk
//! files. Starting it on this host takes the exclusive lock of `vm.toml` (held while it
//! runs) and exports each disk writable (its exclusive lock) on the agent's NBD socket,
//! then starts QEMU ([`qemu`]) in the VM's own cgroup under the host's, so fencing the
//! host empties it. A monitor notices when QEMU exits — asked to, or crashed — and
//! releases everything. QEMU outlives an agent restart: the next agent process finds it
//! by its pid file and watches it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{bail, fail, Context, Error, Result};
use datastore::files::DsFile;
use datastore::LockMode;
use serde_json::{json, Value};

use crate::host::exports::{ExportSpec, Gate};
use crate::host::membership::Member;
use crate::host::{Agent, RunningVm};
use vm_glue::qemu;
use vm_glue::qmp::Qmp;
use vm_glue::spec::VmSpec;

use vm_glue::definition::{self, Stored, CONFIG_SIZE};

/// The definition's path in its datastore.
pub fn config_path(name: &str) -> String {
    format!("/{name}/vm.toml")
}

pub(crate) fn vm_dir(agent: &Agent, name: &str) -> PathBuf {
    agent.cfg.run_dir.join("vms").join(name)
}

/// Reads a definition without a lock (what its writer last flushed).
pub async fn read_stored(m: &Member, name: &str) -> Result<Stored> {
    let dev = m.ds.path().to_path_buf();
    let path = config_path(name);
    let f = tokio::task::spawn_blocking(move || DsFile::open_readonly(&dev, &path))
        .await
        .expect("open task")?;
    Ok(definition::read(&f, &format!("{}:{}", m.label(), config_path(name))).await?)
}

/// Reads a definition's VM spec without a lock.
pub async fn read_spec(m: &Member, name: &str) -> Result<VmSpec> {
    Ok(read_stored(m, name).await?.spec)
}

/// The datastore holding VM `name`'s definition and the definition. Of copies on
/// several datastores (left by a relocation interrupted at its commit), the newest
/// valid one is the VM.
pub async fn locate(agent: &Agent, name: &str) -> Option<(Arc<Member>, Stored)> {
    let mut best: Option<(Arc<Member>, Stored)> = None;
    for m in &agent.members {
        if datastore::files::stat(&m.ds, &config_path(name)).is_err() {
            continue;
        }
        match read_stored(m, name).await {
            Ok(st) => {
                if best.as_ref().is_none_or(|(_, b)| st.supersedes(b)) {
                    best = Some((Arc::clone(m), st));
                }
            }
            Err(e) => tracing::warn!("VM {name}: {e:#}"),
        }
    }
    best
}

/// Finds the datastore holding VM `name`'s definition.
pub fn find(agent: &Agent, name: &str) -> Option<Arc<Member>> {
    agent
        .members
        .iter()
        .find(|m| datastore::files::stat(&m.ds, &config_path(name)).is_ok())
        .cloned()
}

/// What `POST /v1/vms` asks for.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateReq {
    pub name: String,
    pub datastore: String,
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub machine: Option<String>,
    pub cpu: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub firmware: Option<String>,
    #[serde(default)]
    pub disks: Vec<DiskReq>,
    #[serde(default)]
    pub nics: Vec<NicReq>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskReq {
    pub size: u64,
    pub provisioning: Option<String>,
    pub datastore: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicReq {
    pub mac: Option<String>,
    pub bridge: Option<String>,
}

fn random_mac() -> String {
    let u = uuid::Uuid::new_v4();
    let b = u.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// Creates a VM: its folder, disks and definition.
pub async fn create(agent: &Agent, r: CreateReq) -> Result<VmSpec> {
    let home = agent
        .member(&r.datastore)
        .ok_or_else(|| fail!("this host has no datastore {:?}", r.datastore))?;
    if let Some(m) = find(agent, &r.name) {
        bail!(
            "a VM named {:?} already exists in datastore {}",
            r.name,
            m.label()
        );
    }
    let mut disks = Vec::new();
    for (i, d) in r.disks.iter().enumerate() {
        disks.push(vm_glue::spec::Disk {
            name: format!("disk{i}"),
            datastore: d.datastore.clone().unwrap_or_else(|| r.datastore.clone()),
            path: format!("/{}/disk{i}", r.name),
            size: d.size,
            provisioning: d.provisioning.clone().unwrap_or_else(|| "thin".into()),
        });
    }
    let spec = VmSpec {
        name: r.name.clone(),
        uuid: uuid::Uuid::new_v4().to_string(),
        memory_mib: r.memory_mib,
        vcpus: r.vcpus,
        machine: r.machine.unwrap_or_else(|| "pc-q35-7.2".into()),
        cpu: r.cpu.unwrap_or_else(|| "qemu64".into()),
        boot: vm_glue::spec::Boot {
            kernel: r.kernel,
            initrd: r.initrd,
            append: r.append,
            firmware: r.firmware,
        },
        disks,
        nics: r
            .nics
            .into_iter()
            .map(|n| vm_glue::spec::Nic {
                mac: n.mac.unwrap_or_else(random_mac),
                bridge: n.bridge,
            })
            .collect(),
        moved_to: None,
    };
    spec.validate().map_err(Error::invalid)?;
    for d in &spec.disks {
        if agent.member(&d.datastore).is_none() {
            bail!(
                "disk {}: this host has no datastore {:?}",
                d.name,
                d.datastore
            );
        }
    }
    // Folders, disks, then the definition last: a VM exists once vm.toml does.
    let mut made: Vec<(Arc<Member>, String)> = Vec::new();
    let out = async {
        let mut folders: Vec<String> = Vec::new();
        for ds in std::iter::once(&r.datastore).chain(spec.disks.iter().map(|d| &d.datastore)) {
            if folders.contains(ds) {
                continue;
            }
            let m = agent.member(ds).expect("checked");
            let s = Arc::clone(&m.session);
            let p = format!("/{}", spec.name);
            let p2 = p.clone();
            tokio::task::spawn_blocking(move || s.mkdir(&p2))
                .await
                .expect("mkdir task")?;
            made.push((m, p));
            folders.push(ds.clone());
        }
        for d in &spec.disks {
            let m = agent.member(&d.datastore).expect("checked");
            let prov = d.provisioning.parse().map_err(|e: String| fail!(e))?;
            let f = m.session.create(&d.path, d.size, prov).await?;
            made.push((Arc::clone(&m), d.path.clone()));
            f.close().await?;
        }
        let f = home
            .session
            .create(
                &config_path(&spec.name),
                CONFIG_SIZE,
                diskfmt::Provisioning::Thin,
            )
            .await?;
        made.push((Arc::clone(&home), config_path(&spec.name)));
        let w = definition::write_next(&f, &spec, None).await;
        f.close().await?;
        w.map(|_| ())?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = out {
        for (m, p) in made.into_iter().rev() {
            let _ = m.session.remove(&p).await;
        }
        return Err(e);
    }
    Ok(spec)
}

pub(crate) fn export_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

/// Starts VM `name` on this host.
pub async fn start(agent: &Arc<Agent>, name: &str) -> Result<Value> {
    let _slot = agent.reserve_vm(name).await?;
    let (home, stored) = locate(agent, name).await.ok_or_else(|| {
        Error::not_found(format!("no VM named {name:?} on this host's datastores"))
    })?;
    let spec = stored.spec;
    if let Some(to) = &spec.moved_to {
        bail!(
            "VM {name} moved to datastore {to}: start it on a host that sees {to} \
             (the definition here on {} is only a record of the move)",
            home.label()
        );
    }
    // The definition's lock: a second host starting the VM stops here, told who runs it.
    let config = home
        .session
        .open(&config_path(name), LockMode::Exclusive)
        .await
        .map_err(|e| fail!("VM {name} cannot start here: {e}"))?;
    let mut exports = Vec::new();
    let started = async {
        for d in &spec.disks {
            let m = agent.member(&d.datastore).ok_or_else(|| {
                fail!(
                    "disk {}: this host has no datastore {:?}",
                    d.name,
                    d.datastore
                )
            })?;
            let ename = export_name(name, &d.name);
            let gate =
                Arc::new(Gate::open(&m.session, &d.path, false, true, agent.cfg.write_hold).await?);
            let spec = ExportSpec {
                name: ename.clone(),
                datastore: *m.ds.uuid(),
                path: d.path.clone(),
                read_only: false,
                active: true,
            };
            agent.add_vm_export(spec, gate).await?;
            exports.push(ename);
        }
        launch(agent, &spec, &exports, false).await
    }
    .await;
    match started {
        Ok((pid, qmp, cgroup, accel)) => {
            let info = json!({"name": name, "pid": pid, "accel": accel, "host": agent.cfg.host});
            let mut vms = agent.vms.lock().await;
            vms.insert(
                name.to_string(),
                RunningVm {
                    spec,
                    datastore: home.label().to_string(),
                    pid,
                    qmp: Some(qmp),
                    exports,
                    cgroup,
                    accel,
                    config: Some(config),
                    incoming: false,
                    storage: None,
                    attempt: None,
                },
            );
            drop(vms);
            watch(Arc::clone(agent), name.to_string(), pid);
            Ok(info)
        }
        Err(e) => {
            release_exports(agent, &exports).await;
            let _ = config.close().await;
            Err(e)
        }
    }
}

pub(crate) async fn release_exports(agent: &Agent, names: &[String]) {
    let mut table = agent.exports.lock().await;
    for n in names {
        if let Some(e) = table.remove(n) {
            agent.unpublish(n);
            if let Err(err) = e.gate.shut(false).await {
                tracing::error!("export {n}: {err:#}");
            }
        }
    }
    let _ = agent.save_exports(&table).await;
}

/// Refuses boot files outside this host's `boot_dirs`, at every start of QEMU here
/// (incoming moves included): each host decides what its QEMU may read.
fn check_boot_files(agent: &Agent, spec: &VmSpec) -> Result<()> {
    for (field, p) in [
        ("boot.kernel", &spec.boot.kernel),
        ("boot.initrd", &spec.boot.initrd),
        ("boot.firmware", &spec.boot.firmware),
    ] {
        if let Some(p) = p {
            agent
                .cfg
                .check_boot_file(field, p)
                .map_err(|e| fail!("VM {}: {e:#}", spec.name))?;
        }
    }
    Ok(())
}

/// Starts QEMU in the VM's cgroup; returns its pid, QMP connection, cgroup, accelerator.
pub(crate) async fn launch(
    agent: &Agent,
    spec: &VmSpec,
    exports: &[String],
    incoming: bool,
) -> Result<(u32, Arc<Qmp>, PathBuf, &'static str)> {
    check_boot_files(agent, spec)?;
    let dir = vm_dir(agent, &spec.name);
    std::fs::create_dir_all(&dir)?;
    let qmp_sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_sock);
    let console = dir.join("console.log");
    end_console_line(&console)
        .with_context(|| format!("{}: cannot append to it", console.display()))?;
    let (accel, why) = qemu::choose_accel(&agent.cfg.accel).map_err(|e| fail!(e))?;
    tracing::info!("VM {}: {why}", spec.name);
    let args = qemu::args(
        spec,
        &qemu::Wiring {
            nbd_socket: &agent.cfg.nbd_socket(),
            qmp_socket: &qmp_sock,
            console_log: &console,
            exports: exports.to_vec(),
            accel,
            paused: false,
            incoming,
        },
    );
    let cg = agent.cgroup.join(format!("vm-{}", spec.name));
    std::fs::create_dir_all(&cg).with_context(|| format!("{}: cannot create", cg.display()))?;
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    // The shell moves itself into the VM's cgroup, then becomes QEMU: QEMU never runs
    // outside it, even for an instant.
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(&cg)
        .arg(&agent.cfg.qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", agent.cfg.qemu))?;
    let pid = child.id();
    // Reaped by a thread; the monitor watches the pid (also after an agent restart,
    // when QEMU is no longer our child).
    std::thread::spawn(move || {
        let mut c = child;
        let _ = c.wait();
    });
    std::fs::write(dir.join("pid"), pid.to_string())?;
    let mut qmp = None;
    for _ in 0..200 {
        if !alive(pid) {
            break;
        }
        if qmp_sock.exists() {
            if let Ok(q) = Qmp::connect(&qmp_sock, Duration::from_secs(10)).await {
                qmp = Some(q);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(qmp) = qmp else {
        kill_cgroup(&cg);
        let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
        bail!(
            "QEMU for VM {} did not come up: {}",
            spec.name,
            log.lines().last().unwrap_or("no output")
        );
    };
    for (i, n) in spec.nics.iter().enumerate() {
        let Some(br) = &n.bridge else { continue };
        let tap = qemu::tap_name(&spec.name, i);
        let out = std::process::Command::new("ip")
            .args(["link", "set", &tap, "master", br, "up"])
            .output();
        let failed = match &out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            kill_cgroup(&cg);
            bail!(
                "VM {}: cannot attach NIC {i} ({tap}) to bridge {br}: {why} (does the bridge exist on this host?)",
                spec.name
            );
        }
    }
    Ok((pid, Arc::new(qmp), cg, accel.as_str()))
}

fn alive(pid: u32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub(crate) fn kill_cgroup(cg: &Path) {
    let c = datastore::fence::HostCgroup::at(cg.to_path_buf());
    let _ = c.kill(Duration::from_secs(5));
    c.remove();
}

/// Watches QEMU's pid; when it is gone, releases the VM's exports and locks.
pub(crate) fn watch(agent: Arc<Agent>, name: String, pid: u32) {
    tokio::spawn(async move {
        let mut ticks = 0u32;
        while alive(pid) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ticks += 1;
            if ticks.is_multiple_of(50) {
                let log = vm_dir(&agent, &name).join("console.log");
                let _ =
                    tokio::task::spawn_blocking(move || rotate_console(&log, CONSOLE_MAX)).await;
            }
        }
        let vm = agent.vms.lock().await.remove(&name);
        if let Some(mut vm) = vm {
            tracing::info!("VM {name}: QEMU (pid {pid}) exited; releasing its disks");
            release_exports(&agent, &vm.exports).await;
            if let Some(c) = vm.config.take() {
                if let Err(e) = c.close().await {
                    tracing::error!("VM {name}: releasing vm.toml: {e}");
                }
            }
            kill_cgroup(&vm.cgroup);
            let _ = std::fs::remove_file(vm_dir(&agent, &name).join("pid"));
        }
    });
}

/// After an agent restart: watches again every VM whose QEMU still runs.
pub async fn reattach(agent: &Arc<Agent>) {
    let Ok(rd) = std::fs::read_dir(agent.cfg.run_dir.join("vms")) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = std::fs::read_to_string(e.path().join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            // QEMU ended while no agent watched it: the VM is stopped; its disks'
            // exports (restored from the table) and their locks go.
            let _ = std::fs::remove_file(e.path().join("pid"));
            if let Some((_, st)) = locate(agent, &name).await {
                let names: Vec<String> = st
                    .spec
                    .disks
                    .iter()
                    .map(|d| export_name(&name, &d.name))
                    .collect();
                tracing::info!("VM {name}: QEMU (pid {pid}) ended while the agent was away; releasing its disks");
                release_exports(agent, &names).await;
            }
            continue;
        }
        let qmp = Qmp::connect(&e.path().join("qmp.sock"), Duration::from_secs(10))
            .await
            .ok()
            .map(Arc::new);
        // A QEMU still waiting for an incoming migration belonged to a relocation that
        // died with the previous agent process: it never ran the VM here. Remove it.
        if let Some(q) = &qmp {
            let status = q.execute("query-status", None).await.ok();
            // (Also a QEMU whose incoming side completed but that this host never
            // resumed: paused, it would count as running here.)
            if status.as_ref().is_some_and(|s| s["status"] == "inmigrate")
                || e.path().join("incoming").exists()
            {
                tracing::warn!("VM {name}: QEMU (pid {pid}) still waits for a migration that ended with the previous agent; removing it");
                let _ = std::fs::remove_file(e.path().join("incoming"));
                kill_cgroup(&agent.cgroup.join(format!("vm-{name}")));
                let _ = std::fs::remove_file(e.path().join("pid"));
                if let Some(spec) = locate(agent, &name).await.map(|(_, s)| s.spec) {
                    let names: Vec<String> = spec
                        .disks
                        .iter()
                        .map(|d| export_name(&name, &d.name))
                        .collect();
                    release_exports(agent, &names).await;
                }
                continue;
            }
        }
        // This host had decided to resume an incoming guest when the agent stopped.
        if let (Some(q), true) = (&qmp, e.path().join("resuming").exists()) {
            tracing::warn!("VM {name}: resuming the guest its migration brought here");
            let _ = q.execute("cont", None).await;
            let _ = std::fs::remove_file(e.path().join("resuming"));
        }
        let Some((home, stored)) = locate(agent, &name).await else {
            continue;
        };
        let spec = stored.spec;
        // Our lock on vm.toml survived the restart (same host generation): hold it again.
        let config = home
            .session
            .open(&config_path(&name), LockMode::Exclusive)
            .await
            .ok();
        let exports = spec
            .disks
            .iter()
            .map(|d| export_name(&name, &d.name))
            .collect();
        tracing::info!("VM {name}: QEMU (pid {pid}) still runs; watching it again");
        agent.vms.lock().await.insert(
            name.clone(),
            RunningVm {
                spec,
                datastore: home.label().to_string(),
                pid,
                qmp,
                exports,
                cgroup: agent.cgroup.join(format!("vm-{name}")),
                accel: "",
                config,
                incoming: false,
                storage: None,
                attempt: None,
            },
        );
        watch(Arc::clone(agent), name, pid);
    }
}

/// Stops a VM: ACPI power-down, then `quit` after `timeout` (at once with `force`),
/// then SIGKILL. Returns once QEMU has exited and the VM's locks are released.
pub async fn stop(agent: &Arc<Agent>, name: &str, force: bool, timeout: Duration) -> Result<()> {
    let (pid, qmp) = {
        let vms = agent.vms.lock().await;
        let vm = vms
            .get(name)
            .ok_or_else(|| fail!("VM {name} does not run on this host"))?;
        (vm.pid, vm.qmp.clone())
    };
    let gone = |t: Duration| async move {
        let deadline = tokio::time::Instant::now() + t;
        while tokio::time::Instant::now() < deadline {
            if !agent.vms.lock().await.contains_key(name) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    if !force {
        if let Some(q) = &qmp {
            let _ = q.execute("system_powerdown", None).await;
        }
        if gone(timeout).await {
            return Ok(());
        }
        tracing::info!(
            "VM {name}: no power-off within {}s; quitting",
            timeout.as_secs()
        );
    }
    if let Some(q) = &qmp {
        let _ = q.execute_within("quit", None, Duration::from_secs(5)).await;
    }
    if gone(Duration::from_secs(10)).await {
        return Ok(());
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    if gone(Duration::from_secs(10)).await {
        return Ok(());
    }
    bail!("VM {name}: QEMU (pid {pid}) did not exit")
}

/// Every VM in this host's datastores, with its state.
pub async fn list(agent: &Agent) -> Result<Vec<Value>> {
    let running: BTreeMap<String, (u32, bool)> = agent
        .vms
        .lock()
        .await
        .iter()
        .map(|(k, v)| (k.clone(), (v.pid, v.incoming)))
        .collect();
    let mut out = Vec::new();
    for m in &agent.members {
        let d = Arc::clone(&m.ds);
        let root = tokio::task::spawn_blocking(move || datastore::files::list(&d, "/"))
            .await
            .expect("list task")?;
        for e in root {
            let name = e.path.trim_start_matches('/').to_string();
            let d = Arc::clone(&m.ds);
            let p = config_path(&name);
            let Ok(st) = tokio::task::spawn_blocking(move || datastore::files::stat(&d, &p))
                .await
                .expect("stat task")
            else {
                continue;
            };
            // Of copies left by an interrupted relocation, only the newest is the VM.
            let Some((best, stored)) = locate(agent, &name).await else {
                continue;
            };
            if best.ds.uuid() != m.ds.uuid() {
                continue;
            }
            let spec = stored.spec;
            let (state, host, pid) = match running.get(&name) {
                // Waiting for a migration to this host: not running here yet.
                Some((pid, true)) => ("incoming", Some(agent.cfg.host.clone()), Some(*pid)),
                Some((pid, false)) => ("running", Some(agent.cfg.host.clone()), Some(*pid)),
                None => match &st.lock {
                    Some(holder) => ("running elsewhere", Some(holder.clone()), None),
                    None => ("stopped", None, None),
                },
            };
            out.push(json!({
                "name": name,
                "state": state,
                "host": host,
                "pid": pid,
                "datastore": m.label(),
                "memory_mib": spec.memory_mib,
                "vcpus": spec.vcpus,
                "machine": spec.machine,
                "cpu": spec.cpu,
                "disks": spec.disks,
                "nics": spec.nics,
            }));
        }
    }
    Ok(out)
}

/// The last `bytes` of a VM's console log on this host.
pub fn console(agent: &Agent, name: &str, bytes: usize) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let p = vm_dir(agent, name).join("console.log");
    let mut f = std::fs::File::open(&p).with_context(|| {
        format!(
            "VM {name} has no console log on this host ({})",
            p.display()
        )
    })?;
    // Only the tail is read, however long the log.
    let len = f.metadata()?.len();
    let want = (bytes as u64).min(CONSOLE_MAX);
    f.seek(SeekFrom::Start(len.saturating_sub(want)))?;
    let mut data = Vec::with_capacity(want as usize);
    f.take(want).read_to_end(&mut data)?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// A console log is rotated once it is this long (to `console.log.1`, replacing the
/// previous one): at most twice this per VM on the host.
pub const CONSOLE_MAX: u64 = 64 << 20;

/// Rotates a console log longer than `max`: copied to `console.log.1`, then truncated
/// (QEMU appends, so it goes on at the new end).
fn rotate_console(p: &Path, max: u64) {
    if std::fs::metadata(p).is_ok_and(|m| m.len() > max) {
        let old = p.with_extension("log.1");
        if std::fs::copy(p, &old).is_ok() {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(p) {
                let _ = f.set_len(0);
            }
        }
    }
}

/// Ends a console log's last line if it has no newline: each QEMU run of the VM on
/// this host starts on a line of its own, also when the last run stopped mid-line (a
/// guest that moved to another host while it printed goes on with the rest of the line
/// there).
fn end_console_line(p: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = match std::fs::OpenOptions::new().read(true).append(true).open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len() == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    f.seek(SeekFrom::End(-1))?;
    f.read_exact(&mut last)?;
    if last[0] != b'\n' {
        f.write_all(b"\n")?;
    }
    Ok(())
}

/// Deletes a stopped VM: its disks, its definition, its folders.
pub async fn remove(agent: &Agent, name: &str) -> Result<()> {
    if agent.vms.lock().await.contains_key(name) {
        bail!("VM {name} runs on this host: stop it first");
    }
    let (home, stored) = locate(agent, name)
        .await
        .ok_or_else(|| Error::not_found(format!("no VM named {name:?}")))?;
    let spec = stored.spec;
    // Taking the definition's lock proves the VM runs nowhere.
    let cfg = home
        .session
        .open(&config_path(name), LockMode::Exclusive)
        .await
        .map_err(|e| fail!("VM {name} cannot be removed: {e}"))?;
    cfg.close().await?;
    for d in &spec.disks {
        if let Some(m) = agent.member(&d.datastore) {
            m.session.remove(&d.path).await?;
        }
    }
    home.session.remove(&config_path(name)).await?;
    for m in &agent.members {
        let _ = m.session.remove(&format!("/{name}")).await;
    }
    let _ = std::fs::remove_dir_all(vm_dir(agent, name));
    Ok(())
}

#[cfg(test)]
mod tests;
