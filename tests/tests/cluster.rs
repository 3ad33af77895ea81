//! Cluster safety with separate processes: `ferry lock` hosts, each on its own loop device
//! over one datastore image (one with 4 KiB sectors), under kill -9, SIGSTOP of a whole
//! host cgroup, slow renewals, and a 60 s chaos run checked by the devcount log replay.
//! Test profile: io_timeout 1 s, renewals every 2 s, fencing at 8 s, host_dead 10 s.
//! These tests run one at a time (`SERIAL`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_tests::cluster::{
    check_log, ferry_bin, parse_log, populated, read_counter, read_record, Cluster, Event, SERIAL,
};
use ferry_tests::Rng;
use nix::sys::signal::Signal;

const HOST_DEAD: f64 = 10.0;
const IO_TIMEOUT: f64 = 1.0;
const HB_START: u64 = 16;

fn boottime() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).unwrap();
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `ferry datastore locks` shows `object` held by host `name`; returns its id.
fn wait_holder(c: &Cluster, object: &str, name: &str, timeout: f64) -> u32 {
    let start = Instant::now();
    loop {
        let out = ferry_tests::run(
            ferry_bin().to_str().unwrap(),
            &["datastore", "locks", "--json", c.dev(0).to_str().unwrap()],
        );
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            for l in v.as_array().unwrap() {
                if l["object"] == object {
                    for h in l["holders"].as_array().unwrap() {
                        if h["name"] == name {
                            return h["host_id"].as_u64().unwrap() as u32;
                        }
                    }
                }
            }
        }
        assert!(
            start.elapsed().as_secs_f64() < timeout,
            "{name} never held {object}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Watches a heartbeat slot from a thread; returns (stop flag, last-change time).
fn watch_slot(
    dev: &Path,
    host_id: u32,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<f64>>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(Mutex::new(boottime()));
    let (s, l, d) = (Arc::clone(&stop), Arc::clone(&last), dev.to_path_buf());
    let h = std::thread::spawn(move || {
        let mut prev = read_record(&d, HB_START + host_id as u64 - 1);
        while !s.load(Ordering::SeqCst) {
            let now = read_record(&d, HB_START + host_id as u64 - 1);
            if now != prev {
                *l.lock().unwrap() = boottime();
                prev = now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (stop, last, h)
}

fn uptime_in(path: &Path) -> f64 {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn fence_times(report: &Path) -> Vec<f64> {
    std::fs::read_to_string(report)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|ns| ns as f64 / 1e9)
        .collect()
}

#[test]
fn killed_holder_is_fenced_and_its_lock_breaks_after_host_dead() {
    let _g = serial();
    let mut c = Cluster::new(2);
    let report = c.file("fence-report");
    let a = c.lock(
        0,
        "obj",
        0.0,
        &["sleep", "1000"],
        &[("FERRY_FENCE_REPORT", report.to_str().unwrap())],
    );
    let id = wait_holder(&c, "obj", &c.host(0), 15.0);
    let (stop, last, watcher) = watch_slot(c.dev(0), id);
    let acquired = c.file("acquired");
    let cmd = format!("cat /proc/uptime > {}", acquired.display());
    let b = c.lock(1, "obj", 40.0, &["sh", "-c", &cmd], &[]);
    std::thread::sleep(Duration::from_secs(3));
    c.child(a).kill().unwrap();
    let (code, err) = c.wait(b);
    assert_eq!(code, Some(0), "second host: {err}");
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let got = uptime_in(&acquired);
    let last = *last.lock().unwrap();
    let after = got - last;
    assert!(
        after >= HOST_DEAD - 0.05,
        "lock broken {after:.2}s after the last renewal (< host_dead)"
    );
    assert!(
        after <= HOST_DEAD + 2.0 * IO_TIMEOUT + 0.05,
        "lock broken only {after:.2}s after the last renewal"
    );
    // The holder's command was killed by its supervisor before the lock changed hands.
    let fenced = fence_times(&report);
    assert_eq!(fenced.len(), 1, "fence report: {fenced:?}");
    assert!(
        fenced[0] < got,
        "fenced at {} but the lock was taken at {got}",
        fenced[0]
    );
    assert!(
        c.cgroups(0).iter().all(|cg| !populated(cg)),
        "the killed host's cgroup still has processes"
    );
}

/// How host 0 is stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every process in its host cgroup (a frozen machine).
    Cgroup,
    /// The whole process group of `ferry lock`, as Ctrl-Z in a shell does (the watchdog
    /// is not in it: it has a session of its own).
    ProcessGroup,
}

/// Host 0 holds the counter lock with devcount paused between its read and its write; it
/// is stopped past host_dead; host 1 takes the lock and increments; host 0 is continued.
/// Returns the checker's verdict.
fn stopped_holder(fencing: bool) -> (Result<usize, String>, Cluster, Vec<f64>, Vec<Event>) {
    stopped_holder_by(fencing, Stop::Cgroup)
}

fn stopped_holder_by(
    fencing: bool,
    how: Stop,
) -> (Result<usize, String>, Cluster, Vec<f64>, Vec<Event>) {
    let mut c = Cluster::new(2);
    let log = c.file("devcount.log");
    let report = c.file("fence-report");
    let mut env = vec![("FERRY_FENCE_REPORT", report.to_str().unwrap().to_string())];
    if !fencing {
        env.push(("FERRY_FAILPOINTS", "unsafe-no-fence".into()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cmd0 = c.devcount(0, &log, 16_000, 0);
    let cmd0: Vec<&str> = cmd0.iter().map(String::as_str).collect();
    let a = match how {
        Stop::Cgroup => c.lock(0, "counter", 0.0, &cmd0, &env),
        Stop::ProcessGroup => c.lock_job(0, "counter", 0.0, &cmd0, &env),
    };
    let start = Instant::now();
    while !parse_log(&log)
        .iter()
        .any(|e| matches!(e, Event::Intent { .. }))
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "host 0 never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = nix::unistd::Pid::from_raw(c.child(a).id() as i32);
    match how {
        Stop::Cgroup => c.signal_host(0, Signal::SIGSTOP),
        Stop::ProcessGroup => nix::sys::signal::killpg(group, Signal::SIGSTOP).unwrap(),
    }
    let cmd1 = c.devcount(1, &log, 0, 0);
    let cmd1: Vec<&str> = cmd1.iter().map(String::as_str).collect();
    let b = c.lock(1, "counter", 40.0, &cmd1, &[]);
    let (code, err) = c.wait(b);
    assert_eq!(code, Some(0), "host 1: {err}");
    match how {
        Stop::Cgroup => c.signal_host(0, Signal::SIGCONT),
        Stop::ProcessGroup => {
            let _ = nix::sys::signal::killpg(group, Signal::SIGCONT);
        }
    }
    let _ = c.wait(a);
    // Let a continued, unfenced devcount finish its (late) write.
    std::thread::sleep(Duration::from_secs(3));
    let events = parse_log(&log);
    let verdict = check_log(&events, read_counter(c.dev(0), c.data_record));
    let fenced = fence_times(&report);
    (verdict, c, fenced, events)
}

#[test]
fn stopped_host_is_fenced_before_its_lock_is_taken() {
    let _g = serial();
    let (verdict, c, fenced, events) = stopped_holder(true);
    verdict.unwrap_or_else(|e| panic!("checker: {e}"));
    assert_eq!(fenced.len(), 1, "host 0 was not fenced");
    // Fenced (cgroup empty) before host 1 even read the counter.
    let log = std::fs::read_to_string(c.file("devcount.log")).unwrap();
    let second_intent_t: f64 = log
        .lines()
        .filter(|l| l.starts_with("intent"))
        .nth(1)
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("t=")))
        .map(|t| t.parse::<u64>().unwrap() as f64 / 1e9)
        .unwrap_or_else(|| panic!("no second holder in the log:\n{log}"));
    assert!(
        fenced[0] < second_intent_t,
        "fenced at {} after the new owner started at {second_intent_t}",
        fenced[0]
    );
    // Nothing the stopped host had started wrote afterwards: its devcount never finished.
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Done { .. }))
            .count(),
        1,
        "{events:?}"
    );
}

/// Ctrl-Z in a shell stops `ferry lock`'s whole process group; the watchdog, in a session
/// of its own, still fences the host before anyone else takes the lock. (It used to be in
/// that group: stopped with the holder, it never fenced, and two holders overlapped.)
#[test]
fn a_stopped_process_group_is_still_fenced_by_its_watchdog() {
    let _g = serial();
    let (verdict, c, fenced, _) = stopped_holder_by(true, Stop::ProcessGroup);
    verdict.unwrap_or_else(|e| panic!("checker: {e}"));
    assert_eq!(fenced.len(), 1, "the stopped host was never fenced");
    assert_fenced_before_the_next_holder(&c, fenced[0]);
}

/// The fence (cgroup empty) came before the second holder even read the counter.
fn assert_fenced_before_the_next_holder(c: &Cluster, fenced: f64) {
    let log = std::fs::read_to_string(c.file("devcount.log")).unwrap();
    let second_intent_t: f64 = log
        .lines()
        .filter(|l| l.starts_with("intent"))
        .nth(1)
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("t=")))
        .map(|t| t.parse::<u64>().unwrap() as f64 / 1e9)
        .unwrap_or_else(|| panic!("no second holder in the log:\n{log}"));
    assert!(
        fenced < second_intent_t,
        "fenced at {fenced} after the new owner started at {second_intent_t}"
    );
}

/// The watchdog outlives its holder in every state: stopped while the holder is killed
/// (its process group is then orphaned with a stopped member, and the kernel sends the
/// group SIGHUP), continued, it still fences the host at its deadline.
#[test]
fn a_stopped_watchdog_fences_after_its_holder_dies() {
    let _g = serial();
    let mut c = Cluster::new(1);
    let report = c.file("fence-report");
    let env = [("FERRY_FENCE_REPORT", report.to_str().unwrap())];
    // A command that ignores SIGHUP, as a VM would keep running.
    let a = c.lock_job(0, "vm", 0.0, &["sh", "-c", "trap '' HUP; sleep 120"], &env);
    let start = Instant::now();
    let cg = loop {
        let cgs = c.cgroups(0);
        if let Some(cg) = cgs
            .iter()
            .find(|cg| ferry_tests::cluster::pids(cg).len() >= 2)
        {
            break cg.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the holder never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let dog = c.watchdog_of(a).expect("the lock process's watchdog");
    let dog_pid = nix::unistd::Pid::from_raw(dog as i32);
    nix::sys::signal::kill(dog_pid, Signal::SIGSTOP).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child(a).id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    // (Not `c.wait`: the stopped watchdog still holds the lock process's stderr open.)
    let _ = c.child(a).wait();
    std::thread::sleep(Duration::from_millis(500));
    // What the kernel sends a process group orphaned with a stopped member (here sent by
    // hand: where a subreaper adopts the orphans, the group is not orphaned).
    nix::sys::signal::kill(dog_pid, Signal::SIGHUP).unwrap();
    nix::sys::signal::kill(dog_pid, Signal::SIGCONT).unwrap();
    // Fenced at the deadline (8 s after the last renewal), not merely signalled.
    let until = Instant::now() + Duration::from_secs(15);
    while populated(&cg) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !populated(&cg),
        "the host's processes outlived its lease: nothing fenced them"
    );
    // The watchdog reports once it has seen the cgroup empty, a moment after we do.
    let until = Instant::now() + Duration::from_secs(5);
    while fence_times(&report).is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fence_times(&report).len(),
        1,
        "the watchdog did not report a fence"
    );
}

#[test]
fn negative_control_without_fencing_the_checker_fails() {
    let _g = serial();
    let (verdict, _c, fenced, _) = stopped_holder(false);
    assert!(fenced.is_empty());
    let err = verdict.expect_err("without fencing the late write must be caught");
    assert!(
        err.contains("lost or duplicated")
            || err.contains("final record")
            || err.contains("reported"),
        "{err}"
    );
}

/// Renewals that take most of io_timeout still count (a renewal counts only if its write
/// completed within io_timeout of its issue: a later one might land after peers saw the
/// slot unchanged for host_dead).
#[test]
fn slow_renewals_within_io_timeout_keep_the_lease() {
    let _g = serial();
    let mut c = Cluster::new(2);
    let a = c.lock(
        0,
        "obj",
        0.0,
        &["sleep", "14"],
        &[("FERRY_FAILPOINTS", "renew-delay-ms=700")],
    );
    wait_holder(&c, "obj", &c.host(0), 15.0);
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        let b = c.lock(1, "obj", 0.0, &["true"], &[]);
        let (code, err) = c.wait(b);
        assert_ne!(code, Some(0), "host 1 took a lock that host 0 still held");
        assert!(err.contains("held"), "{err}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (code, err) = c.wait(a);
    assert_eq!(code, Some(0), "host 0 lost its lock: {err}");
}

#[test]
fn renewals_slower_than_8x_io_timeout_fence_the_host_before_anyone_breaks_its_lock() {
    let _g = serial();
    let mut c = Cluster::new(2);
    let a = c.lock(
        0,
        "obj",
        0.0,
        &["sleep", "60"],
        &[("FERRY_FAILPOINTS", "renew-delay-ms=9000")],
    );
    wait_holder(&c, "obj", &c.host(0), 15.0);
    let acquired = c.file("acquired");
    let cmd = format!("cat /proc/uptime > {}", acquired.display());
    let b = c.lock(1, "obj", 40.0, &["sh", "-c", &cmd], &[]);
    // Host 0 must give up by itself (or be fenced by its supervisor).
    let start = Instant::now();
    let a_exit = loop {
        if c.child(a).try_wait().unwrap().is_some() {
            break boottime();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "host 0 kept running with a stale lease"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (code, err) = c.wait(b);
    assert_eq!(code, Some(0), "host 1: {err}");
    assert!(
        a_exit < uptime_in(&acquired),
        "host 0 was still running when host 1 took the lock"
    );
    assert!(c.cgroups(0).iter().all(|cg| !populated(cg)));
}

#[test]
fn chaos_four_hosts_one_lock_no_lost_or_duplicated_increment() {
    let _g = serial();
    // 60 s in CI; FERRY_SOAK=1 makes it a 15-minute soak; FERRY_CHAOS_SECS sets it exactly.
    let soak = std::env::var("FERRY_SOAK").is_ok_and(|v| v == "1");
    let secs: u64 = std::env::var("FERRY_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if soak { 900 } else { 60 });
    let seed = std::env::var("FERRY_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| boottime().to_bits() | 1);
    eprintln!("chaos: {secs}s, FERRY_CHAOS_SEED={seed}");
    let c = Cluster::new(4);
    let log = c.file("devcount.log");
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Vec<Option<u32>>>> = Arc::new(Mutex::new(vec![None; 4]));
    let mut threads = Vec::new();
    for i in 0..4 {
        let (stop, current) = (Arc::clone(&stop), Arc::clone(&current));
        let dev = c.dev(i).to_path_buf();
        let host = c.host(i);
        let devcount = c.devcount(i, &log, 0, 0);
        let mut rng = Rng(seed.wrapping_add(i as u64 * 7919) | 1);
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let mut cmd = std::process::Command::new(ferry_bin());
                cmd.args(["lock", "--datastore"])
                    .arg(&dev)
                    .args(["--host", &host, "--object", "counter", "--wait", "20", "--"]);
                cmd.args(&devcount[..4])
                    .arg(rng.next(150).to_string())
                    .arg(rng.next(300).to_string());
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                let mut child = cmd.spawn().expect("spawn ferry lock");
                current.lock().unwrap()[i] = Some(child.id());
                let _ = child.wait();
                current.lock().unwrap()[i] = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    let mut rng = Rng(seed);
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut short_stops, mut long_stops) = (0, 0, 0);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(2000 + rng.next(3000)));
        let i = rng.next(4) as usize;
        match rng.next(3) {
            0 => {
                if let Some(pid) = current.lock().unwrap()[i] {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        Signal::SIGKILL,
                    );
                    eprintln!("chaos t={:.3}: kill -9 host {i} (pid {pid})", boottime());
                    kills += 1;
                }
            }
            k => {
                let long = k == 2;
                eprintln!("chaos t={:.3}: SIGSTOP host {i} (long: {long})", boottime());
                c.signal_host(i, Signal::SIGSTOP);
                std::thread::sleep(Duration::from_millis(if long { 11_000 } else { 3_000 }));
                c.signal_host(i, Signal::SIGCONT);
                eprintln!("chaos t={:.3}: SIGCONT host {i}", boottime());
                if long {
                    long_stops += 1;
                } else {
                    short_stops += 1;
                }
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    for i in 0..4 {
        c.signal_host(i, Signal::SIGCONT);
    }
    for t in threads {
        t.join().unwrap();
    }
    // Every host has exited; wait for supervisors to finish fencing any killed holder.
    let start = Instant::now();
    while (0..4).any(|i| c.cgroups(i).iter().any(|cg| populated(cg)))
        && start.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = parse_log(&log);
    let holders = check_log(&events, read_counter(c.dev(0), c.data_record)).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let keep = std::env::temp_dir().join(format!("ferry-chaos-{seed}.log"));
        let _ = std::fs::write(&keep, &log);
        panic!(
            "seed {seed}: {e}\n(devcount log kept at {})",
            keep.display()
        )
    });
    eprintln!("chaos: {holders} lock holders, {kills} kill -9, {short_stops} short and {long_stops} long SIGSTOPs");
    assert!(
        holders >= 10,
        "too little progress to mean anything: {holders} holders"
    );
}

#[test]
fn checker_catches_a_duplicated_increment() {
    // The replay itself must be able to fail: two holders that read the same value.
    let events = vec![
        Event::Intent {
            lv: 2,
            host: 1,
            value: 0,
            read_lv: 0,
        },
        Event::Done { lv: 2 },
        Event::Intent {
            lv: 4,
            host: 2,
            value: 0,
            read_lv: 0,
        },
        Event::Done { lv: 4 },
    ];
    assert!(check_log(&events, (1, 4)).is_err());
    let ok = vec![
        Event::Intent {
            lv: 2,
            host: 1,
            value: 0,
            read_lv: 0,
        },
        Event::Intent {
            lv: 4,
            host: 2,
            value: 1,
            read_lv: 2,
        },
        Event::Done { lv: 4 },
    ];
    assert_eq!(check_log(&ok, (2, 4)), Ok(2));
}
