//! Cluster test harness: one datastore image, one loop device per host (each host's own
//! path to the "LUN", one with 4 KiB sectors), `ferry lock` processes per host, stopping and
//! continuing a host's whole cgroup, and the devcount log checker.
//!
//! Everything a test starts is ended by its `Drop`: lock processes are killed, their host
//! cgroups emptied, supervisors killed, loop devices detached.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use datastore::fence::HostCgroup;

use crate::{run_ok, LoopDev};

/// Cluster tests share the machine's timing: run them one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// The shipped ferry binary next to the test executable (`target/<profile>/ferry`).
pub fn ferry_bin() -> PathBuf {
    harness_bin("ferry")
}

/// The test build of ferry (`ferry-hooked`): reads test hooks from `FERRY_FAILPOINTS`.
pub fn ferry_hooked_bin() -> PathBuf {
    harness_bin("ferry-hooked")
}

/// `ferry-hooked` when `env` sets test hooks, else the shipped `ferry`.
pub fn ferry_bin_for<K: AsRef<str>, V>(env: &[(K, V)]) -> PathBuf {
    if env.iter().any(|(k, _)| k.as_ref() == "FERRY_FAILPOINTS") {
        ferry_hooked_bin()
    } else {
        ferry_bin()
    }
}

fn harness_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // Tests run from target/PROFILE/deps/, the harness's own binaries from target/PROFILE/.
    let here = exe.parent().expect("exe dir");
    let bin = if here.join(name).exists() {
        here.join(name)
    } else {
        here.parent().expect("target dir").join(name)
    };
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --release --workspace --bins)",
        bin.display()
    );
    bin
}

/// A datastore image with several loop devices over it.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub devices: Vec<LoopDev>,
    /// Host-name prefix unique to this cluster, so cgroups never collide.
    pub prefix: String,
    children: Vec<Child>,
    pub data_record: u64,
}

impl Cluster {
    /// Formats a test-profile datastore and attaches `paths` loop devices (the last one
    /// with 4 KiB logical sectors).
    pub fn new(paths: usize) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("lun.img");
        run_ok(
            ferry_bin().to_str().unwrap(),
            &[
                "datastore",
                "create",
                image.to_str().unwrap(),
                "--label",
                "test",
                "--size",
                "64M",
                "--profile",
                "test",
                "--max-hosts",
                "16",
            ],
        );
        let devices = (0..paths)
            .map(|i| LoopDev::attach(&image, (i + 1 == paths && paths > 1).then_some(4096)))
            .collect::<Vec<_>>();
        let info: serde_json::Value = serde_json::from_str(&run_ok(
            ferry_bin().to_str().unwrap(),
            &[
                "datastore",
                "info",
                "--json",
                "--observe",
                "0",
                devices[0].path().to_str().unwrap(),
            ],
        ))
        .expect("info json");
        let data_record = info["metadata_bytes"].as_u64().expect("metadata_bytes") / 4096;
        Cluster {
            dir,
            image,
            devices,
            prefix: format!(
                "t{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
            children: Vec::new(),
            data_record,
        }
    }

    /// Host `i`'s name.
    pub fn host(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Host `i`'s device path.
    pub fn dev(&self, i: usize) -> &Path {
        self.devices[i % self.devices.len()].path()
    }

    /// A file in the cluster's folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ferry lock` as host `i` running `cmd`; returns the child's index.
    pub fn lock(
        &mut self,
        i: usize,
        object: &str,
        wait: f64,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        self.lock_with(i, object, wait, cmd, env, false)
    }

    /// [`Cluster::lock`], started as a shell starts a job: in a process group of its own
    /// (whose id is the child's pid), so the whole group can be stopped as Ctrl-Z does.
    pub fn lock_job(
        &mut self,
        i: usize,
        object: &str,
        wait: f64,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        self.lock_with(i, object, wait, cmd, env, true)
    }

    fn lock_with(
        &mut self,
        i: usize,
        object: &str,
        wait: f64,
        cmd: &[&str],
        env: &[(&str, &str)],
        job: bool,
    ) -> usize {
        let mut c = Command::new(ferry_bin_for(env));
        if job {
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
        }
        c.args(["lock", "--datastore"])
            .arg(self.dev(i))
            .args([
                "--host",
                &self.host(i),
                "--object",
                object,
                "--wait",
                &wait.to_string(),
                "--",
            ])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        self.children.push(c.spawn().expect("spawn ferry lock"));
        self.children.len() - 1
    }

    /// The lock process `idx`.
    pub fn child(&mut self, idx: usize) -> &mut Child {
        &mut self.children[idx]
    }

    /// Waits for lock process `idx`; returns its exit code and stderr.
    pub fn wait(&mut self, idx: usize) -> (Option<i32>, String) {
        let c = &mut self.children[idx];
        let st = c.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (st.code(), err)
    }

    /// The devcount command line for host `i` (through its own device path).
    pub fn devcount(&self, i: usize, log: &Path, pause_ms: u64, hold_ms: u64) -> Vec<String> {
        vec![
            devcount_bin(),
            self.dev(i).display().to_string(),
            self.data_record.to_string(),
            log.display().to_string(),
            pause_ms.to_string(),
            hold_ms.to_string(),
        ]
    }

    /// Cgroup folders of host `i` (one per `ferry lock` process of that host).
    pub fn cgroups(&self, i: usize) -> Vec<PathBuf> {
        host_cgroups(&self.host(i))
    }

    /// The `ferry supervise` watchdog started by lock process `idx`.
    pub fn watchdog_of(&self, idx: usize) -> Option<u32> {
        let parent = self.children[idx].id();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (ppid == parent && cmdline.windows(9).any(|w| w == b"supervise")).then_some(pid)
        })
    }

    /// Sends `sig` to every process in host `i`'s cgroups (the host "machine").
    pub fn signal_host(&self, i: usize, sig: nix::sys::signal::Signal) {
        for cg in self.cgroups(i) {
            for pid in pids(&cg) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
            }
        }
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The ferry cgroup folders whose names start with `host-NAME-`.
pub fn host_cgroups(name: &str) -> Vec<PathBuf> {
    let root = cgroup2_root().join("ferry");
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("host-{name}-"))
        })
        .map(|e| e.path())
        .collect()
}

