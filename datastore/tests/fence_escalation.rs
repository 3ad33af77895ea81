//! The watchdog's last resort: when a fenced host's cgroup does not empty within the kill
//! grace (a process stuck in uninterruptible I/O), the watchdog escalates and reports the
//! host stuck. A real stuck process: a write to a frozen file system (loop device, ext4,
//! `fsfreeze`), which SIGKILL cannot end until the file system thaws. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use datastore::clock::boottime;
use datastore::fence::{self, Escalation, HostCgroup, Outcome};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A frozen ext4 on a loop device, and everything else the test made; undone on drop,
/// also when the test fails.
struct Frozen {
    dir: tempfile::TempDir,
    loopdev: String,
    mnt: PathBuf,
    cgroup: Option<HostCgroup>,
    child: Option<Child>,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mnt).status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.kill(Duration::from_secs(10));
            cg.remove();
        }
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
        let _ = &self.dir;
    }
}

fn frozen() -> Frozen {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let loopdev = run("losetup", &["-f", "--show", img.to_str().unwrap()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let f = Frozen {
        dir,
        loopdev,
        mnt,
        cgroup: None,
        child: None,
    };
    run("mkfs.ext4", &["-q", &f.loopdev]);
    run("mount", &[&f.loopdev, f.mnt.to_str().unwrap()]);
    run("fsfreeze", &["-f", f.mnt.to_str().unwrap()]);
    f
}

fn state(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("State:"))
        .unwrap_or("")
        .to_string()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cgroup_that_does_not_empty_is_escalated_and_reported_stuck() {
    let mut f = frozen();
    let cg = HostCgroup::create(&format!("escalation-test-{}", std::process::id())).unwrap();
    f.cgroup = Some(cg.clone());
    // A process of the "host" that blocks in the kernel: it joins the cgroup, then
    // writes to the frozen file system.
    let target = f.mnt.join("x");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "read _; exec dd if=/dev/zero of={} bs=4k count=1 2>/dev/null",
            target.display()
        ))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    cg.enter(pid).unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
    }
    f.child = Some(child);
    wait_for("the write to block in the kernel", || {
        state(pid).contains("D (disk sleep)")
    });
    // One pet, then silence: the deadline passes, the kill cannot empty the cgroup.
    let fence_after = Duration::from_millis(300);
    let kill_grace = Duration::from_millis(700);
    let pet = format!("pet {}\n", boottime().as_nanos());
    let started = boottime();
    let out = fence::supervise_with(
        std::io::Cursor::new(pet.into_bytes()),
        &cg,
        fence_after,
        true,
        kill_grace,
        Escalation::Log,
    )
    .unwrap();
    let Outcome::Stuck(at) = out else {
        panic!("expected the watchdog to report the host stuck, got {out:?}");
    };
    assert!(at >= started + fence_after + kill_grace, "{at:?}");
    assert!(cg.populated(), "the stuck process is still there");
    assert!(state(pid).contains("D (disk sleep)"), "{}", state(pid));
    // Once the I/O can finish, the kill takes effect and the cgroup empties.
    run("fsfreeze", &["-u", f.mnt.to_str().unwrap()]);
    wait_for("the cgroup to empty", || !cg.populated());
    let _ = Path::new(&target).exists();
}
