//! Raw images: a regular file or a block device whose bytes are the guest's bytes.
//!
//! Provisioning of a raw file is a property of its allocation, detected at open:
//! - thin: sparse; block status from `SEEK_DATA`/`SEEK_HOLE`; discard punches holes;
//! - lazy-thick: fully allocated with unwritten extents (`fallocate`), reads zeros;
//! - eager-thick: fully allocated and zero-filled at create.
//!
//! Zeroing keeps a thick file thick (`FALLOC_FL_ZERO_RANGE`, or real zero writes for
//! eager-thick); only a thin file gives space back. Block devices (a loop device with
//! `--direct-io=on`, a LUN) are reported as lazy-thick: fully allocated, nothing to punch
//! but the device's own discard, which `fallocate(PUNCH_HOLE)` turns into guaranteed zeros.

use std::path::Path;

use crate::blockdev::{
    check_range, BlockDev, Extent, ExtentKind, IoFuture, Provisioning, WriteFlags,
};
use crate::engine::Engine;
use crate::file::{DirectFile, OpenMode};
use crate::{sys, Error, Result};

/// Most extents one `block_status` call returns.
const MAX_EXTENTS: usize = 4096;

/// A raw image file or block device.
#[derive(Debug)]
pub struct RawImage {
    file: DirectFile,
    size: u64,
    provisioning: Provisioning,
}

