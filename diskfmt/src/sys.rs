//! Thin wrappers over the Linux system calls the block layer needs that std does not offer:
//! block-device ioctls, `fallocate`, `lseek(SEEK_DATA/SEEK_HOLE)`, positional I/O on raw
//! pointers (for the pread engine), `eventfd`, `statx` direct-I/O alignment and the
//! logical block size of the device under a file (sysfs).
//!
//! All `unsafe` of the crate outside the io_uring submission path lives here; each
//! function is safe to call and upholds the syscall's contract itself.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: i64) -> io::Result<u64> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as u64)
    }
}

// _IOR(0x12, 114, size_t), _IO(0x12, 104), _IO(0x12, 123)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// Size in bytes of a block device.
pub fn blkdev_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical and physical sector size of a block device.
pub fn blkdev_sector_sizes(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live int.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut logical as *mut libc::c_int) })?;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which is live.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            BLKPBSZGET,
            &mut physical as *mut libc::c_uint,
        )
    })?;
    Ok((logical as u32, physical))
}

/// The direct-I/O offset alignment of a regular file (`statx` `STATX_DIOALIGN`), if the
/// kernel and file system report it.
pub fn dio_offset_align(fd: BorrowedFd<'_>) -> Option<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx
    // describe `fd` itself, and `stx` is a live, writable statx buffer.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        Some(stx.stx_dio_offset_align)
    } else {
        None
    }
}

/// The logical block size of block device `dev` (a file's `st_dev`), from sysfs; for a
/// partition, its disk's. `None` when `dev` is no block device (NFS, FUSE, tmpfs, btrfs
/// and overlay file systems have anonymous devices).
pub fn dev_logical_block_size(dev: u64) -> Option<u32> {
    let base = format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let read = |p: String| -> Option<u32> {
        let v = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
        (v >= 512 && u32::is_power_of_two(v)).then_some(v)
    };
    read(format!("{base}/queue/logical_block_size"))
        .or_else(|| read(format!("{base}/../queue/logical_block_size")))
}

/// `fallocate(2)`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate takes only integers and a valid descriptor.
        let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// Where the next data (`data == true`) or hole starts at or after `offset`;
/// `None` when there is no more data (ENXIO).
pub fn seek_data_hole(fd: BorrowedFd<'_>, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    // SAFETY: lseek takes only integers and a valid descriptor.
    match cvt_long(unsafe { libc::lseek(fd.as_raw_fd(), offset as i64, whence) }) {
        Ok(pos) => Ok(Some(pos)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `pread(2)` into raw memory.
///
/// # Safety
/// `buf..buf+len` must be valid for writes and not otherwise accessed during the call.
pub unsafe fn pread(fd: RawFd, buf: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees the memory range; fd is a plain integer.
        let ret = unsafe { libc::pread(fd, buf.cast(), len, offset as i64) };
        match cvt_long(ret as i64) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// `pwritev2(2)` of raw memory, with `RWF_DSYNC` when `dsync`.
///
/// # Safety
/// `buf..buf+len` must be valid for reads during the call.
pub unsafe fn pwrite(
    fd: RawFd,
    buf: *const u8,
    len: usize,
    offset: u64,
    dsync: bool,
) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf as *mut libc::c_void,
        iov_len: len,
    };
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    loop {
        // SAFETY: the iovec describes memory the caller guarantees is readable.
        let ret = unsafe { libc::pwritev2(fd, &iov, 1, offset as i64, flags) };
        match cvt_long(ret as i64) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// `fsync(2)` or `fdatasync(2)`.
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    loop {
        // SAFETY: takes only a descriptor.
        let ret = unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes only integers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd counter (wakes a poller).
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) still leaves the fd
    // readable, which is all a wake-up needs, so the result is ignored.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd counter.
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; EAGAIN (already zero) is fine.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap), a 32-byte header.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
const FIEMAP_BATCH: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    _reserved64: [u64; 2],
    flags: u32,
    _reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    _reserved: u32,
    extents: [FiemapExtent; FIEMAP_BATCH],
}

/// Bytes of a regular file held in allocated-but-unwritten extents (preallocated space
/// that reads as zeros), from `FS_IOC_FIEMAP`.
pub fn unwritten_bytes(fd: BorrowedFd<'_>, len: u64) -> io::Result<u64> {
    let mut total = 0;
    let mut pos = 0;
    while pos < len {
        let mut fm = Fiemap {
            start: pos,
            length: len - pos,
            flags: 0,
            mapped_extents: 0,
            extent_count: FIEMAP_BATCH as u32,
            _reserved: 0,
            extents: [FiemapExtent::default(); FIEMAP_BATCH],
        };
        // SAFETY: `fm` is a live fiemap header followed by room for `extent_count` extents,
        // exactly what FS_IOC_FIEMAP reads and fills.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP, &mut fm as *mut Fiemap) })?;
        let n = (fm.mapped_extents as usize).min(FIEMAP_BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &fm.extents[..n] {
            if e.flags & FIEMAP_EXTENT_UNWRITTEN != 0 {
                total += e.length;
            }
            pos = e.logical + e.length;
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        if last {
            break;
        }
    }
    Ok(total)
}
