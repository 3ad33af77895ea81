//! [`Datastore`]: an opened datastore (its superblock, record I/O and clock), plus
//! formatting and the [`Observer`] that judges other hosts' liveness.
//!
//! Liveness is only ever judged by observation: a host is dead when *this* process has
//! seen its heartbeat slot unchanged for `host_dead` on its own monotonic clock. A fresh
//! observer therefore knows nobody is dead until it has watched that long.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::clock::{BootClock, Clock};
use crate::device::{Device, Faults, RecordIo};
use crate::format::{
    Block, Decoded, HostSlot, Owner, Profile, SlotState, Superblock, SUPER_A, SUPER_B,
};
use crate::{Error, Result};

/// An open datastore.
#[derive(Debug)]
pub struct Datastore {
    io: Arc<dyn RecordIo>,
    sb: Superblock,
    clock: Arc<dyn Clock>,
    fence: IoFence,
}

/// I/O fencing: the host lease's deadline on this datastore's clock. No write (record or
/// file data) is submitted at or after it, so a host that was frozen past its deadline
/// sends nothing when it wakes, whatever its threads were doing. The host lease moves the
/// deadline on with every good renewal; without a lease (format, read-only tools) writes
/// are not fenced.
#[derive(Debug)]
struct IoFence {
    /// Deadline in nanoseconds of the clock; `UNFENCED` without a lease, 0 once lost.
    deadline_ns: std::sync::atomic::AtomicU64,
}

const UNFENCED: u64 = u64::MAX;

/// What a device holds, as far as `create` is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    Ferry { label: String, uuid: Uuid },
    Other(&'static str),
}

/// Recognises a ferry datastore, a file system or a partition table at the start of a
/// device.
pub fn probe_signature(io: &dyn RecordIo) -> Result<Option<Signature>> {
    let mut head = Vec::with_capacity(16);
    for i in 0..16 {
        let mut b = Block::zeroed();
        io.read(i, &mut b)
            .map_err(|e| Error::io(io.path(), "read", e))?;
        head.push(b);
    }
    for copy in [SUPER_A, SUPER_B] {
        if let Decoded::Valid(sb) = Superblock::decode(&head[copy as usize]) {
            return Ok(Some(Signature::Ferry {
                label: sb.label,
                uuid: sb.uuid,
            }));
        }
    }
    let bytes: Vec<u8> = head.iter().flat_map(|b| b.0.iter().copied()).collect();
    let at = |off: usize, magic: &[u8]| bytes.get(off..off + magic.len()) == Some(magic);
    let sig = if at(1024 + 56, &[0x53, 0xef]) {
        Some("an ext2/3/4 file system")
    } else if at(0, b"XFSB") {
        Some("an XFS file system")
    } else if at(65536 + 64, b"_BHRfS_M") {
        Some("a Btrfs file system")
    } else if at(4096 - 10, b"SWAPSPACE2") {
        Some("a swap area")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS volume")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(0, b"QFI\xfb") {
        Some("a qcow2 image")
    } else if at(510, &[0x55, 0xaa]) {
        Some("a DOS partition table or boot sector")
    } else {
        None
    };
    Ok(sig.map(Signature::Other))
}

/// Reads the superblock from whichever copy is good, rewriting a damaged copy from it.
fn load_superblock(io: &dyn RecordIo) -> Result<Superblock> {
    let read = |idx| {
        let mut b = Block::zeroed();
        io.read(idx, &mut b).map(|_| Superblock::decode(&b))
    };
    let a = read(SUPER_A).map_err(|e| Error::io(io.path(), "read", e))?;
    let b = read(SUPER_B).map_err(|e| Error::io(io.path(), "read", e))?;
    let sb = match (&a, &b) {
        (Decoded::Valid(x), _) | (_, Decoded::Valid(x)) => x.clone(),
        _ => {
            let what = match probe_signature(io)? {
                Some(Signature::Other(w)) => format!(" (it holds {w})"),
                _ => String::new(),
            };
            return Err(Error::NotDatastore {
                object: io.path().to_path_buf(),
                detail: what,
            });
        }
    };
    for (copy, dec) in [(SUPER_A, &a), (SUPER_B, &b)] {
        if !matches!(dec, Decoded::Valid(x) if *x == sb) {
            tracing::warn!(
                "{}: superblock copy {copy} is damaged; rewriting it from the other",
                io.path().display()
            );
            io.write(copy, &sb.encode(1))
                .map_err(|e| Error::io(io.path(), "repair superblock", e))?;
        }
    }
    Ok(sb)
}

