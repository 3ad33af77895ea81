//! ferry's NBD client as a BlockDev, against `qemu-nbd` and against ferry's own server:
//! reads, writes (FUA, unaligned), zeroes, discards, flushes and block status agree with
//! the file beneath; a lost server fails requests instead of hanging them.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use diskfmt::raw::RawImage;
use diskfmt::{ops, BlockDev, Engine, ExtentKind, WriteFlags};
use nbd::{Export, NbdClient, Server};

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn thin(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    p
}

/// Our own server on a unix socket in `dir`, exporting a fresh 32 MiB thin image as
/// `disk`; returns the runtime serving it, the image and the socket.
fn own_server(
    dir: &Path,
) -> (
    tokio::runtime::Runtime,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let image = thin(dir);
    let sock = dir.join("f.sock");
    let rt = rt();
    let server = Server::new();
    let dev: Arc<dyn BlockDev> =
        Arc::new(RawImage::open(&image, true, Engine::global().unwrap()).unwrap());
    server.add(Export {
        name: "disk".into(),
        description: String::new(),
        dev,
        read_only: false,
    });
    let l = rt.block_on(async { tokio::net::UnixListener::bind(&sock).unwrap() });
    rt.spawn(Arc::clone(&server).serve_unix(l));
    (rt, image, sock)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(image: &Path, sock: &Path) -> Kill {
    let c = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--cache=none",
            "-x",
            "disk",
            "--persistent",
            "--shared=4",
        ])
        .arg(format!("--socket={}", sock.display()))
        .arg(image)
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Kill(c)
}

/// A fixed sequence through `dev`; then its content must equal the file `image`.
async fn exercise(dev: &NbdClient, image: &Path) {
    assert_eq!(dev.size(), 32 * MIB);
    assert!(dev.writable());
    let pat = |seed: u8, n: usize| {
        (0..n)
            .map(|i| seed.wrapping_add((i / 512) as u8))
            .collect::<Vec<u8>>()
    };
    dev.write(0, &pat(1, 3 * MIB as usize), WriteFlags::NONE)
        .await
        .unwrap();
    dev.write(
        4 * MIB + 512,
        &pat(2, 5000 - 5000 % 512 + 512),
        WriteFlags::FUA,
    )
    .await
    .unwrap();
    dev.write(20 * MIB, &pat(3, 64 << 10), WriteFlags::NONE)
        .await
        .unwrap();
    dev.write_zeroes(MIB, 64 << 10, false).await.unwrap();
    dev.discard(2 * MIB, MIB).await.unwrap();
    dev.flush().await.unwrap();
    let mut back = vec![0u8; 64 << 10];
    dev.read(20 * MIB, &mut back).await.unwrap();
    assert_eq!(back, pat(3, 64 << 10));
    let mut z = vec![1u8; 64 << 10];
    dev.read(MIB, &mut z).await.unwrap();
    assert!(z.iter().all(|b| *b == 0));
    // Block status: data where written, zeros/holes where zeroed and never written.
    let ext = ops::extents(dev).await.unwrap();
    let kind_at = |o: u64| {
        ext.iter()
            .find(|e| e.offset <= o && o < e.end())
            .unwrap()
            .kind
    };
    assert_eq!(kind_at(0), ExtentKind::Data);
    assert_eq!(kind_at(20 * MIB), ExtentKind::Data);
    assert!(kind_at(10 * MIB).reads_zero(), "{ext:?}");
    assert!(kind_at(2 * MIB + 4096).reads_zero(), "{ext:?}");
    // Many requests in flight at once.
    let reads: Vec<_> = (0..32u64)
        .map(|i| async move {
            let mut b = vec![0u8; 4096];
            dev.read(i * 4096, &mut b).await.map(|_| b)
        })
        .collect();
    for (i, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            r.unwrap(),
            pat(1, 3 * MIB as usize)[i * 4096..(i + 1) * 4096]
        );
    }
    // The whole export equals the file beneath.
    let local = RawImage::open(image, false, Engine::global().unwrap()).unwrap();
    assert!(matches!(
        ops::compare(dev, &local).await.unwrap(),
        ops::Comparison::Identical {
            size_mismatch: false
        }
    ));
    // Out of range is refused here, before the wire.
    assert!(dev.read(32 * MIB - 10, &mut [0u8; 20]).await.is_err());
}

