//! `ferry datastore create|info|locks` and `ferry lock` from the command line.

use std::path::Path;
use std::process::Command;

use ferry_tests::LoopDev;

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn create_refuses_devices_that_hold_something_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lun.img");
    let o = ferry(&[
        "datastore",
        "create",
        s(&img),
        "--label",
        "a",
        "--size",
        "64M",
        "--profile",
        "test",
        "--max-hosts",
        "8",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    // Again: it holds a datastore now.
    let o = ferry(&["datastore", "create", s(&img), "--label", "b"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("already holds ferry datastore \"a\""),
        "{}",
        err(&o)
    );
    // A file system, through a loop device.
    let fs = dir.path().join("fs.img");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    ferry_tests::run_ok("mkfs.ext4", &["-q", "-F", s(&fs)]);
    let dev = LoopDev::attach(&fs, None);
    let o = ferry(&["datastore", "create", s(dev.path()), "--label", "c"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("ext2/3/4 file system") && err(&o).contains("--force"),
        "{}",
        err(&o)
    );
    let o = ferry(&["datastore", "info", s(dev.path())]);
    assert!(
        err(&o).contains("not a ferry datastore") && err(&o).contains("ext2/3/4"),
        "{}",
        err(&o)
    );
    let o = ferry(&[
        "datastore",
        "create",
        s(dev.path()),
        "--label",
        "c",
        "--force",
        "--profile",
        "test",
        "--max-hosts",
        "8",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    // A blank device is not a datastore either, and says so.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = ferry(&["datastore", "info", s(&blank)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("not a ferry datastore"), "{}", err(&o));
    let o = ferry(&[
        "datastore",
        "create",
        s(&dir.path().join("tiny.img")),
        "--label",
        "t",
        "--size",
        "1M",
    ]);
    assert!(err(&o).contains("too small"), "{}", err(&o));
}

#[test]
fn info_shows_live_hosts_and_lock_runs_a_command_under_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lun.img");
    let o = ferry(&[
        "datastore",
        "create",
        s(&img),
        "--label",
        "lab",
        "--size",
        "64M",
        "--profile",
        "test",
        "--max-hosts",
        "4",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let a = LoopDev::attach(&img, None);
    let b = LoopDev::attach(&img, Some(4096));
    let mut holder = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "lock",
            "--datastore",
            s(a.path()),
            "--host",
            "alpha",
            "--object",
            "vm/one",
            "--address",
            "10.1.1.1:7000",
            "--",
            "sleep",
            "8",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Through the other path (4 KiB sectors) the same datastore is seen.
    let o = ferry(&[
        "datastore",
        "info",
        "--json",
        "--observe",
        "2.5",
        s(b.path()),
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["label"], "lab");
    assert_eq!(v["logical_sector"], 4096);
    let h = &v["hosts"][0];
    assert_eq!(h["name"], "alpha");
    assert_eq!(h["state"], "live");
    assert_eq!(h["address"], "10.1.1.1:7000");
    let o = ferry(&["datastore", "locks", "--json", s(b.path())]);
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l[0]["object"], "vm/one");
    assert_eq!(l[0]["holders"][0]["name"], "alpha");
    assert_eq!(l[0]["holders"][0]["owner_state"], "joined");
    // Held: another host cannot take it, and is told who has it.
    let o = ferry(&[
        "lock",
        "--datastore",
        s(b.path()),
        "--host",
        "beta",
        "--object",
        "vm/one",
        "--",
        "true",
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(err(&o).contains("held exclusive by alpha"), "{}", err(&o));
    assert!(holder.wait().unwrap().success());
    // Released and left: beta gets it and ferry exits with the command's status.
    let o = ferry(&[
        "lock",
        "--datastore",
        s(b.path()),
        "--host",
        "beta",
        "--object",
        "vm/one",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", err(&o));
    let o = ferry(&["datastore", "info", "--json", "--observe", "0", s(a.path())]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["state"] == "free"),
        "{v}"
    );
    // A command that cannot start gives the lock back at once: the next host gets it.
    let o = ferry(&[
        "lock",
        "--datastore",
        s(a.path()),
        "--host",
        "gamma",
        "--object",
        "vm/two",
        "--",
        "/nonexistent/cmd",
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(err(&o).contains("cannot run"), "{}", err(&o));
    let o = ferry(&[
        "lock",
        "--datastore",
        s(b.path()),
        "--host",
        "delta",
        "--object",
        "vm/two",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let o = ferry(&[
        "lock",
        "--datastore",
        s(a.path()),
        "--host",
        "bad name",
        "--object",
        "x",
        "--",
        "true",
    ]);
    assert!(err(&o).contains("host name"), "{}", err(&o));
}