fn cgroup2_root() -> PathBuf {
    datastore::fence::cgroup2_root().expect("a cgroup2 mount")
}

/// Processes of a cgroup.
pub fn pids(cg: &Path) -> Vec<u32> {
    HostCgroup::at(cg.to_path_buf()).pids()
}

/// Whether a cgroup still has processes.
pub fn populated(cg: &Path) -> bool {
    HostCgroup::at(cg.to_path_buf()).populated()
}

/// `ferry supervise` processes watching this cluster's cgroups.
fn supervisors(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" supervise ") && cmd.contains(&format!("host-{prefix}")) {
                out.push(pid);
            }
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        for pid in supervisors(&self.prefix) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let root = cgroup2_root().join("ferry");
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("host-{}", self.prefix))
                {
                    let cg = HostCgroup::at(e.path());
                    let _ = cg.kill(Duration::from_secs(2));
                    cg.remove();
                }
            }
        }
        // Supervisors may have been mid-exit; reap any that remain.
        for pid in supervisors(&self.prefix) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// One parsed devcount log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Intent {
        lv: u64,
        host: u32,
        value: u64,
        read_lv: u64,
    },
    Done {
        lv: u64,
    },
    Violation(String),
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Parses a devcount log.
pub fn parse_log(path: &Path) -> Vec<Event> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            if l.starts_with("VIOLATION") {
                Event::Violation(l.to_string())
            } else if l.starts_with("intent") {
                Event::Intent {
                    lv: field(l, "lv"),
                    host: field(l, "host") as u32,
                    value: field(l, "read_value"),
                    read_lv: field(l, "read_lv"),
                }
            } else if l.starts_with("done") {
                Event::Done { lv: field(l, "lv") }
            } else {
                panic!("unparsable devcount line {l:?}")
            }
        })
        .collect()
}

/// Replays a devcount log against the final counter record: every lock version has one
/// holder, and each holder read exactly the state the previous holders left (a holder
/// killed between its intent and `done` may or may not have written). Returns the number of
/// holders, or what went wrong.
pub fn check_log(events: &[Event], final_record: (u64, u64)) -> Result<usize, String> {
    let mut intents: Vec<(u64, u32, u64, u64)> = Vec::new();
    let mut done = HashSet::new();
    for e in events {
        match e {
            Event::Violation(v) => return Err(format!("holder reported: {v}")),
            Event::Intent {
                lv,
                host,
                value,
                read_lv,
            } => intents.push((*lv, *host, *value, *read_lv)),
            Event::Done { lv } => {
                done.insert(*lv);
            }
        }
    }
    let mut by_lv: HashMap<u64, u32> = HashMap::new();
    for (lv, host, _, _) in &intents {
        if let Some(other) = by_lv.insert(*lv, *host) {
            return Err(format!(
                "lock version {lv} held by hosts {other} and {host}"
            ));
        }
    }
    intents.sort();
    // Possible (value, lv) states of the record before the next holder reads it.
    let mut possible: Vec<(u64, u64)> = vec![(0, 0)];
    for (lv, host, value, read_lv) in &intents {
        if !possible.contains(&(*value, *read_lv)) {
            return Err(format!(
                "host {host} under lock version {lv} read value {value} (written under {read_lv}), \
                 but the record could only be {possible:?}: an increment was lost or duplicated"
            ));
        }
        let written = (value + 1, *lv);
        possible = if done.contains(lv) {
            vec![written]
        } else {
            vec![(*value, *read_lv), written]
        };
    }
    if !possible.contains(&final_record) {
        return Err(format!(
            "final record {final_record:?}, expected one of {possible:?}"
        ));
    }
    Ok(intents.len())
}

#[repr(C, align(4096))]
struct Aligned([u8; 4096]);

/// The devcount binary next to the test executable.
pub fn devcount_bin() -> String {
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("devcount");
    assert!(
        bin.exists(),
        "{} is missing: build the tests crate's binaries",
        bin.display()
    );
    bin.display().to_string()
}

/// Reads a record of a device with direct I/O (no stale page cache).
pub fn read_record(dev: &Path, record: u64) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .expect("open device");
    let mut b = Box::new(Aligned([0; 4096]));
    f.read_exact_at(&mut b.0, record * 4096)
        .expect("read record");
    b.0.to_vec()
}

/// Reads the counter record (value, lock version) of a cluster.
pub fn read_counter(dev: &Path, record: u64) -> (u64, u64) {
    let b = read_record(dev, record);
    if &b[0..4] != b"DCNT" {
        return (0, 0);
    }
    (
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        u64::from_le_bytes(b[24..32].try_into().unwrap()),
    )
}