#[test]
fn against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let image = thin(dir.path());
    let sock = dir.path().join("q.sock");
    let q = qemu_nbd(&image, &sock);
    let rt = rt();
    rt.block_on(async {
        let c = NbdClient::connect_unix(&sock, "disk").await.unwrap();
        exercise(&c, &image).await;
        // An unknown export is refused with a clear error.
        let e = NbdClient::connect_unix(&sock, "nope").await.unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        // The server goes away: requests fail, they do not hang.
        drop(q);
        let mut b = vec![0u8; 4096];
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(0, &mut b)).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
    });
}

#[test]
fn against_our_own_server_and_converting_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, image, sock) = own_server(dir.path());
    rt.block_on(async {
        let c = NbdClient::connect_unix(&sock, "disk").await.unwrap();
        exercise(&c, &image).await;
        // Convert out of the export into a local image: identical.
        let out = dir.path().join("out.raw");
        std::fs::File::create(&out)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let target = RawImage::open(&out, true, Engine::global().unwrap()).unwrap();
        diskfmt::convert::convert(
            &c,
            &target,
            diskfmt::convert::ConvertOptions {
                in_flight: 8,
                target_is_zero: true,
            },
            &|_, _| {},
        )
        .await
        .unwrap();
        target.flush().await.unwrap();
        assert!(matches!(
            ops::compare(&c, &target).await.unwrap(),
            ops::Comparison::Identical { .. }
        ));
    });
}

#[test]
fn a_reconnecting_client_rides_out_a_server_restart_within_its_bound_and_fails_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = thin(dir.path());
    let sock = dir.path().join("r.sock");
    let q = qemu_nbd(&image, &sock);
    let rt = rt();
    let c = rt.block_on(async {
        NbdClient::connect_unix(&sock, "disk")
            .await
            .unwrap()
            .reconnect_for(Duration::from_secs(10))
    });
    rt.block_on(async {
        c.write(0, &[1u8; 65536], WriteFlags::NONE).await.unwrap();
        c.flush().await.unwrap();
    });
    // The server goes away; requests issued now wait for it to come back.
    drop(q);
    let _ = std::fs::remove_file(&sock);
    let c = Arc::new(c);
    let c2 = Arc::clone(&c);
    let pending = rt.spawn(async move {
        let w: Vec<_> = (0..8u64)
            .map(|i| {
                let c = Arc::clone(&c2);
                async move {
                    c.write(MIB + i * 65536, &[2u8; 65536], WriteFlags::NONE)
                        .await
                }
            })
            .collect();
        let r = futures::future::join_all(w).await;
        (r, c2.flush().await)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!pending.is_finished(), "requests failed instead of waiting");
    let q = qemu_nbd(&image, &sock);
    let (writes, flushed) = rt.block_on(pending).unwrap();
    for w in writes {
        w.expect("a write across the reconnection");
    }
    flushed.unwrap();
    rt.block_on(async {
        let mut b = vec![0u8; 65536];
        c.read(0, &mut b).await.unwrap();
        assert!(b.iter().all(|x| *x == 1));
        c.read(MIB + 7 * 65536, &mut b).await.unwrap();
        assert!(b.iter().all(|x| *x == 2));
    });
    // Gone for longer than the bound: the request fails, naming the reconnection.
    drop(q);
    let _ = std::fs::remove_file(&sock);
    let q2 = qemu_nbd(&image, &sock);
    let c = rt.block_on(async {
        NbdClient::connect_unix(&sock, "disk")
            .await
            .unwrap()
            .reconnect_for(Duration::from_secs(1))
    });
    drop(q2);
    let t0 = std::time::Instant::now();
    let r = rt.block_on(async {
        let mut b = vec![0u8; 4096];
        c.read(0, &mut b).await
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no reconnection within"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// A request whose caller gives up while its bytes are being written (its future
/// dropped) leaves part of it on the wire: the next request must not follow it there
/// (the server would read it as the rest of the payload, and guest data as requests).
/// The client drops that connection and sends its next request on a new one.
#[test]
fn a_request_abandoned_mid_write_never_corrupts_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, _image, sock) = own_server(dir.path());
    rt.block_on(async {
        let c = NbdClient::connect_unix(&sock, "disk")
            .await
            .unwrap()
            .reconnect_for(Duration::from_secs(5));
        let big = vec![0x5au8; 24 * MIB as usize];
        let abandoned = tokio::time::timeout(
            Duration::from_micros(300),
            c.write(0, &big, WriteFlags::NONE),
        )
        .await;
        assert!(abandoned.is_err(), "the big write was not cut short");
        let small = vec![0xa5u8; 4096];
        tokio::time::timeout(
            Duration::from_secs(10),
            c.write(30 * MIB, &small, WriteFlags::NONE),
        )
        .await
        .expect("the next request hung behind the torn one")
        .expect("the next request failed");
        c.flush().await.unwrap();
        let fresh = NbdClient::connect_unix(&sock, "disk").await.unwrap();
        let mut back = vec![0u8; 4096];
        fresh.read(30 * MIB, &mut back).await.unwrap();
        assert!(back == small, "the next request's data did not land");
    });
}

/// Connections beyond the server's limit are closed at once, and a client that never
/// finishes its handshake is disconnected after the handshake timeout.
#[test]
fn connections_are_limited_and_a_silent_handshake_times_out() {
    use nbd::server::{HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("f.sock");
    let rt = rt();
    let server = Server::new();
    let l = rt.block_on(async { tokio::net::UnixListener::bind(&sock).unwrap() });
    rt.spawn(Arc::clone(&server).serve_unix(l));
    rt.block_on(async {
        let t0 = std::time::Instant::now();
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).await.unwrap();
            held.push(s);
        }
        // One more: closed without a greeting.
        let mut extra = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut b = [0u8; 18];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut b))
            .await
            .expect("the connection over the limit was kept waiting")
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection over the limit was served");
        // The silent ones are dropped after the handshake timeout, not before.
        let mut first = held.swap_remove(0);
        let n = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, first.read(&mut b))
            .await
            .expect("a silent client was never disconnected")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(t0.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(500));
    });
}

