//! The bulk copier: one pass over what the source holds, then re-copies of whatever a
//! failed target request re-dirtied, until the job ends.
//!
//! It first scans the source's block status window by window (each window claimed, so no
//! guest write races the scan) and clears every grain that reads as zeros from a target
//! known to be zero: a thin target stays thin. It then walks the dirty bitmap in address
//! order, at most `in_flight` copies of at most `chunk` bytes at once, each claiming its
//! range before reading the source. Zero grains found in the data are skipped on a
//! zeroed target and sent as `write_zeroes` otherwise; data goes as writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diskfmt::{Error, Provisioning, WriteFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ranges::Kind;
use crate::state::{is_zero, Phase, Shared};

const SCAN_WINDOW: u64 = 64 << 20;

pub(crate) async fn run(sh: Arc<Shared>) {
    if let Err(e) = scan(&sh).await {
        let mut st = sh.st.lock().expect("mirror state");
        if st.phase.mirroring() {
            let msg = format!("reading the block status of the source failed: {e}");
            sh.set_phase(&mut st, Phase::Failed(msg));
        }
        return;
    }
    let sem = Arc::new(Semaphore::new(sh.opts.in_flight));
    let per_chunk = sh.opts.chunk / sh.opts.grain;
    let mut cursor = 0u64;
    loop {
        let pick = {
            let mut st = sh.st.lock().expect("mirror state");
            if !st.phase.mirroring() {
                break;
            }
            let found = if st.frozen {
                None
            } else {
                st.dirty
                    .next_set(cursor, &st.copying)
                    .or_else(|| st.dirty.next_set(0, &st.copying))
            };
            match found {
                Some(g0) => {
                    let mut g1 = g0 + 1;
                    while g1 < sh.grains
                        && g1 - g0 < per_chunk
                        && st.dirty.get(g1)
                        && !st.copying.get(g1)
                    {
                        g1 += 1;
                    }
                    st.copying.set_range(g0, g1);
                    st.redirtied.clear_range(g0, g1);
                    let len = (g1 * sh.opts.grain).min(sh.size) - g0 * sh.opts.grain;
                    // Throttle: each copy takes its share of the rate limit.
                    let now = Instant::now();
                    let slot = st.next_slot.max(now);
                    if let Some(speed) = st.speed.filter(|s| *s > 0) {
                        st.next_slot = slot + Duration::from_secs_f64(len as f64 / speed as f64);
                    }
                    let backoff = match st.consecutive_errors {
                        0 => Duration::ZERO,
                        n => Duration::from_millis(50 << n.min(6)),
                    };
                    Some((g0, g1, slot.max(now + backoff)))
                }
                None => {
                    if !st.frozen
                        && st.phase == Phase::Copying
                        && st.dirty.count() == 0
                        && st.copying.count() == 0
                    {
                        sh.set_phase(&mut st, Phase::Ready);
                    }
                    None
                }
            }
        };
        match pick {
            None => {
                let _ = tokio::time::timeout(Duration::from_millis(200), sh.poke.notified()).await;
            }
            Some((g0, g1, at)) => {
                tokio::time::sleep_until(at.into()).await;
                let permit = Arc::clone(&sem)
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                tokio::spawn(copy(Arc::clone(&sh), g0, g1, permit));
                cursor = g1;
            }
        }
    }
    // Let copies in flight end before the job is reported finished.
    let _ = sem.acquire_many(sh.opts.in_flight as u32).await;
}