impl Datastore {
    /// Formats `io` as a new datastore.
    pub fn format(
        io: &dyn RecordIo,
        size: u64,
        label: &str,
        max_hosts: u32,
        profile: Profile,
    ) -> Result<Superblock> {
        let sb = Superblock::layout(Uuid::new_v4(), label, size, max_hosts, profile);
        sb.check_timing().map_err(|e| Error::Invalid {
            object: io.path().to_path_buf(),
            detail: format!("timing profile {profile:?} breaks a safety rule: {e}"),
        })?;
        if sb.block_count == 0 {
            return Err(Error::Invalid {
                object: io.path().to_path_buf(),
                detail: format!(
                    "is too small: {size} bytes, the metadata alone takes {}",
                    sb.metadata_bytes()
                ),
            });
        }
        // Clear every metadata record, then write the superblocks last: a crash mid-way
        // leaves no superblock, so a half-formatted device is never taken for a datastore.
        io.write_zeros(0, sb.data_start)
            .map_err(|e| Error::io(io.path(), "format", e))?;
        io.write(
            sb.desc_start,
            &crate::filerec::Descriptor::root().encode(&sb.uuid, 1),
        )
        .map_err(|e| Error::io(io.path(), "format", e))?;
        for copy in [SUPER_B, SUPER_A] {
            io.write(copy, &sb.encode(1))
                .map_err(|e| Error::io(io.path(), "format", e))?;
        }
        Ok(sb)
    }

    /// Opens the datastore on a device path. Under the test setting `renew-delay-ms`
    /// ([`crate::failpoint`]) every heartbeat write is that much slower once the host
    /// lease has joined, as on a failing device.
    pub fn open(path: &Path) -> Result<Datastore> {
        let dev = Device::open(path)?;
        let Some(delay) = crate::failpoint::setting("renew-delay-ms").filter(|d| *d > 0) else {
            return Self::open_with(Arc::new(dev), Arc::new(BootClock));
        };
        let sb = load_superblock(&dev)?;
        let range = sb.hb_start..sb.hb_start + sb.max_hosts as u64;
        let io = Faults::new(dev, Duration::from_millis(delay), range);
        Self::open_with(Arc::new(io), Arc::new(BootClock))
    }

    /// Opens over any record I/O and clock.
    pub fn open_with(io: Arc<dyn RecordIo>, clock: Arc<dyn Clock>) -> Result<Datastore> {
        let sb = load_superblock(io.as_ref())?;
        sb.check_timing().map_err(|e| Error::Invalid {
            object: io.path().to_path_buf(),
            detail: format!(
                "the superblock's timings break a safety rule ({e}); this datastore cannot be \
                 used safely: re-create it with a standard profile"
            ),
        })?;
        Ok(Datastore {
            io,
            sb,
            clock,
            fence: IoFence {
                deadline_ns: std::sync::atomic::AtomicU64::new(UNFENCED),
            },
        })
    }

    /// Sets the write deadline (the host lease does, after every good renewal); `None`
    /// lifts it (no lease held).
    pub fn set_write_deadline(&self, deadline: Option<Duration>) {
        let ns = deadline.map_or(UNFENCED, |d| (d.as_nanos() as u64).min(UNFENCED - 1));
        self.fence
            .deadline_ns
            .store(ns, std::sync::atomic::Ordering::SeqCst);
    }

