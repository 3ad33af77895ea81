//! Agent test bed: one or more datastore images, one loop device per image and host,
//! and one `ferry agent` process per host (each with its own run directory and TCP ports), and a control-API client.
//!
//! `Drop` ends everything a test started, also after a failure: agent processes, their
//! watchdogs (found by run directory), the host cgroups (emptied, removed), loop devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use datastore::fence::HostCgroup;
use serde_json::Value;

use crate::cluster::{ferry_bin, ferry_bin_for};
use crate::{run_ok, LoopDev};

/// The cluster secret every test agent shares.
pub const SECRET: &str = "test-cluster-secret-0123456789";

/// A TCP port free now, below the kernel's ephemeral range (so no outgoing connection
/// takes it before the agent binds it) and not handed out before by this process.
fn free_port() -> u16 {
    static NEXT: std::sync::Mutex<u16> = std::sync::Mutex::new(0);
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    if *next == 0 {
        *next = 20_000 + (std::process::id() % 400) as u16 * 30;
    }
    loop {
        let p = *next;
        *next = if p >= 32_000 { 20_000 } else { p + 1 };
        if std::net::TcpListener::bind(("0.0.0.0", p)).is_ok() {
            return p;
        }
    }
}

/// One host's agent.
#[derive(Debug)]
pub struct AgentHost {
    pub name: String,
    pub run_dir: PathBuf,
    pub config: PathBuf,
    pub mgmt: String,
    pub nbd: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl AgentHost {
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir.join("nbd.sock")
    }

    pub fn cgroup(&self) -> PathBuf {
        let h = blake3::hash(self.run_dir.as_os_str().as_encoded_bytes());
        datastore::fence::cgroup2_root()
            .expect("cgroup2")
            .join("ferry")
            .join(format!("agent-{}-{}", self.name, &h.to_hex()[..8]))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Several hosts over one datastore image.
#[derive(Debug)]
pub struct AgentBed {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    /// Every datastore image (the first is `image`), labelled as given.
    pub images: Vec<PathBuf>,
    /// Environment for the next start of each agent (e.g. failpoints).
    pub env: Vec<Vec<(String, String)>>,
    /// With [`AgentBed::networked`]: the network of hosts in namespaces.
    pub net: Option<Net>,
    pub devices: Vec<LoopDev>,
    pub hosts: Vec<AgentHost>,
}

/// Runs `f` on a small runtime (test code is synchronous).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Where scripts/build-guest.sh puts the test guest (its default), without building it.
pub fn guest_dir_path() -> PathBuf {
    std::env::var_os("FERRY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ferry/guest"))
}

/// Builds (or finds, cached) the test guest with scripts/build-guest.sh; returns the
/// directory holding `vmlinuz` and `initramfs.img`.
pub fn guest_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/build-guest.sh"))
        .current_dir(&root)
        .output()
        .expect("scripts/build-guest.sh");
    assert!(
        out.status.success(),
        "build-guest.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .expect("build-guest.sh prints the guest directory"),
    )
}

/// Reads `n` 512-byte sectors from `first` of an export on an agent's NBD socket.
pub fn read_export(sock: &Path, export: &str, first: u64, n: u64) -> std::io::Result<Vec<u8>> {
    use diskfmt::BlockDev;
    block_on(async {
        let c = nbd::NbdClient::connect_unix(sock, export).await?;
        let mut b = vec![0u8; n as usize * 512];
        c.read(first * 512, &mut b)
            .await
            .map_err(std::io::Error::other)?;
        Ok(b)
    })
}

/// One control-API call over a unix socket: (status, body).
pub fn call_unix(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    block_on(async {
        let s = tokio::net::UnixStream::connect(sock)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
        let r = agent::http::call(s, method, path, &[], body.as_ref())
            .await
            .expect("control call");
        (r.status, r.body)
    })
}

/// One control-API call over TCP with an optional bearer token.
pub fn call_tcp(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = agent::http::call(s, method, path, &headers, body.as_ref())
            .await
            .expect("control call");
        (r.status, r.body)
    })
}

impl AgentBed {
    /// Formats a 256 MiB test-profile datastore `ds0` and prepares `n` hosts (not started).
    pub fn new(n: usize) -> AgentBed {
        AgentBed::with_datastores(n, &["ds0"], 256)
    }

