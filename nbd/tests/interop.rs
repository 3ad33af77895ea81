//! ferry's NBD server against real clients: qemu-io, qemu-img, nbdinfo (libnbd) and
//! nbdcopy, over unix sockets and TCP; and malformed clients that must only lose their
//! own connection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine};
use nbd::proto::*;
use nbd::{Export, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

struct Served {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    image: PathBuf,
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
}

/// A thin 64 MiB raw image with some data, served as "disk" (and "ro", read-only).
fn served() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 40M 64k",
            image.to_str().unwrap(),
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new();
    let sock = dir.path().join("nbd.sock");
    let dev: Arc<dyn BlockDev> =
        Arc::new(RawImage::open(&image, true, Engine::global().unwrap()).unwrap());
    server.add(Export {
        name: "disk".into(),
        description: "test disk".into(),
        dev: Arc::clone(&dev),
        read_only: false,
    });
    server.add(Export {
        name: "ro".into(),
        description: String::new(),
        dev,
        read_only: true,
    });
    let l = rt.block_on(async { tokio::net::UnixListener::bind(&sock).unwrap() });
    rt.spawn(Arc::clone(&server).serve_unix(l));
    Served {
        _dir: dir,
        sock,
        image,
        rt,
        server,
    }
}

fn uri(s: &Served, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s.sock.display())
}

#[test]
fn qemu_io_and_qemu_img_read_write_and_compare() {
    let s = served();
    let u = uri(&s, "disk");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x61 0 1M",
            "-c",
            "read -P 0x62 40M 64k",
            "-c",
            "read -P 0 1M 1M",
            &u,
        ],
    );
    // Unaligned, FUA, zeroes (with and without unmap), discard, flush: then verify.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x71 4097 3000",
            "-c",
            "write -f -P 0x72 8M 128k",
            "-c",
            "write -z 40M 4k",
            "-c",
            "write -z -u 41M 1M",
            "-c",
            "discard 16M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x71 4097 3000",
            "-c",
            "read -P 0x72 8M 128k",
            "-c",
            "read -P 0 40M 4k",
            "-c",
            "read -P 0x62 41947136 60k",
            "-c",
            "read -P 0 16M 64k",
            &u,
        ],
    );
    // The export and the file beneath it hold the same bytes.
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &u,
            s.image.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    // qemu-img convert out of the export.
    let copy = s.image.with_file_name("copy.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &u,
            copy.to_str().unwrap(),
        ],
    );
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s.image.to_str().unwrap(),
            copy.to_str().unwrap(),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    // The read-only export refuses writes.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &uri(&s, "ro")])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("denied"),
        "{text}"
    );
    drop(s.rt);
}

#[test]
fn nbdinfo_lists_exports_and_maps_allocation_and_nbdcopy_round_trips() {
    let s = served();
    let u = uri(&s, "disk");
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", s.sock.display()),
        ],
    );
    assert!(list.contains("disk") && list.contains("ro"), "{list}");
    let info = run("nbdinfo", &[&u]);
    assert!(info.contains("67108864"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    // The map shows the data where it is and holes elsewhere, as the file's own map does.
    let map = run("nbdinfo", &["--map", &u]);
    let data: Vec<&str> = map.lines().filter(|l| l.contains("data")).collect();
    assert!(
        data.iter().any(|l| l.trim_start().starts_with('0')),
        "{map}"
    );
    assert!(map.contains("hole"), "{map}");
    let ours = run(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "raw",
            s.image.to_str().unwrap(),
        ],
    );
    assert!(ours.contains("\"data\": true"), "{ours}");
    // nbdcopy out and back in.
    let out = s.image.with_file_name("out.raw");
    run("nbdcopy", &[&u, out.to_str().unwrap()]);
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            s.image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 2M 1M",
            out.to_str().unwrap(),
        ],
    );
    run("nbdcopy", &[out.to_str().unwrap(), &u]);
    run("qemu-io", &["-f", "raw", "-c", "read -P 0x33 2M 1M", &u]);
    drop(s.rt);
}

/// Opens a raw connection and does the fixed-newstyle greeting.
async fn greet(sock: &Path) -> tokio::net::UnixStream {
    let mut c = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).await.unwrap();
    assert_eq!(
        u64::from_be_bytes(hello[0..8].try_into().unwrap()),
        NBDMAGIC
    );
    c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .await
        .unwrap();
    c
}