impl RawImage {
    /// Creates a raw image file of `size` bytes with the given provisioning.
    ///
    /// With `prefill` false an eager-thick image is allocated but not yet zero-filled:
    /// the caller promises to write every byte (conversion does, zeros included).
    pub async fn create(
        path: &Path,
        size: u64,
        provisioning: Provisioning,
        prefill: bool,
        overwrite: bool,
        engine: Engine,
    ) -> Result<RawImage> {
        if !size.is_multiple_of(512) {
            return Err(Error::invalid(
                path,
                format!("size {size} is not a multiple of 512 bytes"),
            ));
        }
        if std::fs::metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        }) {
            return Err(Error::invalid(
                path,
                "is a block device: create makes image files (convert can write to a device)",
            ));
        }
        let mode = if overwrite {
            OpenMode::CreateTruncate
        } else {
            OpenMode::CreateNew
        };
        let file = DirectFile::open(path, mode, engine)?;
        file.set_len(size)?;
        match provisioning {
            Provisioning::Thin => {}
            Provisioning::LazyThick => preallocate(&file, size).await?,
            Provisioning::EagerThick => {
                preallocate(&file, size).await?;
                if prefill {
                    file.write_zero_data(0, size).await?;
                }
            }
        }
        file.sync().await?;
        Ok(RawImage {
            file,
            size,
            provisioning,
        })
    }

    /// Opens an existing raw file or block device.
    pub fn open(path: &Path, writable: bool, engine: Engine) -> Result<RawImage> {
        let mode = if writable {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        let file = DirectFile::open(path, mode, engine)?;
        // A guest sees whole sectors: a file whose length is not a multiple of 512 shows
        // a virtual size rounded up, the tail reading as zeros (as QEMU shows it).
        let size = file.len().div_ceil(512) * 512;
        let provisioning = detect_provisioning(&file)?;
        Ok(RawImage {
            file,
            size,
            provisioning,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &DirectFile {
        &self.file
    }

    /// Bytes allocated on the host.
    pub fn allocated_bytes(&self) -> Result<u64> {
        self.file.allocated_bytes()
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.file.path(), self.size, offset, len)?;
        if !self.file.writable() {
            return Err(Error::invalid(self.file.path(), "is open read-only"));
        }
        // Writing the partial last block of a file whose length is not a multiple of the
        // direct-I/O alignment would grow the file: refuse it.
        let align = self.file.align() as u64;
        let flen = self.file.len();
        if !self.file.is_blockdev()
            && !flen.is_multiple_of(align)
            && offset + len > flen / align * align
        {
            return Err(Error::invalid(
                self.file.path(),
                format!(
                    "cannot write the last partial block: the file is {flen} bytes, not a \
                     multiple of {align}; resize it with `qemu-img resize`"
                ),
            ));
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let f = &self.file;
        let a = f.align() as u64;
        let end = offset + len;
        let (ms, me) = (offset.div_ceil(a) * a, end / a * a);
        if ms >= me {
            return f.write_at(offset, &vec![0u8; len as usize], false).await;
        }
        if offset < ms {
            f.write_at(offset, &vec![0u8; (ms - offset) as usize], false)
                .await?;
        }
        if me < end {
            f.write_at(me, &vec![0u8; (end - me) as usize], false)
                .await?;
        }
        let unmap = may_unmap && (self.provisioning == Provisioning::Thin || f.is_blockdev());
        let mode = if self.provisioning == Provisioning::EagerThick && !f.is_blockdev() {
            None
        } else if unmap {
            Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        } else {
            Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
        };
        if let Some(mode) = mode {
            match f.fallocate(mode, ms, me - ms).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == crate::ErrorKind::Unsupported => {}
                Err(e) => return Err(e),
            }
        }
        f.write_zero_data(ms, me - ms).await
    }
}

async fn preallocate(file: &DirectFile, size: u64) -> Result<()> {
    if size == 0 {
        return Ok(());
    }
    file.fallocate(0, 0, size).await.map_err(|e| {
        if e.kind() == crate::ErrorKind::Unsupported {
            Error::unsupported(
                file.path(),
                "preallocation on this file system",
                "use --provisioning thin",
            )
        } else {
            e
        }
    })
}

fn detect_provisioning(file: &DirectFile) -> Result<Provisioning> {
    if file.is_blockdev() {
        return Ok(Provisioning::LazyThick);
    }
    let size = file.len();
    if size == 0 || file.allocated_bytes()? < size {
        return Ok(Provisioning::Thin);
    }
    thick_kind(file)
}

/// Lazy- or eager-thick: a fully allocated file is lazy while it holds preallocated,
/// never-written extents. (FIEMAP, not SEEK_HOLE: ext4 reports unwritten extents that
/// sit in the page cache as data.)
pub(crate) fn thick_kind(file: &DirectFile) -> Result<Provisioning> {
    let unwritten = match sys::unwritten_bytes(file.fd(), file.len()) {
        Ok(n) => n,
        // No FIEMAP (tmpfs, some network file systems): unwritten extents, if the file
        // system has them, show up as holes.
        Err(_) => match sys::seek_data_hole(file.fd(), 0, false) {
            Ok(Some(h)) if h < file.len() => 1,
            _ => 0,
        },
    };
    Ok(if unwritten > 0 {
        Provisioning::LazyThick
    } else {
        Provisioning::EagerThick
    })
}

impl BlockDev for RawImage {
    fn name(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_block_size(&self) -> u32 {
        self.file.align()
    }

    fn physical_block_size(&self) -> u32 {
        self.file.physical_block_size()
    }

    fn writable(&self) -> bool {
        self.file.writable()
    }

    fn provisioning(&self) -> Provisioning {
        self.provisioning
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        Box::pin(async move {
            check_range(self.file.path(), self.size, offset, buf.len() as u64)?;
            self.file.read_at(offset, buf).await
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            self.check_write(offset, buf.len() as u64)?;
            self.file.write_at(offset, buf, flags.fua).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.file.sync())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.zero(offset, length, may_unmap))
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zero(offset, length, true))
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(self.file.path(), self.size, offset, length)?;
            let end = offset + length;
            if self.file.is_blockdev() || length == 0 {
                return Ok(vec![Extent {
                    offset,
                    length,
                    kind: ExtentKind::Data,
                }]);
            }
            let unallocated = if self.provisioning == Provisioning::Thin {
                ExtentKind::Hole
            } else {
                ExtentKind::Zero
            };
            let seek = |pos, data| {
                sys::seek_data_hole(self.file.fd(), pos, data)
                    .map_err(|e| Error::io(self.file.path(), "map", pos, e))
            };
            let mut out: Vec<Extent> = Vec::new();
            let mut push = |start: u64, stop: u64, kind| {
                if stop > start {
                    out.push(Extent {
                        offset: start,
                        length: stop - start,
                        kind,
                    });
                }
            };
            let mut pos = offset;
            let mut count = 0;
            while pos < end && count < MAX_EXTENTS {
                let data = seek(pos, true)?.unwrap_or(end).min(end);
                push(pos, data, unallocated);
                if data >= end {
                    break;
                }
                let hole = seek(data, false)?.unwrap_or(end).min(end);
                push(data, hole, ExtentKind::Data);
                pos = hole;
                count += 2;
            }
            Ok(out)
        })
    }
}
