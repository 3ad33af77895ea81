//! Read-only whole-device operations: extent maps, content comparison and hashing.
//!
//! All of them walk the device by block status so ranges known to read as zeros are never
//! read, and read data in [`CHUNK`]-sized pieces with several in flight.

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::blockdev::{BlockDev, Extent};
use crate::convert::CHUNK;
use crate::zero::is_zero;
use crate::{Error, Result};

const IN_FLIGHT: usize = 8;

/// Every extent of `dev` from `0` to its size, adjacent extents of one kind merged.
pub async fn extents(dev: &dyn BlockDev) -> Result<Vec<Extent>> {
    extents_in(dev, 0, dev.size()).await
}

/// The extents of `offset..offset+length`, merged.
pub async fn extents_in(dev: &dyn BlockDev, offset: u64, length: u64) -> Result<Vec<Extent>> {
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let batch = dev.block_status(pos, end - pos).await?;
        let Some(last) = batch.last() else {
            return Err(Error::invalid(dev.name(), "block status returned nothing"));
        };
        let next = last.end().min(end);
        if next <= pos {
            return Err(Error::invalid(dev.name(), "block status made no progress"));
        }
        for e in batch {
            match out.last_mut() {
                Some(prev) if prev.kind == e.kind && prev.end() == e.offset => {
                    prev.length += e.length
                }
                _ => out.push(e),
            }
        }
        pos = next;
    }
    Ok(out)
}

/// Pieces of at most `CHUNK` bytes over `0..len`.
fn chunks(len: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(CHUNK)).map(move |i| {
        let off = i * CHUNK;
        (off, CHUNK.min(len - off))
    })
}

/// Reads a piece, or `None` if block status says it reads as zeros.
async fn read_piece(dev: &dyn BlockDev, off: u64, len: u64) -> Result<Option<Vec<u8>>> {
    let ext = dev.block_status(off, len).await?;
    if ext.iter().all(|e| e.kind.reads_zero()) && ext.last().is_some_and(|e| e.end() >= off + len) {
        return Ok(None);
    }
    let mut buf = vec![0u8; len as usize];
    dev.read(off, &mut buf).await?;
    Ok(Some(buf))
}

/// Outcome of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Comparison {
    /// Same content; `size_mismatch` when one is longer but only by zeros.
    Identical { size_mismatch: bool },
    /// The first differing offset (rounded down to 512 bytes, as `qemu-img compare`).
    Different { offset: u64, size_mismatch: bool },
}

/// Compares the guest-visible content of two devices.
pub async fn compare(a: &dyn BlockDev, b: &dyn BlockDev) -> Result<Comparison> {
    let common = a.size().min(b.size());
    let size_mismatch = a.size() != b.size();
    let mut results = stream::iter(chunks(common))
        .map(|(off, len)| async move {
            let (x, y) = futures::try_join!(read_piece(a, off, len), read_piece(b, off, len))?;
            let first = match (x, y) {
                (None, None) => None,
                (Some(x), None) | (None, Some(x)) => x.iter().position(|&v| v != 0),
                (Some(x), Some(y)) => x.iter().zip(&y).position(|(p, q)| p != q),
            };
            Ok::<_, Error>(first.map(|i| off + i as u64))
        })
        .buffered(IN_FLIGHT);
    while let Some(r) = results.try_next().await? {
        if let Some(offset) = r {
            return Ok(Comparison::Different {
                offset: offset / 512 * 512,
                size_mismatch,
            });
        }
    }
    // The longer device must read as zeros past the shorter one's end.
    let longer = if a.size() > b.size() { a } else { b };
    for e in extents_in(longer, common, longer.size() - common).await? {
        if e.kind.reads_zero() {
            continue;
        }
        let mut off = e.offset;
        while off < e.end() {
            let len = CHUNK.min(e.end() - off);
            let mut buf = vec![0u8; len as usize];
            longer.read(off, &mut buf).await?;
            if let Some(i) = buf.iter().position(|&v| v != 0) {
                return Ok(Comparison::Different {
                    offset: (off + i as u64) / 512 * 512,
                    size_mismatch,
                });
            }
            off += len;
        }
    }
    Ok(Comparison::Identical { size_mismatch })
}

/// blake3 of the guest-visible content (identical for any format holding the same bytes).
pub async fn hash(dev: &dyn BlockDev) -> Result<blake3::Hash> {
    let zeros = vec![0u8; CHUNK as usize];
    let mut hasher = blake3::Hasher::new();
    let mut pieces = stream::iter(chunks(dev.size()))
        .map(|(off, len)| read_piece(dev, off, len).map_ok(move |p| (p, len)))
        .buffered(IN_FLIGHT);
    while let Some((piece, len)) = pieces.try_next().await? {
        match piece {
            Some(buf) if !is_zero(&buf) => hasher.update(&buf),
            _ => hasher.update(&zeros[..len as usize]),
        };
    }
    Ok(hasher.finalize())
}

use futures::TryFutureExt;