async fn option(c: &mut tokio::net::UnixStream, opt: u32, data: &[u8]) -> (u32, Vec<u8>) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).await.unwrap();
    option_reply_of(c).await
}

/// Reads one option reply.
async fn option_reply_of(c: &mut tokio::net::UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), REPLY_MAGIC);
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).await.unwrap();
    (kind, d)
}

#[test]
fn malformed_clients_lose_only_their_own_connection() {
    let s = served();
    s.rt.block_on(async {
        // Unknown option: ERR_UNSUP, and the connection goes on.
        let mut c = greet(&s.sock).await;
        assert_eq!(option(&mut c, 99, b"").await.0, REP_ERR_UNSUP);
        // Garbage INFO payload: ERR_INVALID; unknown export: ERR_UNKNOWN.
        assert_eq!(
            option(&mut c, OPT_INFO, &[0, 0, 0, 200, 1]).await.0,
            REP_ERR_INVALID
        );
        let mut q = 7u32.to_be_bytes().to_vec();
        q.extend_from_slice(b"missing");
        q.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(option(&mut c, OPT_GO, &q).await.0, REP_ERR_UNKNOWN);
        // Meta context before structured replies: refused.
        assert_eq!(
            option(&mut c, OPT_SET_META_CONTEXT, &[0; 8]).await.0,
            REP_ERR_INVALID
        );
        // GO on "disk", then requests: out of range, oversized read, block status without
        // a context, then a bad magic, which ends the connection.
        let mut q = 4u32.to_be_bytes().to_vec();
        q.extend_from_slice(b"disk");
        q.extend_from_slice(&0u16.to_be_bytes());
        let mut kind = option(&mut c, OPT_GO, &q).await.0;
        while kind != REP_ACK {
            assert_eq!(kind, REP_INFO);
            kind = option_reply_of(&mut c).await.0;
        }
        for (kind, off, len, want) in [
            (CMD_READ, 64 * MIB - 512, 1024u32, EINVAL),
            (CMD_READ, 0, MAX_REQUEST + 1, EOVERFLOW),
            (CMD_BLOCK_STATUS, 0, 4096, EINVAL),
            (CMD_TRIM, u64::MAX - 10, 100, EINVAL),
        ] {
            let r = Request {
                flags: 0,
                kind,
                cookie: 42,
                offset: off,
                length: len,
            };
            c.write_all(&r.encode()).await.unwrap();
            let mut rep = [0u8; 16];
            c.read_exact(&mut rep)
                .await
                .unwrap_or_else(|e| panic!("{kind} {off} {len}: {e}"));
            assert_eq!(
                u32::from_be_bytes(rep[0..4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC
            );
            assert_eq!(
                u32::from_be_bytes(rep[4..8].try_into().unwrap()),
                want,
                "{kind} {off} {len}"
            );
        }
        c.write_all(&[0xde; 28]).await.unwrap();
        let mut buf = [0u8; 1];
        // Closed (or reset, when the server did not read all we sent).
        assert!(
            matches!(c.read(&mut buf).await, Ok(0) | Err(_)),
            "bad magic closes the connection"
        );
        // A huge option and a half-sent request: those connections end, nothing else.
        let mut c = greet(&s.sock).await;
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_INFO.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&m).await.unwrap();
        assert!(matches!(c.read(&mut buf).await, Ok(0) | Err(_)));
        let mut c = greet(&s.sock).await;
        c.write_all(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
        drop(c);
    });
    // The server still serves everyone else.
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x61 0 1M", &uri(&s, "disk")],
    );
    assert_eq!(s.server.names(), vec!["disk".to_string(), "ro".to_string()]);
    drop(s.rt);
}

#[test]
fn qemu_system_opens_an_export_as_a_blockdev() {
    use std::io::Write;
    let s = served();
    let arg = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,node-name=n0",
        s.sock.display()
    );
    let mut q = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-blockdev",
            &arg,
            "-qmp",
            "stdio",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut stdin = q.stdin.take().unwrap();
    for cmd in [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"query-named-block-nodes"}"#,
        r#"{"execute":"quit"}"#,
    ] {
        writeln!(stdin, "{cmd}").unwrap();
    }
    drop(stdin);
    let out = q.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"drv\": \"nbd\"") && text.contains("\"virtual-size\": 67108864"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(s.rt);
}