    /// Formats one test-profile datastore of `mib` MiB per label, each seen by every
    /// host through a loop device of its own, and prepares `n` hosts (not started).
    pub fn with_datastores(n: usize, labels: &[&str], mib: u64) -> AgentBed {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut images = Vec::new();
        for l in labels {
            let image = dir.path().join(format!("{l}.img"));
            run_ok(
                ferry_bin().to_str().unwrap(),
                &[
                    "datastore",
                    "create",
                    image.to_str().unwrap(),
                    "--label",
                    l,
                    "--size",
                    &format!("{mib}M"),
                    "--profile",
                    "test",
                    "--max-hosts",
                    "8",
                ],
            );
            images.push(image);
        }
        let image = images[0].clone();
        // Host i's device of image k is devices[i * images + k].
        let devices: Vec<LoopDev> = (0..n)
            .flat_map(|_| images.iter().map(|im| LoopDev::attach(im, None)))
            .collect();
        let tag = format!(
            "a{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let hosts = (0..n)
            .map(|i| {
                let name = format!("{tag}h{i}");
                let run_dir = dir.path().join(format!("run{i}"));
                let config = dir.path().join(format!("agent{i}.toml"));
                let mgmt = format!("127.0.0.1:{}", free_port());
                let nbd = format!("127.0.0.1:{}", free_port());
                let mut text = format!(
                    "host = \"{name}\"\nrun_dir = \"{}\"\nmanagement_listen = \"{mgmt}\"\n\
                     nbd_listen = \"{nbd}\"\nsecret = \"{SECRET}\"\nprofile = \"test\"\n\
                     boot_dirs = [\"{}\"]\nstate_dir = \"{}\"\n",
                    run_dir.display(),
                    guest_dir_path().display(),
                    dir.path().join(format!("state{i}")).display(),
                );
                for k in 0..images.len() {
                    text += &format!(
                        "[[datastore]]\ndevice = \"{}\"\n",
                        devices[i * images.len() + k].path().display()
                    );
                }
                std::fs::write(&config, text).expect("config");
                AgentHost {
                    log: dir.path().join(format!("agent{i}.log")),
                    name,
                    run_dir,
                    config,
                    mgmt,
                    nbd,
                    child: None,
                }
            })
            .collect();
        AgentBed {
            dir,
            image,
            images,
            env: vec![Vec::new(); n],
            net: None,
            devices,
            hosts,
        }
    }

    /// Like [`AgentBed::with_datastores`], but each host is a network namespace of its
    /// own: a bridge `br0` inside it holds the host's address (10.99.S.i+1/24) and one end
    /// of a veth pair whose other end is on a bridge in the root namespace linking all
    /// hosts. Agents (and so QEMU) run inside their host's namespace and listen on its
    /// address; VMs' taps go on the host's `br0`.
    pub fn networked(n: usize, labels: &[&str], mib: u64) -> AgentBed {
        let mut bed = AgentBed::with_datastores(n, labels, mib);
        let id = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let short = format!("{}{}", std::process::id() % 10_000, id % 10);
        let subnet = (std::process::id() as usize * 7 + id as usize) % 200 + 20;
        let net = Net {
            bridge: format!("fyb{short}"),
            ns: (0..n).map(|i| format!("fy{short}h{i}")).collect(),
            veth: (0..n).map(|i| format!("fy{short}v{i}")).collect(),
            addr: (0..n)
                .map(|i| format!("10.99.{subnet}.{}", i + 1))
                .collect(),
            client_ns: format!("fy{short}c"),
            client_addr: format!("10.99.{subnet}.100"),
            prefix: format!("10.99.{subnet}"),
        };
        net.create();
        for (i, h) in bed.hosts.iter_mut().enumerate() {
            h.mgmt = format!("{}:7000", net.addr[i]);
            h.nbd = format!("{}:7001", net.addr[i]);
            let text = std::fs::read_to_string(&h.config).expect("config");
            let text: String = text
                .lines()
                .map(|l| {
                    if l.starts_with("management_listen") {
                        format!("management_listen = \"{}\"", h.mgmt)
                    } else if l.starts_with("nbd_listen") {
                        format!("nbd_listen = \"{}\"", h.nbd)
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&h.config, text + "\n").expect("config");
        }
        bed.net = Some(net);
        bed
    }

    /// Makes datastore `label` invisible to host `i` (before its agent starts): the
    /// host's config no longer names its device, as for a LUN not presented to it.
    pub fn hide(&self, i: usize, label: &str) {
        let k = self
            .images
            .iter()
            .position(|p| p.file_stem().is_some_and(|s| s == label))
            .unwrap_or_else(|| panic!("no datastore {label} in the bed"));
        let dev = self.devices[i * self.images.len() + k]
            .path()
            .display()
            .to_string();
        let text = std::fs::read_to_string(&self.hosts[i].config).expect("config");
        let entry = format!("[[datastore]]\ndevice = \"{dev}\"\n");
        assert!(text.contains(&entry), "host {i} does not see {label}");
        std::fs::write(&self.hosts[i].config, text.replace(&entry, "")).expect("config");
    }

    /// Cuts (false) or restores (true) host `i`'s link to the others.
    pub fn link(&self, i: usize, up: bool) {
        let net = self.net.as_ref().expect("a networked bed");
        run_ok(
            "ip",
            &["link", "set", &net.veth[i], if up { "up" } else { "down" }],
        );
    }

    /// Starts host `i`'s agent and waits until its control API answers.
    pub fn start(&mut self, i: usize) {
        let env = self.env[i].clone();
        let h = &self.hosts[i];
        assert!(h.child.is_none(), "agent {i} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .expect("log");
        // Stands in for systemd: the agent must say READY=1 once it serves.
        let notify_path = h.run_dir.with_extension("notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let ns = self.net.as_ref().map(|n| n.ns[i].clone());
        let h = &mut self.hosts[i];
        let mut cmd = match &ns {
            // Only the network namespace changes (`ip netns exec` would also remount
            // /sys, hiding the cgroup2 mount fencing needs).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(ferry_bin_for(&env));
                c
            }
            None => Command::new(ferry_bin_for(&env)),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(&h.config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("FERRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start ferry agent");
        h.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = h.child.as_mut().unwrap().try_wait().expect("wait") {
                panic!(
                    "agent {} exited ({st}) while starting:\n{}",
                    h.name,
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(h.control_socket()).is_ok() {
                let (s, _) = call_unix(&h.control_socket(), "GET", "/v1/host", None);
                if s == 200 {
                    let mut b = [0u8; 256];
                    let n = notify
                        .recv(&mut b)
                        .expect("the agent sent no sd_notify message");
                    let msg = String::from_utf8_lossy(&b[..n]);
                    assert!(msg.contains("READY=1"), "sd_notify: {msg:?}");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not come up:\n{}",
                h.name,
                std::fs::read_to_string(&h.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts an agent that must fail; returns its output.
    pub fn start_failing(&self, config: &Path) -> String {
        let out = Command::new(ferry_bin())
            .arg("agent")
            .arg("--config")
            .arg(config)
            .env("NO_COLOR", "1")
            .output()
            .expect("run ferry agent");
        assert!(!out.status.success(), "the agent was expected to fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Kills host `i`'s agent with `sig` and reaps it.
    pub fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut c = self.hosts[i].child.take().expect("agent runs");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        c.wait().expect("wait agent")
    }

    /// Waits for host `i`'s agent to exit by itself.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> std::process::ExitStatus {
        let c = self.hosts[i].child.as_mut().expect("agent runs");
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                self.hosts[i].child = None;
                return st;
            }
            assert!(Instant::now() < deadline, "agent {i} did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A control call to host `i` over its unix socket.
    pub fn call(&self, i: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call_unix(&self.hosts[i].control_socket(), method, path, body)
    }

    /// A control call that must succeed.
    pub fn call_ok(&self, i: usize, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(i, method, path, body);
        assert!(s < 300, "{method} {path} on host {i}: {s} {v}");
        v
    }

    /// Waits until host `i` sees host `j` in `state` (live/dead).
    pub fn wait_host_state(&self, i: usize, j: usize, state: &str, within: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let v = self.call_ok(i, "GET", "/v1/hosts", None);
            let now = v
                .as_array()
                .into_iter()
                .flatten()
                .find(|h| h["name"] == self.hosts[j].name.as_str())
                .map(|h| h["state"].as_str().unwrap_or("").to_string());
            if now.as_deref() == Some(state) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "host {i} never saw host {j} {state} (last: {now:?})"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The log of host `i`'s agent so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.hosts[i].log).unwrap_or_default()
    }
}

/// Hosts as network namespaces on one bridge (see [`AgentBed::networked`]).
#[derive(Debug)]
pub struct Net {
    pub bridge: String,
    pub ns: Vec<String>,
    /// The root-namespace end of each host's veth pair (down = link cut).
    pub veth: Vec<String>,
    pub addr: Vec<String>,
    /// A namespace on the same bridge that is no host: an outside client (address .100).
    pub client_ns: String,
    pub client_addr: String,
    /// The subnet's first three octets ("10.99.S").
    pub prefix: String,
}

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it makes stay
/// in that namespace, whichever thread uses them later).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns only changes this thread's network namespace; fd is a valid,
        // open namespace file for the duration of the call.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

impl Net {
    fn create(&self) {
        let ip = |args: &[&str]| {
            run_ok("ip", args);
        };
        ip(&["link", "add", &self.bridge, "type", "bridge"]);
        ip(&["link", "set", &self.bridge, "up"]);
        for i in 0..self.ns.len() {
            let (ns, v) = (&self.ns[i], &self.veth[i]);
            let peer = format!("{v}p");
            ip(&["netns", "add", ns]);
            ip(&["link", "add", v, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", ns]);
            ip(&["link", "set", v, "master", &self.bridge, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", ns, "link", "set", &peer, "master", "br0", "up"]);
            ip(&["-n", ns, "link", "set", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", self.addr[i]),
                "dev",
                "br0",
            ]);
        }
        let (c, cv) = (&self.client_ns, format!("{}c", self.bridge));
        let cp = format!("{cv}p");
        ip(&["netns", "add", c]);
        ip(&["link", "add", &cv, "type", "veth", "peer", "name", &cp]);
        ip(&["link", "set", &cp, "netns", c]);
        ip(&["link", "set", &cv, "master", &self.bridge, "up"]);
        ip(&["-n", c, "link", "set", "lo", "up"]);
        ip(&["-n", c, "link", "set", &cp, "up"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{}/24", self.client_addr),
            "dev",
            &cp,
        ]);
    }

    fn destroy(&self) {
        for (ns, v) in self.ns.iter().zip(&self.veth) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = Command::new("ip").args(["link", "del", v]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.client_ns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}c", self.bridge)])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `ferry supervise` processes reading a FIFO under `dir`.
fn watchdogs(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let needle = dir.to_string_lossy().into_owned();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(" supervise ") && cmd.contains(&needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Every process in cgroup `dir` and the cgroups below it.
fn cgroup_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

impl AgentBed {
    /// Every process of host `i`: its agent, everything in its cgroup (its VMs' QEMU),
    /// and its watchdogs — a whole host, for freezing it.
    pub fn host_processes(&self, i: usize) -> Vec<i32> {
        let h = &self.hosts[i];
        let mut out = Vec::new();
        cgroup_pids(&h.cgroup(), &mut out);
        out.extend(h.pid().map(|p| p as i32));
        out.extend(watchdogs(&h.run_dir));
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Whether any watchdog of this bed still runs.
pub fn watchdog_count(dir: &Path) -> usize {
    watchdogs(dir).len()
}

impl Drop for AgentBed {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for h in &mut self.hosts {
            if let Some(mut c) = h.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for pid in watchdogs(self.dir.path()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Every host cgroup of this bed (also those of refused duplicate agents).
        let root = datastore::fence::cgroup2_root()
            .expect("cgroup2")
            .join("ferry");
        let tag = self
            .hosts
            .first()
            .map(|h| h.name.trim_end_matches(char::is_numeric).to_string());
        if let (Ok(rd), Some(tag)) = (std::fs::read_dir(&root), tag) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("agent-{tag}"))
                {
                    let cg = HostCgroup::at(e.path());
                    let _ = cg.kill(Duration::from_secs(2));
                    cg.remove();
                }
            }
        }
        if let Some(net) = &self.net {
            net.destroy();
        }
    }
}
