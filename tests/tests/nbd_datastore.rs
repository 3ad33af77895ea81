//! A datastore file served by ferry's NBD server to fio (libnbd) verifies what fio
//! wrote, maps as the datastore allocated it, and leaves the datastore clean.

use std::process::Command;
use std::sync::Arc;

use diskfmt::BlockDev;
use nbd::{Export, Server};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_datastore_file_served_to_fio_verifies_and_maps_as_allocated() {
    use datastore::files::Session;
    use datastore::hostlease::HostLease;
    use datastore::{check, Datastore, Profile};
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lun.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let d = datastore::device::Device::open(&image).unwrap();
    Datastore::format(&d, d.size(), "nbd", 4, Profile::Test).unwrap();
    let ds = Arc::new(Datastore::open(&image).unwrap());
    let lease = HostLease::join(Arc::clone(&ds), "nbdhost", "", Box::new(|_| {})).unwrap();
    let sess = Session::start(Arc::clone(&ds), lease.owner()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let file = rt
        .block_on(sess.create("/vm1-disk0", 64 * MIB, diskfmt::Provisioning::Thin))
        .unwrap();
    let file = Arc::new(file);
    let server = Server::new();
    let dev: Arc<dyn BlockDev> = Arc::clone(&file) as Arc<dyn BlockDev>;
    server.add(Export {
        name: "vm1-disk0".into(),
        description: String::new(),
        dev,
        read_only: false,
    });
    let sock = dir.path().join("nbd.sock");
    let l = rt.block_on(async { tokio::net::UnixListener::bind(&sock).unwrap() });
    rt.spawn(Arc::clone(&server).serve_unix(l));
    let u = format!("nbd+unix:///vm1-disk0?socket={}", sock.display());
    // fio writes 8 MiB of 4 KiB random blocks at queue depth 16 in the first 16 MiB,
    // then reads every block back and checks its crc32c.
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={u}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--io_size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No verify state file left in the working directory.
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=terse",
        ],
    );
    assert!(!out.is_empty());
    // The map of the export is the datastore's allocation: data only in the first 16 MiB.
    let map = run("nbdinfo", &["--map", &u]);
    for line in map.lines().filter(|l| l.contains("data")) {
        let off: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(off < 16 * MIB, "data beyond what fio wrote: {map}");
    }
    assert!(map.contains("hole"), "{map}");
    server.remove("vm1-disk0");
    drop(server);
    // Connections have ended with their clients: the file is ours alone again.
    let mut file = file;
    let file = loop {
        match Arc::try_unwrap(file) {
            Ok(f) => break f,
            Err(f) => {
                file = f;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    };
    rt.block_on(file.close()).unwrap();
    let r = check::check(&ds).unwrap();
    assert!(r.clean(), "{r:#?}");
    drop(sess);
    lease.leave().unwrap();
    drop(rt);
}