/// A client that sends requests but never reads the replies stops being read once the
/// replies waiting for it reach the connection's budget: the server's memory stays
/// bounded (it would otherwise queue every reply).
#[test]
fn a_client_that_never_reads_replies_is_stopped_being_read() {
    use nbd::proto::{
        CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, IHAVEOPT, OPT_EXPORT_NAME, REQUEST_MAGIC,
    };
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (_rt, _image, sock) = own_server(dir.path());
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    let name = b"disk";
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    // 200,000 reads of 4 KiB: 800 MB of replies, never read.
    const N: u64 = 200_000;
    let mut w = s.try_clone().unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent2 = Arc::clone(&sent);
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::with_capacity(28 * 1000);
        for i in 0..N {
            batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes()); // flags
            batch.extend_from_slice(&0u16.to_be_bytes()); // READ
            batch.extend_from_slice(&i.to_be_bytes()); // cookie
            batch.extend_from_slice(&0u64.to_be_bytes()); // offset
            batch.extend_from_slice(&4096u32.to_be_bytes());
            if batch.len() >= 28 * 1000 {
                if w.write_all(&batch).is_err() {
                    return;
                }
                batch.clear();
                sent2.store(i + 1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _ = w.write_all(&batch);
        sent2.store(N, std::sync::atomic::Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_secs(5));
    let n = sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        n < N,
        "the server read all {N} requests while none of its replies was read"
    );
    eprintln!("the server stopped reading after about {n} requests");
    s.shutdown(std::net::Shutdown::Both).unwrap();
    writer.join().unwrap();
}

/// A unix-socket relay between a client and the server whose links can hold the
/// client's bytes back, be cut on the client's side only, and deliver what they held
/// later: a write delayed in the network on a connection its client gave up on.
mod relay {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::unix::OwnedWriteHalf;

    #[derive(Default)]
    pub struct Link {
        pub hold: AtomicBool,
        pub held: Mutex<Vec<u8>>,
        cut: AtomicBool,
        /// What the server sent after the cut, and whether it closed the connection.
        pub late: Mutex<Vec<u8>>,
        pub closed: AtomicBool,
        client_fd: std::sync::atomic::AtomicI32,
        to_server: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    }

    impl Link {
        /// The client loses the connection; the server's side stays open.
        pub fn cut(&self) {
            self.cut.store(true, Ordering::SeqCst);
            let fd = self.client_fd.load(Ordering::SeqCst);
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }

        /// Delivers what was held to the server.
        pub async fn release(&self) {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            let mut w = self.to_server.lock().await;
            w.as_mut().unwrap().write_all(&held).await.unwrap();
        }
    }

    /// Relays `listen` to `server`; returns every link made so far.
    pub async fn start(
        listen: &std::path::Path,
        server: std::path::PathBuf,
    ) -> Arc<Mutex<Vec<Arc<Link>>>> {
        let l = tokio::net::UnixListener::bind(listen).unwrap();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let all = Arc::clone(&links);
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let s = tokio::net::UnixStream::connect(&server).await.unwrap();
                let link = Arc::new(Link::default());
                link.client_fd.store(c.as_raw_fd(), Ordering::SeqCst);
                let (mut cr, mut cw) = c.into_split();
                let (mut sr, sw) = s.into_split();
                *link.to_server.lock().await = Some(sw);
                all.lock().unwrap().push(Arc::clone(&link));
                let up = Arc::clone(&link);
                tokio::spawn(async move {
                    let mut b = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = cr.read(&mut b).await {
                        if up.hold.load(Ordering::SeqCst) {
                            up.held.lock().unwrap().extend_from_slice(&b[..n]);
                        } else if !up.cut.load(Ordering::SeqCst) {
                            let mut w = up.to_server.lock().await;
                            if w.as_mut().unwrap().write_all(&b[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                let down = link;
                tokio::spawn(async move {
                    let mut b = vec![0u8; 1 << 16];
                    loop {
                        match sr.read(&mut b).await {
                            Ok(n @ 1..) if down.cut.load(Ordering::SeqCst) => {
                                down.late.lock().unwrap().extend_from_slice(&b[..n]);
                            }
                            Ok(n @ 1..) => {
                                let _ = cw.write_all(&b[..n]).await;
                            }
                            _ => {
                                down.closed.store(true, Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                });
            }
        });
        links
    }
}

/// A write whose connection is lost while the network still holds it is sent again on
/// a new connection, and a later write overwrites it; when the network finally delivers
/// the first copy, ferry's server has replaced that connection and never carries it out
/// (before the barrier, it landed last: the disk held the stale data).
#[test]
fn a_write_delayed_on_a_lost_connection_never_lands_after_its_copy_sent_again() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (rt, _image, sock) = own_server(dir.path());
    let via = dir.path().join("relay.sock");
    rt.block_on(async {
        let links = relay::start(&via, sock.clone()).await;
        let c = Arc::new(
            NbdClient::connect_unix(&via, "disk")
                .await
                .unwrap()
                .reconnect_for(Duration::from_secs(10)),
        );
        c.write(0, &[0x11; 4096], WriteFlags::NONE).await.unwrap();
        let first = Arc::clone(&links.lock().unwrap()[0]);
        first.hold.store(true, Ordering::SeqCst);
        let c2 = Arc::clone(&c);
        let stale = tokio::spawn(async move { c2.write(0, &[0xaa; 4096], WriteFlags::NONE).await });
        while first.held.lock().unwrap().len() < 28 + 4096 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        first.cut();
        stale
            .await
            .unwrap()
            .expect("the write sent again on a new connection");
        assert_eq!(
            links.lock().unwrap().len(),
            2,
            "the client did not reconnect"
        );
        c.write(0, &[0xbb; 4096], WriteFlags::NONE).await.unwrap();
        c.flush().await.unwrap();
        // The network delivers the first copy now.
        first.release().await;
        let t0 = std::time::Instant::now();
        while !first.closed.load(Ordering::SeqCst) && first.late.lock().unwrap().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the server neither answered nor closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fresh = NbdClient::connect_unix(&sock, "disk").await.unwrap();
        let mut back = vec![0u8; 4096];
        fresh.read(0, &mut back).await.unwrap();
        assert!(
            back.iter().all(|b| *b == 0xbb),
            "the stale first copy landed after the later write: {:#x}",
            back[0]
        );
        assert!(
            first.late.lock().unwrap().is_empty(),
            "the server answered a request of the replaced connection"
        );
        // The client goes on working on its new connection.
        c.write(8192, &[0xcc; 4096], WriteFlags::NONE)
            .await
            .unwrap();
    });
}