    /// The write deadline, if a lease sets one.
    pub fn write_deadline(&self) -> Option<Duration> {
        match self
            .fence
            .deadline_ns
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            UNFENCED => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// Fails unless a write submitted now is before the host lease's deadline and before
    /// `by` (a caller's own limit). Called immediately before every submission.
    pub fn check_write(&self, by: Option<Duration>) -> Result<()> {
        let limit = match (self.write_deadline(), by) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(x) => x,
                None => return Ok(()),
            },
        };
        let now = self.clock.now();
        if now >= limit {
            return Err(Error::LeaseLost {
                object: self.io.path().to_path_buf(),
                detail: format!(
                    "write refused: {:.3}s past the host lease deadline (I/O fencing)",
                    (now - limit).as_secs_f64()
                ),
            });
        }
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn uuid(&self) -> &Uuid {
        &self.sb.uuid
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn path(&self) -> &Path {
        self.io.path()
    }

    /// Reads `n` consecutive records from `start`.
    pub fn read_many(&self, start: u64, n: u64) -> Result<Vec<Box<Block>>> {
        self.io
            .read_many(start, n)
            .map_err(|e| Error::io(self.io.path(), "read", e))
    }

    /// Writes `blocks` to consecutive records from `start` (one system call per MiB).
    pub fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> Result<()> {
        self.check_write(None)?;
        self.io
            .write_many(start, blocks)
            .map_err(|e| Error::io(self.io.path(), "write", e))
    }

    /// Reads one record.
    pub fn read(&self, idx: u64) -> Result<Box<Block>> {
        let mut b = Block::zeroed();
        self.io
            .read(idx, &mut b)
            .map_err(|e| Error::io(self.io.path(), "read", e))?;
        Ok(b)
    }

    /// Turns on injected faults (tests; see [`Datastore::open`]).
    pub fn arm_faults(&self) {
        self.io.arm_faults();
    }

    /// Writes one record (refused past the host lease deadline).
    pub fn write(&self, idx: u64, b: &Block) -> Result<()> {
        self.write_before(idx, b, None)
    }

    /// Writes one record if it can be submitted before `by` as well as before the host
    /// lease deadline.
    pub fn write_before(&self, idx: u64, b: &Block, by: Option<Duration>) -> Result<()> {
        self.check_write(by)?;
        self.io
            .write(idx, b)
            .map_err(|e| Error::io(self.io.path(), "write", e))
    }

    /// Record index of host `host_id`'s heartbeat slot.
    pub fn slot_rec(&self, host_id: u32) -> u64 {
        self.sb.hb_start + host_id as u64 - 1
    }

    /// Reads host `host_id`'s slot.
    pub fn read_slot(&self, host_id: u32) -> Result<Decoded<HostSlot>> {
        Ok(HostSlot::decode(
            &*self.read(self.slot_rec(host_id))?,
            self.uuid(),
        ))
    }
}

/// Liveness of one heartbeat slot as this observer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Never used or left cleanly.
    Free,
    /// Joined and renewed within `host_dead` (or not yet watched that long).
    Live,
    /// Joined, and seen unchanged for at least `host_dead`.
    Dead,
    /// The record cannot be read as a slot (torn, or being written): treated as live,
    /// never as free, until it has stayed the same for `host_dead` (then `Dead`).
    Unknown,
}

/// One slot as seen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotView {
    pub host_id: u32,
    pub slot: Option<HostSlot>,
    pub liveness: Liveness,
    /// How long this observer has seen the slot unchanged.
    pub unchanged_ms: u64,
}

#[derive(Debug, Clone)]
struct Seen {
    /// The slot's whole record as last read. (Not a CRC of it: a record carries the
    /// crc32c of its other bytes in its last four, so the crc32c of every valid record
    /// is one and the same constant, and would never show a renewal.)
    content: Box<Block>,
    since: Duration,
}

/// Tracks every slot's last content and since when it has not changed.
#[derive(Debug)]
pub struct Observer {
    seen: Vec<Option<Seen>>,
    views: Vec<SlotView>,
    /// Per slot: (generation, liveness) at which its journal was last found finished.
    journal_checked: Vec<Option<(u64, Liveness)>>,
}

