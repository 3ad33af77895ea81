//! Copying one block device onto another with a provisioning choice.
//!
//! The source is walked by block status and cut into chunks of at most [`CHUNK`] bytes
//! (zero ranges into larger pieces); up to `in_flight` chunks are copied at once, so memory
//! stays below `in_flight × CHUNK`. Data chunks are read and checked for zeros. Zeros (from
//! block status or from a buffer) are never written to a target known to read as zeros
//! (fresh thin or lazy-thick); otherwise they become `write_zeroes`, which deallocates on a
//! thin target and writes real zeros on an eager-thick one, so the target ends up exactly
//! as provisioned.

use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, TryStreamExt};

use crate::blockdev::{BlockDev, ExtentKind, Provisioning, WriteFlags};
use crate::zero::is_zero;
use crate::{Error, Result};

/// Largest data chunk copied by one request.
pub const CHUNK: u64 = 1 << 20;
/// Largest zero range handled by one request (for progress granularity).
const ZERO_CHUNK: u64 = 64 << 20;

/// Conversion settings.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions {
    /// Chunks copied concurrently.
    pub in_flight: usize,
    /// The target reads as zeros everywhere (freshly created).
    pub target_is_zero: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            in_flight: 16,
            target_is_zero: false,
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ConvertStats {
    /// Bytes of the source visited.
    pub bytes_total: u64,
    /// Data bytes written to the target.
    pub bytes_written: u64,
    /// Bytes zeroed on the target (write_zeroes).
    pub bytes_zeroed: u64,
    /// Zero bytes skipped because the target already reads zeros there.
    pub bytes_skipped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Piece {
    offset: u64,
    length: u64,
    zero: bool,
}

/// Copies `src` onto `dst` (which must be at least as large), calling `progress(done,
/// total)` as chunks complete, then flushes `dst`.
pub async fn convert(
    src: &dyn BlockDev,
    dst: &dyn BlockDev,
    opts: ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertStats> {
    let size = src.size();
    if dst.size() < size {
        return Err(Error::invalid(
            dst.name(),
            format!(
                "target is {} bytes, smaller than the source {} ({size} bytes)",
                dst.size(),
                src.name().display()
            ),
        ));
    }
    let skip_zeros = opts.target_is_zero && dst.provisioning() != Provisioning::EagerThick;
    let unmap = dst.provisioning() == Provisioning::Thin;
    let done = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let zeroed = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);

    let zero_out = |offset: u64, length: u64| {
        let (zeroed, skipped) = (&zeroed, &skipped);
        async move {
            if skip_zeros {
                skipped.fetch_add(length, Ordering::Relaxed);
                Ok(())
            } else {
                zeroed.fetch_add(length, Ordering::Relaxed);
                dst.write_zeroes(offset, length, unmap).await
            }
        }
    };

    // Pieces come lazily from block status, one batch of extents at a time.
    let pieces = stream::try_unfold(0u64, move |pos| async move {
        if pos >= size {
            return Ok::<_, Error>(None);
        }
        let extents = src.block_status(pos, size - pos).await?;
        let mut out = Vec::new();
        let mut end = pos;
        for e in extents {
            let zero = e.kind != ExtentKind::Data;
            let step = if zero { ZERO_CHUNK } else { CHUNK };
            let mut off = e.offset;
            while off < e.end() {
                // Cut at multiples of the step so chunks stay aligned.
                let stop = ((off / step + 1) * step).min(e.end());
                out.push(Piece {
                    offset: off,
                    length: stop - off,
                    zero,
                });
                off = stop;
            }
            end = e.end();
        }
        if end <= pos {
            return Err(Error::invalid(src.name(), "block status made no progress"));
        }
        Ok(Some((stream::iter(out.into_iter().map(Ok)), end)))
    })
    .try_flatten();

    pieces
        .map_ok(|p| {
            let (done, written) = (&done, &written);
            let zero_out = &zero_out;
            async move {
                if p.zero {
                    zero_out(p.offset, p.length).await?;
                } else {
                    let mut buf = vec![0u8; p.length as usize];
                    src.read(p.offset, &mut buf).await?;
                    if is_zero(&buf) {
                        zero_out(p.offset, p.length).await?;
                    } else {
                        dst.write(p.offset, &buf, WriteFlags::NONE).await?;
                        written.fetch_add(p.length, Ordering::Relaxed);
                    }
                }
                let d = done.fetch_add(p.length, Ordering::Relaxed) + p.length;
                progress(d, size);
                Ok::<_, Error>(())
            }
        })
        .try_buffer_unordered(opts.in_flight.max(1))
        .try_collect::<()>()
        .await?;
    // A target rounded up past the source's size gets zeros there too.
    if dst.size() > size {
        zero_out(size, dst.size() - size).await?;
    }

    dst.flush().await?;
    Ok(ConvertStats {
        bytes_total: size,
        bytes_written: written.into_inner(),
        bytes_zeroed: zeroed.into_inner(),
        bytes_skipped: skipped.into_inner(),
    })
}
