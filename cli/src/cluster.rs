//! `ferry datastore create|info|locks`, `ferry lock` and the hidden `ferry supervise`
//! (the fencing watchdog `ferry lock` starts outside its host cgroup).

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use datastore::device::Device;
use datastore::fence::{self, HostCgroup, Outcome};
use datastore::hostlease::HostLease;
use datastore::store::{probe_signature, Liveness, Signature};
use datastore::{locks, Datastore, LockMode, Observer, Profile};
use serde_json::json;

use crate::host::current_cgroup;
use crate::units::{human, parse_size};

#[derive(Subcommand, Debug)]
pub enum DatastoreCommand {
    /// Format a block device, or create and format an image file, as a datastore.
    Create {
        /// Block device or image file.
        device: PathBuf,
        #[arg(long)]
        label: String,
        /// Size of a new image file (K/M/G/T).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, default_value_t = 64)]
        max_hosts: u32,
        #[arg(long, default_value = "production")]
        profile: Profile,
        /// Format even if the device holds a datastore, a file system or a partition table.
        #[arg(long)]
        force: bool,
    },
    /// Show a datastore: identity, geometry, timings and the hosts in its heartbeat region.
    Info {
        device: PathBuf,
        /// Seconds to watch heartbeats before judging liveness (default: one renewal
        /// interval plus one io_timeout).
        #[arg(long)]
        observe: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// List the lock records of a datastore.
    Locks {
        device: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the local agent's datastores (no argument), or a folder of a datastore
    /// (DEVICE or DEVICE:/folder), or one file.
    Ls {
        target: Option<String>,
        #[command(flatten)]
        agent: crate::agentctl::AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Verify every invariant of a datastore; exit 1 if anything is wrong.
    Check {
        device: PathBuf,
        /// Free leaked blocks and finish gone hosts' transactions (joins as this host).
        #[arg(long)]
        repair: bool,
        /// Host name to join as with --repair (default: FERRY_HOST, else the host name).
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create a folder (DEVICE:/folder).
    Mkdir {
        path: String,
        #[arg(long)]
        host: Option<String>,
    },
    /// Remove a file (open nowhere) or an empty folder (DEVICE:/path).
    Rm {
        path: String,
        #[arg(long)]
        host: Option<String>,
    },
    /// Rename or move a file or folder inside its datastore.
    Mv {
        from: String,
        to: String,
        #[arg(long)]
        host: Option<String>,
    },
}

/// `ferry lock`: hold a lock while a command runs.
#[derive(Args, Debug)]
pub struct LockArgs {
    /// The datastore device (this host's path to it).
    #[arg(long)]
    datastore: PathBuf,
    /// The host name to join as.
    #[arg(long)]
    host: String,
    /// Object to lock.
    #[arg(long)]
    object: String,
    #[arg(long, default_value = "exclusive")]
    mode: LockMode,
    /// Seconds to wait for the lock (default: try once).
    #[arg(long, default_value_t = 0.0)]
    wait: f64,
    /// Management address published in the heartbeat slot.
    #[arg(long, default_value = "")]
    address: String,
    /// The command to run while holding the lock.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `ferry supervise` (internal): the watchdog that fences a host cgroup.
#[derive(Args, Debug)]
pub struct SuperviseArgs {
    #[arg(long)]
    cgroup: PathBuf,
    #[arg(long)]
    fence_after_ms: u64,
    /// Negative-control tests only: report instead of fencing.
    #[arg(long)]
    no_fence: bool,
    /// Append `fenced <CLOCK_BOOTTIME ns>` here when the cgroup was emptied.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Read pets from this FIFO instead of stdin (the agent's watchdog: it outlives an
    /// agent process, and the agent's next incarnation pets it through the same FIFO).
    #[arg(long)]
    fifo: Option<PathBuf>,
    /// How long to wait for the killed cgroup to empty (default: fence_after).
    #[arg(long)]
    kill_grace_ms: Option<u64>,
    /// What to do if it does not: reboot or log.
    #[arg(long, default_value = "log")]
    on_stuck: fence::Escalation,
}

pub fn run_datastore(cmd: DatastoreCommand, rt: &tokio::runtime::Runtime) -> Result<u8> {
    use crate::dsfiles;
    match cmd {
        DatastoreCommand::Ls {
            target: Some(target),
            json,
            ..
        } => rt.block_on(dsfiles::ls(&target, json)),
        DatastoreCommand::Ls {
            target: None,
            agent,
            json,
        } => rt.block_on(crate::agentctl::datastores(&agent, json)),
        DatastoreCommand::Check {
            device,
            repair,
            host,
            json,
        } => rt.block_on(dsfiles::check_cmd(&device, repair, host.as_deref(), json)),
        DatastoreCommand::Mkdir { path, host } => {
            rt.block_on(dsfiles::mkdir(&path, host.as_deref()))
        }
        DatastoreCommand::Rm { path, host } => rt.block_on(dsfiles::rm(&path, host.as_deref())),
        DatastoreCommand::Mv { from, to, host } => {
            rt.block_on(dsfiles::mv(&from, &to, host.as_deref()))
        }
        DatastoreCommand::Create {
            device,
            label,
            size,
            max_hosts,
            profile,
            force,
        } => create(&device, &label, size, max_hosts, profile, force),
        DatastoreCommand::Info {
            device,
            observe,
            json,
        } => info(&device, observe, json),
        DatastoreCommand::Locks { device, json } => list_locks(&device, json),
    }
}

fn create(
    device: &Path,
    label: &str,
    size: Option<u64>,
    max_hosts: u32,
    profile: Profile,
    force: bool,
) -> Result<u8> {
    if label.is_empty() || label.len() > datastore::format::MAX_LABEL {
        bail!("{}: --label must be 1 to 64 bytes", device.display());
    }
    if !(1..=datastore::format::MAX_HOSTS).contains(&max_hosts) {
        bail!("{}: --max-hosts must be 1 to 64", device.display());
    }
    let meta = std::fs::metadata(device).ok();
    let is_dev = meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    match (&meta, size) {
        (None, None) => bail!(
            "{}: does not exist; give --size to create an image file",
            device.display()
        ),
        (None, Some(s)) => {
            let f = std::fs::File::create_new(device)
                .with_context(|| format!("{}: cannot create", device.display()))?;
            f.set_len(s)
                .with_context(|| format!("{}: cannot size", device.display()))?;
        }
        (Some(_), Some(_)) if is_dev => bail!(
            "{}: is a block device; --size is only for new image files",
            device.display()
        ),
        (Some(_), Some(s)) => {
            if !force {
                bail!(
                    "{}: already exists; omit --size to format it as it is, or add --force",
                    device.display()
                );
            }
            std::fs::OpenOptions::new()
                .write(true)
                .open(device)
                .and_then(|f| f.set_len(s))
                .with_context(|| format!("{}: cannot resize", device.display()))?;
        }
        (Some(_), None) => {}
    }
    let dev = Device::open(device)?;
    if !force {
        match probe_signature(&dev)? {
            Some(Signature::Ferry { label, uuid }) => bail!(
                "{}: already holds ferry datastore {label:?} ({uuid}); add --force to format it anyway",
                device.display()
            ),
            Some(Signature::Other(what)) => bail!(
                "{}: holds {what}; add --force to format it anyway",
                device.display()
            ),
            None => {}
        }
    }
    let sb = Datastore::format(&dev, dev.size(), label, max_hosts, profile)?;
    println!(
        "Formatted {} as datastore {:?} ({}), {}, {} host slots, profile {:?} (io_timeout {} ms)",
        device.display(),
        sb.label,
        sb.uuid,
        human(sb.size),
        sb.max_hosts,
        sb.profile,
        sb.io_timeout_ms
    );
    Ok(0)
}

fn info(device: &Path, observe: Option<f64>, json: bool) -> Result<u8> {
    let ds = Datastore::open(device)?;
    let sb = ds.superblock().clone();
    let window = observe
        .map(Duration::from_secs_f64)
        .unwrap_or(sb.renew_interval() + sb.io_timeout());
    let mut obs = Observer::new(&ds);
    let first = obs.observe(&ds)?.to_vec();
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        std::thread::sleep((window - start.elapsed()).min(sb.io_timeout() / 2));
        obs.observe(&ds)?;
    }
    let last = obs.observe(&ds)?.to_vec();
    let hosts: Vec<_> = first
        .iter()
        .zip(&last)
        .filter(|(_, l)| l.liveness != Liveness::Free || l.slot.is_some())
        .map(|(f, l)| {
            let state = match l.liveness {
                Liveness::Free => "free",
                Liveness::Unknown => "unknown",
                Liveness::Dead => "dead",
                Liveness::Live if f.slot != l.slot => "live",
                // Joined but not renewed while we watched, and not yet host_dead.
                Liveness::Live if window.is_zero() => "joined",
                Liveness::Live => "stale",
            };
            let s = l.slot.as_ref();
            json!({
                "host_id": l.host_id,
                "name": s.map(|s| s.name.clone()),
                "generation": s.map(|s| s.host_generation),
                "state": state,
                "address": s.map(|s| s.address.clone()),
                "renewals": s.map(|s| s.renewal),
                "unchanged_ms": l.unchanged_ms,
            })
        })
        .collect();
    let dev = Device::open(device)?;
    let space = datastore::files::space_info(&ds)?;
    let v = json!({
        "device": device,
        "label": sb.label,
        "uuid": sb.uuid,
        "size": sb.size,
        "metadata_bytes": sb.metadata_bytes(),
        "data_bytes": sb.size - sb.metadata_bytes(),
        "logical_sector": dev.logical_sector(),
        "physical_sector": dev.physical_sector(),
        "max_hosts": sb.max_hosts,
        "lock_records": sb.lock_count,
        "profile": sb.profile,
        "io_timeout_ms": sb.io_timeout_ms,
        "renew_interval_ms": sb.renew_interval().as_millis() as u64,
        "fence_after_ms": sb.fence_after().as_millis() as u64,
        "host_dead_ms": sb.host_dead().as_millis() as u64,
        "block_size": space.block_size,
        "total_blocks": space.total_blocks,
        "free_blocks": space.free_blocks,
        "blocks_per_cluster": sb.blocks_per_cluster,
        "file_descriptors": sb.desc_count,
        "observed_ms": window.as_millis() as u64,
        "hosts": hosts,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("datastore:     {} ({})", sb.label, sb.uuid);
    println!(
        "device:        {} ({} B logical / {} B physical sectors)",
        device.display(),
        dev.logical_sector(),
        dev.physical_sector()
    );
    println!(
        "size:          {} ({} metadata)",
        human(sb.size),
        human(sb.metadata_bytes())
    );
    println!(
        "space:         {} free of {} in 1 MiB blocks, clusters of {} blocks",
        human(space.free_blocks * space.block_size),
        human(space.total_blocks * space.block_size),
        sb.blocks_per_cluster
    );
    println!(
        "profile:       {:?}: io_timeout {} s, renew every {} s, fence after {} s, host dead after {} s",
        sb.profile,
        sb.io_timeout().as_secs_f64(),
        sb.renew_interval().as_secs_f64(),
        sb.fence_after().as_secs_f64(),
        sb.host_dead().as_secs_f64()
    );
    println!("hosts (watched {:.1} s):", window.as_secs_f64());
    if hosts.is_empty() {
        println!("  none");
    }
    for h in hosts {
        println!(
            "  {:>3}  {:<20} gen {:<4} {:<8} {}",
            h["host_id"],
            h["name"].as_str().unwrap_or("?"),
            h["generation"],
            h["state"].as_str().unwrap_or("?"),
            h["address"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

fn list_locks(device: &Path, json: bool) -> Result<u8> {
    let ds = Datastore::open(device)?;
    let mut obs = Observer::new(&ds);
    let views = obs.observe(&ds)?.to_vec();
    let entries = locks::list(&ds)?;
    let rows: Vec<_> = entries
        .iter()
        .map(|e| {
            let holders: Vec<_> = e
                .lock
                .holders
                .iter()
                .map(|h| {
                    let v = views.get(h.host_id as usize - 1);
                    let slot = v.and_then(|v| v.slot.as_ref());
                    let state = match (v.map(|v| v.liveness), slot) {
                        (Some(Liveness::Unknown), _) => "unknown",
                        (_, Some(s))
                            if s.host_generation == h.generation
                                && s.state == datastore::format::SlotState::Joined =>
                        {
                            "joined"
                        }
                        _ => "gone",
                    };
                    json!({
                        "host_id": h.host_id,
                        "generation": h.generation,
                        "name": slot.map(|s| s.name.clone()),
                        "owner_state": state,
                    })
                })
                .collect();
            json!({
                "object": e.lock.object,
                "mode": e.lock.mode,
                "version": e.lock.version,
                "holders": holders,
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!("{:<32} {:<13} {:>8}  holders", "object", "mode", "version");
    for r in rows {
        let holders: Vec<String> = r["holders"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        format!(
                            "{} (gen {}, {})",
                            h["name"].as_str().unwrap_or("?"),
                            h["generation"],
                            h["owner_state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let holders = if holders.is_empty() {
            "-".to_string()
        } else {
            holders.join(", ")
        };
        println!(
            "{:<32} {:<13} {:>8}  {}",
            r["object"].as_str().unwrap_or("?"),
            r["mode"].as_str().unwrap_or("?"),
            r["version"],
            holders
        );
    }
    Ok(0)
}

pub fn run_lock(args: LockArgs) -> Result<u8> {
    let unsafe_no_fence = datastore::failpoint::fires("unsafe-no-fence");
    let ds = Arc::new(Datastore::open(&args.datastore)?);

    // The host cgroup holds this process and the command; the supervisor stays outside.
    let home = current_cgroup()?;
    let cg = HostCgroup::create(&format!("host-{}-{}", args.host, std::process::id()))?;
    let mut supervisor = crate::host::spawn_supervisor(&ds, &cg, unsafe_no_fence)?;
    let pipe = Arc::new(Mutex::new(
        supervisor.stdin.take().context("supervisor stdin")?,
    ));
    cg.enter(std::process::id())?;

    let result = hold_and_run(&ds, &args, &pipe, unsafe_no_fence);

    // Whatever happened, we no longer hold anything: release the watchdog.
    let _ = writeln!(pipe.lock().expect("pipe"), "done");
    drop(pipe);
    let _ = supervisor.wait();
    let _ = HostCgroup::at(home).enter(std::process::id());
    cg.remove();
    result
}

fn hold_and_run(
    ds: &Arc<Datastore>,
    args: &LockArgs,
    pipe: &Arc<Mutex<std::process::ChildStdin>>,
    unsafe_no_fence: bool,
) -> Result<u8> {
    let pet_pipe = Arc::clone(pipe);
    let pet = Box::new(move |issue: Duration| {
        let _ = writeln!(pet_pipe.lock().expect("pipe"), "pet {}", issue.as_nanos());
    });
    let lease = HostLease::join_opts(
        Arc::clone(ds),
        &args.host,
        &args.address,
        pet,
        !unsafe_no_fence,
    )?;
    // The join's slot write is the first renewal: the watchdog deadline runs from its
    // issue time, so the host is fenced before anyone can see it dead.
    let _ = writeln!(
        pipe.lock().expect("pipe"),
        "pet {}",
        lease.last_good().as_nanos()
    );
    let me = lease.owner();
    let mut obs = Observer::new(ds);
    // Never start using locks on a lease that has already expired (say this process was
    // stopped right after joining): others may already count this host as dead.
    if let Err(e) = lease.check() {
        return Err(e.into());
    }
    let version = match locks::acquire(
        ds,
        me,
        &mut obs,
        &args.object,
        args.mode,
        Duration::from_secs_f64(args.wait.max(0.0)),
    ) {
        Ok(v) => v,
        Err(e) => {
            let _ = lease.leave();
            return Err(e.into());
        }
    };
    if let Err(e) = lease.check() {
        let _ = locks::release(ds, me, &mut obs, &args.object);
        return Err(e.into());
    }
    eprintln!(
        "ferry: holding lock {:?} ({}, version {version}) as host {} (id {}, generation {})",
        args.object,
        args.mode.as_str(),
        args.host,
        me.host_id,
        me.generation
    );
    let child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("FERRY_LOCK_OBJECT", &args.object)
        .env("FERRY_LOCK_VERSION", version.to_string())
        .env("FERRY_HOST_ID", me.host_id.to_string())
        .env("FERRY_HOST_GENERATION", me.generation.to_string())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            // Give the lock and the slot back before reporting.
            let _ = locks::release(ds, me, &mut obs, &args.object);
            let _ = lease.leave();
            bail!("cannot run {:?}: {e}", args.command[0]);
        }
    };
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Err(e) = lease.check() {
            // Lost: stop the command (and anything it started in our cgroup) now.
            let _ = child.kill();
            kill_cgroup_except_self();
            let _ = child.wait();
            bail!("lock {:?} lost, command killed: {e}", args.object);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let released = locks::release(ds, me, &mut obs, &args.object);
    let left = lease.leave();
    released?;
    left?;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    })
}

/// SIGKILLs every other process of our cgroup (children the command left behind).
fn kill_cgroup_except_self() {
    let Ok(me) = current_cgroup() else { return };
    let own = std::process::id();
    for pid in HostCgroup::at(me).pids() {
        if pid != own {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub fn run_supervise(args: SuperviseArgs) -> Result<u8> {
    // (main has already detached it from the caller's session: `fence::detach`.)
    let cg = HostCgroup::at(args.cgroup.clone());
    let input: Box<dyn std::io::Read + Send> = match &args.fifo {
        // Opened read-write, the FIFO never reports end of file when a writer goes away.
        Some(f) => Box::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(f)
                .with_context(|| format!("{}: cannot open the watchdog FIFO", f.display()))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    let fence_after = Duration::from_millis(args.fence_after_ms);
    let outcome = fence::supervise_with(
        input,
        &cg,
        fence_after,
        !args.no_fence,
        args.kill_grace_ms
            .map_or(fence_after, Duration::from_millis),
        args.on_stuck,
    )?;
    match outcome {
        Outcome::Clean => Ok(0),
        Outcome::Fenced(at) => {
            eprintln!(
                "ferry supervise: fenced {}: cgroup emptied",
                args.cgroup.display()
            );
            if let Some(r) = args.report {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&r)?;
                writeln!(f, "fenced {} {}", at.as_nanos(), args.cgroup.display())?;
            }
            cg.remove();
            Ok(0)
        }
        Outcome::WouldHaveFenced => Ok(0),
        Outcome::Stuck(at) => {
            eprintln!(
                "ferry supervise: {} did not empty within the kill grace (escalation: {})",
                args.cgroup.display(),
                args.on_stuck.as_str()
            );
            if let Some(r) = args.report {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&r)?;
                writeln!(f, "stuck {} {}", at.as_nanos(), args.cgroup.display())?;
            }
            Ok(1)
        }
    }
}
