//! dswriter: the crash-test writer and verifier for datastore files.
//!
//! `dswriter write DEVICE HOST FILE LOG SEED` joins as HOST, creates FILE (64 MiB, thin
//! or lazy-thick by seed) or opens it, and writes and discards at random forever, one
//! request at a time. Every 8-byte word a write puts down holds its sequence number;
//! discards put down zeros. Before issuing each request it appends `op SEQ OFF LEN KIND`
//! to LOG, after each flush (or FUA write) `flush SEQ`; both synced. The
//! test kills it with SIGKILL (or a failpoint does).
//!
//! `dswriter verify DEVICE HOST FILE LOG` joins as HOST, opens FILE exclusively (waiting
//! for a dead holder's lock to break), and checks every word: it must hold what the last
//! flushed request covering it put down, or what a later, unflushed one did. Then it
//! writes once more, flushes, closes and leaves. Exit 0 when all is well, 3 on a lost
//! write (described on stderr).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datastore::files::Session;
use datastore::hostlease::HostLease;
use datastore::{Datastore, LockMode};
use diskfmt::{BlockDev, Provisioning, WriteFlags};
use ferry_tests::Rng;

const SIZE: u64 = 64 << 20;

fn main() {
    ferry_tests::hooks::install_from_env();
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        eprintln!("usage: dswriter write|verify DEVICE HOST FILE LOG [SEED]");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ds = Arc::new(Datastore::open(Path::new(&a[2])).expect("open datastore"));
    let lease = HostLease::join(Arc::clone(&ds), &a[3], "", Box::new(|_| {})).expect("join");
    let sess = Session::start(Arc::clone(&ds), lease.owner()).expect("session");
    let code = match a[1].as_str() {
        "write" => rt.block_on(write(sess, &a[4], &a[5], a[6].parse().expect("seed"))),
        "verify" => rt.block_on(verify(sess, &a[4], &a[5])),
        _ => 2,
    };
    lease.leave().expect("leave");
    std::process::exit(code);
}

fn log_line(log: &mut std::fs::File, line: String) {
    log.write_all(line.as_bytes()).expect("log");
    log.write_all(b"\n").expect("log");
    log.sync_data().expect("sync log");
}

async fn write(sess: Arc<Session>, file: &str, log: &str, seed: u64) -> i32 {
    let mut rng = Rng(seed | 1);
    let f = match sess.open(file, LockMode::Exclusive).await {
        Ok(f) => f,
        Err(datastore::Error::NotFound { .. }) => {
            let prov = if seed.is_multiple_of(2) {
                Provisioning::Thin
            } else {
                Provisioning::LazyThick
            };
            sess.create(file, SIZE, prov).await.expect("create")
        }
        Err(e) => panic!("open {file}: {e}"),
    };
    let mut seq = 0u64;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    loop {
        seq += 1;
        // Mostly 4 KiB-aligned, some 512-byte-aligned, up to 256 KiB; mostly in the first
        // 8 MiB so requests overlap and blocks are freed and reused.
        let align = if rng.next(4) == 0 { 512 } else { 4096 };
        let span = if rng.next(3) == 0 { SIZE } else { 8 << 20 };
        let len = ((rng.next(256 << 10) / align) + 1) * align;
        let off = (rng.next(span - len) / align) * align;
        let fua = rng.next(16) == 0;
        let discard = !fua && rng.next(8) == 0;
        // Logged before it is issued: a request may land although the kill came before
        // its completion, so every issued request must be known to the verifier.
        log_line(
            &mut log,
            format!("op {seq} {off} {len} {}", if discard { "d" } else { "w" }),
        );
        if discard {
            f.discard(off, len).await.expect("discard");
        } else {
            let mut buf = vec![0u8; len as usize];
            for w in buf.chunks_exact_mut(8) {
                w.copy_from_slice(&seq.to_le_bytes());
            }
            let flags = if fua {
                WriteFlags::FUA
            } else {
                WriteFlags::NONE
            };
            f.write(off, &buf, flags).await.expect("write");
        }
        if fua {
            log_line(&mut log, format!("flush {seq}"));
        } else if rng.next(6) == 0 {
            f.flush().await.expect("flush");
            log_line(&mut log, format!("flush {seq}"));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Op {
    seq: u64,
    off: u64,
    len: u64,
    discard: bool,
}

/// The ops of a log, and the last flushed sequence number.
fn parse_log_full(path: &str) -> (Vec<Op>, u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ops = Vec::new();
    let mut flushed = 0;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["op", seq, off, len, kind] => ops.push(Op {
                seq: seq.parse().expect("seq"),
                off: off.parse().expect("off"),
                len: len.parse().expect("len"),
                discard: *kind == "d",
            }),
            ["flush", seq] => flushed = seq.parse().expect("seq"),
            // A line cut short by the kill: its request was not acknowledged.
            _ => {}
        }
    }
    (ops, flushed)
}

async fn verify(sess: Arc<Session>, file: &str, log: &str) -> i32 {
    let start = Instant::now();
    let f = loop {
        match sess.open(file, LockMode::Exclusive).await {
            Ok(f) => break f,
            Err(datastore::Error::LockHeld { .. }) if start.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("open {file}: {e}"),
        }
    };
    let (ops, flushed) = parse_log_full(log);
    if f.size() != SIZE {
        // Killed while creating the file: it never acknowledged anything.
        assert!(
            ops.is_empty(),
            "{file} is {} bytes but requests were logged",
            f.size()
        );
        f.close().await.expect("close");
        println!("verified {file}: killed while it was being created");
        return 0;
    }
    // Per 8-byte word: what the last flushed request left, and what later ones may have.
    let words = (SIZE / 8) as usize;
    let mut sure = vec![0u64; words];
    let mut maybe: Vec<Vec<u64>> = vec![Vec::new(); words];
    for o in &ops {
        let v = if o.discard { 0 } else { o.seq };
        for w in (o.off / 8) as usize..((o.off + o.len) / 8) as usize {
            if o.seq <= flushed {
                sure[w] = v;
            } else {
                maybe[w].push(v);
            }
        }
    }
    let mut buf = vec![0u8; SIZE as usize];
    f.read(0, &mut buf).await.expect("read");
    let mut bad = 0;
    for (w, chunk) in buf.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if got != sure[w] && !maybe[w].contains(&got) {
            if bad < 5 {
                eprintln!(
                    "LOST: {file} word at {}: holds {got}, expected {} (flushed up to {flushed}) or one of {:?}",
                    w * 8,
                    sure[w],
                    maybe[w]
                );
            }
            bad += 1;
        }
    }
    if bad > 0 {
        eprintln!("{bad} words wrong");
        return 3;
    }
    // The file works after recovery: one more write, flushed and read back.
    let buf = vec![0xabu8; 4096];
    f.write(SIZE - 4096, &buf, WriteFlags::FUA)
        .await
        .expect("write after recovery");
    let mut back = vec![0u8; 4096];
    f.read(SIZE - 4096, &mut back)
        .await
        .expect("read after recovery");
    assert_eq!(back, buf);
    f.close().await.expect("close");
    println!(
        "verified {file}: {} requests, flushed up to {flushed}",
        ops.len()
    );
    0
}