impl Observer {
    pub fn new(ds: &Datastore) -> Observer {
        Observer {
            seen: vec![None; ds.sb.max_hosts as usize],
            views: Vec::new(),
            journal_checked: vec![None; ds.sb.max_hosts as usize],
        }
    }

    /// Reads every slot once and updates what was seen.
    pub fn observe(&mut self, ds: &Datastore) -> Result<&[SlotView]> {
        let host_dead = ds.sb.host_dead();
        let mut views = Vec::with_capacity(self.seen.len());
        // The clock is read on both sides of the read. A content seen for the first time
        // counts from *after* the read (it was written no later than that); the time it
        // has stayed unchanged runs up to *before* the read (the slot held it at least
        // until the read began). This process may be stopped on either side: each stall
        // only makes a host look live longer, never dead sooner.
        let before = ds.clock.now();
        // One read of the whole heartbeat region.
        let slots = ds.read_many(ds.slot_rec(1), self.seen.len() as u64)?;
        let after = ds.clock.now();
        for (i, raw) in slots.into_iter().enumerate() {
            let host_id = i as u32 + 1;
            let seen = match &mut self.seen[i] {
                Some(s) if s.content.0 == raw.0 => s,
                other => other.insert(Seen {
                    content: raw.clone(),
                    since: after,
                }),
            };
            let unchanged = before.saturating_sub(seen.since);
            let (slot, liveness) = match HostSlot::decode(&raw, ds.uuid()) {
                Decoded::Blank => (None, Liveness::Free),
                // A torn record nobody rewrites (its writer crashed mid-write) is dead
                // once unchanged for host_dead, like any slot nobody renews.
                Decoded::Unknown(_) if unchanged >= host_dead => (None, Liveness::Dead),
                Decoded::Unknown(_) => (None, Liveness::Unknown),
                Decoded::Valid(s) => {
                    let l = match s.state {
                        SlotState::Free => Liveness::Free,
                        SlotState::Joined if unchanged >= host_dead => Liveness::Dead,
                        SlotState::Joined => Liveness::Live,
                    };
                    (Some(s), l)
                }
            };
            views.push(SlotView {
                host_id,
                slot,
                liveness,
                unchanged_ms: unchanged.as_millis() as u64,
            });
        }
        self.views = views;
        Ok(&self.views)
    }

    /// The (generation, liveness) at which `host_id`'s journal was last found finished.
    pub fn journal_checked(&self, host_id: u32) -> Option<(u64, Liveness)> {
        self.journal_checked[host_id as usize - 1]
    }

    pub fn set_journal_checked(&mut self, host_id: u32, key: (u64, Liveness)) {
        self.journal_checked[host_id as usize - 1] = Some(key);
    }

    /// The whole record last seen in `host_id`'s slot: a slot judged free or dead is
    /// taken only while it still holds exactly this.
    pub fn seen_record(&self, host_id: u32) -> Option<&Block> {
        self.seen
            .get(host_id as usize - 1)?
            .as_ref()
            .map(|s| &*s.content)
    }

    /// The last observation.
    pub fn views(&self) -> &[SlotView] {
        &self.views
    }

    /// Whether `owner` holds a live host lease in the last observation: its slot is
    /// joined, not dead, and not yet taken by a later incarnation. Unknown slots count as
    /// live.
    ///
    /// A live slot showing an *older* generation than the owner's keeps the owner valid:
    /// that is a joiner's delayed write (it read the slot long ago, was held up, and wrote
    /// the generation it computed then) landing on the owner's slot. The owner notices the
    /// foreign incarnation at its next renewal and stops; once nobody renews the slot it
    /// goes dead like any other. Generations only grow, so a newer incarnation always
    /// shows a higher one.
    pub fn owner_valid(&self, owner: Owner) -> bool {
        let Some(v) = self.views.get(owner.host_id as usize - 1) else {
            return false;
        };
        match v.liveness {
            Liveness::Unknown => true,
            Liveness::Live => v
                .slot
                .as_ref()
                .is_some_and(|s| s.host_generation <= owner.generation),
            Liveness::Free | Liveness::Dead => false,
        }
    }
}