/// Clears the grains that read as zeros on both sides.
async fn scan(sh: &Arc<Shared>) -> diskfmt::Result<()> {
    let g = sh.opts.grain;
    let mut off = 0;
    while off < sh.size {
        let end = (off + SCAN_WINDOW).min(sh.size);
        if sh.opts.target_zeroed {
            let _claim = sh.queue.enter(off, end, Kind::Claim).await;
            let mut pos = off;
            while pos < end {
                let exts = sh.source.block_status(pos, end - pos).await?;
                let mut st = sh.st.lock().expect("mirror state");
                for e in &exts {
                    if e.kind.reads_zero() {
                        let g0 = e.offset.div_ceil(g);
                        let g1 = if e.end() >= sh.size {
                            sh.grains
                        } else {
                            e.end() / g
                        };
                        // Never clear a grain written on the target by a mirrored write.
                        for i in g0..g1 {
                            if !st.touched.get(i) {
                                st.dirty.clear_range(i, i + 1);
                            }
                        }
                    }
                }
                pos = exts.last().map_or(end, |e| e.end()).max(pos + 1);
            }
        }
        off = end;
    }
    let mut st = sh.st.lock().expect("mirror state");
    st.total_bytes = (st.dirty.count() * g).min(sh.size);
    drop(st);
    sh.poke.notify_one();
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Piece {
    Data(u64, u64),
    Zero(u64, u64),
}

/// Copies grains `g0..g1` (all dirty and marked copying).
async fn copy(sh: Arc<Shared>, g0: u64, g1: u64, _permit: OwnedSemaphorePermit) {
    let g = sh.opts.grain;
    let start = g0 * g;
    let end = (g1 * g).min(sh.size);
    let t = sh.opts.target_timeout;
    let failed = |e: Error| {
        sh.st
            .lock()
            .expect("mirror state")
            .copying
            .clear_range(g0, g1);
        sh.target_failed(g0, g1, &e);
    };
    let Ok(claim) = tokio::time::timeout(t * 2, sh.queue.enter(start, end, Kind::Copy)).await
    else {
        return failed(sh.timed_out("claim for a copy", start));
    };
    let mut buf = vec![0u8; (end - start) as usize];
    if let Err(e) = sh.source.read(start, &mut buf).await {
        return failed(e);
    }
    // Split into data and zero pieces, grain by grain.
    let (known_zero, thin) = {
        let st = sh.st.lock().expect("mirror state");
        let kz: Vec<bool> = (g0..g1)
            .map(|i| sh.opts.target_zeroed && !st.touched.get(i))
            .collect();
        (kz, sh.target.provisioning() == Provisioning::Thin)
    };
    // Zeros are looked for per 4 KiB block, so a grain holding a little data does not
    // allocate the whole grain on a thin target.
    const BLOCK: u64 = 4096;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut written = Vec::new();
    for (k, i) in (g0..g1).enumerate() {
        let ga = i * g;
        let gb = ((i + 1) * g).min(sh.size);
        let mut any = false;
        let mut a = ga;
        while a < gb {
            let b = (a + BLOCK).min(gb);
            let zero = is_zero(&buf[(a - start) as usize..(b - start) as usize]);
            if !(zero && known_zero[k]) {
                any = true;
                match (pieces.last_mut(), zero) {
                    (Some(Piece::Data(_, e)), false) | (Some(Piece::Zero(_, e)), true)
                        if *e == a =>
                    {
                        *e = b
                    }
                    (_, false) => pieces.push(Piece::Data(a, b)),
                    (_, true) => pieces.push(Piece::Zero(a, b)),
                }
            }
            a = b;
        }
        if any {
            written.push(i);
        }
    }
    // Marked before anything is sent: a copy that fails after landing part of its range
    // must not leave those grains counted as "never written on the target" (a later
    // zeroing of them would then be skipped, and stale data pivoted).
    {
        let mut st = sh.st.lock().expect("mirror state");
        for &i in &written {
            st.touched.set_range(i, i + 1);
        }
    }
    let target = Arc::clone(&sh.target);
    let mut task = tokio::spawn(async move {
        for p in pieces {
            match p {
                Piece::Data(a, b) => {
                    let s = (a - start) as usize;
                    let e = (b - start) as usize;
                    target.write(a, &buf[s..e], WriteFlags::NONE).await?;
                }
                Piece::Zero(a, b) => target.write_zeroes(a, b - a, thin).await?,
            }
        }
        Ok::<(), Error>(())
    });
    let res = match tokio::time::timeout(t, &mut task).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(Error::Io {
            object: sh.target.name().to_path_buf(),
            op: "copy",
            offset: start,
            err: std::io::Error::other(join.to_string()),
        }),
        Err(_) => Err(sh.timed_out("copy", start)),
    };
    match res {
        Ok(()) => {
            let mut st = sh.st.lock().expect("mirror state");
            // Grains the guest wrote since this copy picked them stay dirty: the copy
            // may have read the source before that write landed.
            for i in g0..g1 {
                if !st.redirtied.get(i) {
                    st.dirty.clear_range(i, i + 1);
                }
            }
            st.copying.clear_range(g0, g1);
            st.done_bytes += end - start;
            st.consecutive_errors = 0;
            drop(st);
            drop(claim);
        }
        Err(e) => {
            failed(e);
            if !task.is_finished() {
                // The target write still runs: nothing may be sent to this range before
                // it ends.
                let tail = claim.into_tail();
                tokio::spawn(async move {
                    let _ = task.await;
                    drop(tail);
                });
            }
        }
    }
    sh.poke.notify_one();
}
