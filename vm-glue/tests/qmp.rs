//! The QMP client against a real `qemu-system-x86_64` (TCG, paused, no disks): greeting
//! and capabilities, commands matched by id (several in flight), errors QEMU returns,
//! events (STOP, RESUME, SHUTDOWN), a timeout while QEMU is stopped, and clear errors
//! once QEMU is gone — for commands waiting at that moment and for later ones.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vm_glue::qmp::{Qmp, QmpError};

struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(sock: &Path) -> Qemu {
    let c = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc-q35-7.2,accel=tcg",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/setup.sh installs it)");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Qemu(c)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn commands_events_and_errors_against_a_real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let q = qemu(&sock);
    rt().block_on(async {
        let qmp = Qmp::connect(&sock, Duration::from_secs(10)).await.unwrap();
        assert_eq!(qmp.version().0, 7);
        let v = qmp.execute("query-version", None).await.unwrap();
        assert_eq!(v["qemu"]["major"], 7);
        let st = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(st["status"], "prelaunch");
        assert_eq!(st["running"], false);
        // Several commands in flight at once, each gets its own reply.
        let (a, b, c) = tokio::join!(
            qmp.execute("query-name", None),
            qmp.execute("query-kvm", None),
            qmp.execute("query-machines", None),
        );
        assert!(a.unwrap().is_object());
        assert_eq!(b.unwrap()["enabled"], false);
        assert!(c
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "pc-q35-7.2"));
        // QEMU's own errors come back named.
        match qmp.execute("no-such-command", None).await {
            Err(QmpError::Command { class, command, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(command, "no-such-command");
            }
            other => panic!("{other:?}"),
        }
        match qmp
            .execute(
                "migrate-set-parameters",
                Some(serde_json::json!({"downtime-limit": "x"})),
            )
            .await
        {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
            other => panic!("{other:?}"),
        }
        // Events: RESUME on cont, STOP on stop.
        let mut ev = qmp.events();
        qmp.execute("cont", None).await.unwrap();
        let e = qmp
            .wait_event(&mut ev, "RESUME", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(e.timestamp_us > 0);
        qmp.execute("stop", None).await.unwrap();
        qmp.wait_event(&mut ev, "STOP", Duration::from_secs(10))
            .await
            .unwrap();
        // A stopped QEMU process: the command times out instead of hanging.
        let pid = nix::unistd::Pid::from_raw(q.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let r = qmp
            .execute_within("query-status", None, Duration::from_millis(500))
            .await;
        assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        qmp.execute("query-status", None).await.unwrap();
        // quit: SHUTDOWN, then the connection closes and later commands say so.
        let mut ev = qmp.events();
        let _ = qmp.execute("quit", None).await;
        qmp.wait_event(&mut ev, "SHUTDOWN", Duration::from_secs(10))
            .await
            .unwrap();
        for _ in 0..100 {
            if qmp.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match qmp.execute("query-status", None).await {
            Err(e @ QmpError::Closed { .. }) => assert!(e.to_string().contains("did QEMU exit")),
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_command_waiting_when_qemu_is_killed_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut q = qemu(&sock);
    rt().block_on(async {
        let qmp = Qmp::connect(&sock, Duration::from_secs(30)).await.unwrap();
        let pid = nix::unistd::Pid::from_raw(q.0.id() as i32);
        // Stopped, QEMU cannot answer; killed, its socket closes under the waiter.
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let waiting = qmp.execute("query-status", None);
        let killer = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        };
        let t0 = std::time::Instant::now();
        let (r, ()) = tokio::join!(waiting, killer);
        assert!(matches!(r, Err(QmpError::Closed { .. })), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    });
    let _ = q.0.wait();
    // Nobody listens any more: connecting fails with a clear error.
    let r = rt().block_on(Qmp::connect(&sock, Duration::from_secs(2)));
    assert!(matches!(r, Err(QmpError::Connect { .. })), "{r:?}");
}
