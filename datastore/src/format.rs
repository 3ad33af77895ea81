//! The on-disk format: region layout and the fixed-size records that live in it.
//!
//! Every record is one 4 KiB block (a "record"), written with a single `O_DIRECT` write,
//! which the design assumes atomic. All integers are little-endian. Each record starts
//! with a common header (magic, format version, record generation, datastore uuid) and
//! ends with a crc32c of everything before it. A record whose magic or checksum is wrong
//! decodes as [`Decoded::Unknown`], never as a free record: callers must treat unknown as
//! "held by someone", not "available". `docs/datastore-format.md` has the byte diagrams.

use uuid::Uuid;

/// Size of every metadata record: one 4 KiB block, also on 512-byte-sector devices.
pub const RECORD: usize = 4096;
/// On-disk format version.
pub const VERSION: u16 = 1;

/// Record magics (ASCII, little-endian u32).
pub const MAGIC_SUPER: u32 = u32::from_le_bytes(*b"FYSB");
pub const MAGIC_HOST: u32 = u32::from_le_bytes(*b"FYHB");
pub const MAGIC_LEADER: u32 = u32::from_le_bytes(*b"FYLD");
pub const MAGIC_BALLOT: u32 = u32::from_le_bytes(*b"FYDB");
pub const MAGIC_LOCK: u32 = u32::from_le_bytes(*b"FYLK");

// Common header.
const OFF_MAGIC: usize = 0; // u32
const OFF_VERSION: usize = 4; // u16
const OFF_KIND: usize = 6; // u16, reserved (0)
pub(crate) const OFF_GENERATION: usize = 8; // u64
/// Where every record holds its datastore's uuid ([u8; 16]).
pub const OFF_UUID: usize = 16;
/// First payload byte.
pub const PAYLOAD: usize = 32;
pub(crate) const OFF_CRC: usize = RECORD - 4; // u32, crc32c of bytes 0..OFF_CRC

// Where each record keeps each of its fields (`fields`), named for the code, the
// tests and the fuzz targets alike.
mod fields;
pub use fields::{ballot, leader, lock, sb, slot};

/// Record index of superblock copy A and B.
pub const SUPER_A: u64 = 0;
pub const SUPER_B: u64 = 1;
/// First record of the heartbeat region (64 KiB into the device).
pub const HB_START: u64 = 16;
/// Most hosts a datastore can have.
pub const MAX_HOSTS: u32 = 64;
/// Lock records per datastore by default.
pub const DEFAULT_LOCKS: u32 = 1024;
/// Per-host journal size, in records (1 MiB).
pub const JOURNAL_RECORDS: u64 = 256;
/// File descriptors (files and folders) per datastore by default.
pub const DEFAULT_FILES: u32 = 1024;
/// Size of a file block, the unit of space allocation.
pub const BLOCK: u64 = 1 << 20;
/// Records per file block.
pub const RECORDS_PER_BLOCK: u64 = BLOCK / RECORD as u64;
/// Most file blocks in one resource cluster (its bitmap fits one record).
pub const MAX_CLUSTER_BLOCKS: u32 = 16384;
/// Data area alignment (1 MiB file blocks), in records.
pub const DATA_ALIGN: u64 = 256;
/// Longest datastore label, host name, object name, address.
pub const MAX_LABEL: usize = 64;
pub const MAX_NAME: usize = 64;
pub const MAX_OBJECT: usize = 255;
pub const MAX_ADDR: usize = 64;

/// One record's bytes, aligned for `O_DIRECT`.
#[repr(C, align(4096))]
#[derive(Clone)]
pub struct Block(pub [u8; RECORD]);

impl Block {
    pub fn zeroed() -> Box<Block> {
        Box::new(Block([0u8; RECORD]))
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Block({:08x}…)", u32le(&self.0, 0))
    }
}

pub(crate) fn u16le(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
pub(crate) fn u32le(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64le(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
pub(crate) fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A length-prefixed UTF-8 string field: u8 length then bytes, `cap` bytes at most.
pub(crate) fn put_str(b: &mut [u8], o: usize, s: &str, cap: usize) {
    let n = s.len().min(cap);
    b[o] = n as u8;
    b[o + 1..o + 1 + n].copy_from_slice(&s.as_bytes()[..n]);
}
pub(crate) fn get_str(b: &[u8], o: usize, cap: usize) -> Option<String> {
    let n = b[o] as usize;
    if n > cap {
        return None;
    }
    std::str::from_utf8(&b[o + 1..o + 1 + n])
        .ok()
        .map(str::to_string)
}

/// The outcome of decoding a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// All zeros: never written.
    Blank,
    /// Valid.
    Valid(T),
    /// Wrong magic, version, uuid or checksum: contents unknown.
    Unknown(&'static str),
}

/// Seals a record: header fields and checksum.
pub(crate) fn seal(b: &mut Block, magic: u32, generation: u64, uuid: &Uuid) {
    put32(&mut b.0, OFF_MAGIC, magic);
    put16(&mut b.0, OFF_VERSION, VERSION);
    put16(&mut b.0, OFF_KIND, 0);
    put64(&mut b.0, OFF_GENERATION, generation);
    b.0[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid.as_bytes());
    let crc = crc32c::crc32c(&b.0[..OFF_CRC]);
    put32(&mut b.0, OFF_CRC, crc);
}

/// Checks a record's header; `uuid` None accepts any datastore (used for the superblock).
pub(crate) fn open(b: &Block, magic: u32, uuid: Option<&Uuid>) -> Result<u64, Decoded<()>> {
    if b.0.iter().all(|&x| x == 0) {
        return Err(Decoded::Blank);
    }
    if u32le(&b.0, OFF_MAGIC) != magic {
        return Err(Decoded::Unknown("wrong magic"));
    }
    if crc32c::crc32c(&b.0[..OFF_CRC]) != u32le(&b.0, OFF_CRC) {
        return Err(Decoded::Unknown("bad checksum"));
    }
    if u16le(&b.0, OFF_VERSION) != VERSION {
        return Err(Decoded::Unknown("unsupported format version"));
    }
    if let Some(u) = uuid {
        if &b.0[OFF_UUID..OFF_UUID + 16] != u.as_bytes() {
            return Err(Decoded::Unknown("record of another datastore"));
        }
    }
    Ok(u64le(&b.0, OFF_GENERATION))
}

pub(crate) fn fail<T>(e: Decoded<()>) -> Decoded<T> {
    match e {
        Decoded::Blank => Decoded::Blank,
        Decoded::Unknown(m) => Decoded::Unknown(m),
        Decoded::Valid(()) => unreachable!("open never fails with Valid"),
    }
}

/// Timing profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// io_timeout 10 s (host_dead ≈ 140 s).
    Production,
    /// io_timeout 1 s (host_dead ≈ 14 s), for tests.
    Test,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "production" => Ok(Profile::Production),
            "test" => Ok(Profile::Test),
            _ => Err(format!("unknown profile {s:?}: use production or test")),
        }
    }
}

impl Profile {
    fn code(self) -> u8 {
        match self {
            Profile::Production => 1,
            Profile::Test => 2,
        }
    }
    fn from_code(c: u8) -> Option<Profile> {
        match c {
            1 => Some(Profile::Production),
            2 => Some(Profile::Test),
            _ => None,
        }
    }
}

/// The superblock: identity, geometry and timings of a datastore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    pub uuid: Uuid,
    pub label: String,
    /// Device size in bytes at format time.
    pub size: u64,
    pub max_hosts: u32,
    pub lock_count: u32,
    pub profile: Profile,
    pub io_timeout_ms: u32,
    /// Extra time allowed for fencing to finish, beyond `8 × io_timeout`.
    pub fence_margin_ms: u32,
    /// Region starts, in records.
    pub hb_start: u64,
    pub leader_rec: u64,
    pub ballot_start: u64,
    pub lock_start: u64,
    pub journal_start: u64,
    pub data_start: u64,
    /// File descriptor table: `desc_count` records from `desc_start`.
    pub desc_start: u64,
    pub desc_count: u32,
    /// Resource cluster records (two per cluster: allocation bitmap, inbox).
    pub cluster_start: u64,
    pub cluster_count: u32,
    pub blocks_per_cluster: u32,
    /// 1 MiB file blocks from `data_start`.
    pub block_count: u64,
}

impl Superblock {
    /// Lays out a datastore of `size` bytes.
    pub fn layout(
        uuid: Uuid,
        label: &str,
        size: u64,
        max_hosts: u32,
        profile: Profile,
    ) -> Superblock {
        let io_timeout_ms = match profile {
            Profile::Production => 10_000,
            Profile::Test => 1_000,
        };
        let hb_start = HB_START;
        let leader_rec = hb_start + max_hosts as u64;
        let ballot_start = leader_rec + 1;
        let lock_start = (ballot_start + max_hosts as u64).div_ceil(16) * 16;
        let journal_start = (lock_start + DEFAULT_LOCKS as u64).div_ceil(16) * 16;
        let desc_start = (journal_start + max_hosts as u64 * JOURNAL_RECORDS).div_ceil(16) * 16;
        let desc_count = DEFAULT_FILES;
        let cluster_start = (desc_start + desc_count as u64).div_ceil(16) * 16;
        // About four clusters per possible host, 8 to 16384 blocks each.
        let approx = (size / RECORD as u64).saturating_sub(cluster_start) / RECORDS_PER_BLOCK;
        let blocks_per_cluster = approx
            .div_ceil(4 * max_hosts as u64)
            .clamp(8, MAX_CLUSTER_BLOCKS as u64) as u32;
        let max_clusters = approx.div_ceil(blocks_per_cluster as u64);
        let data_start = (cluster_start + 2 * max_clusters).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        let block_count = (size / RECORD as u64).saturating_sub(data_start) / RECORDS_PER_BLOCK;
        let cluster_count = block_count.div_ceil(blocks_per_cluster as u64) as u32;
        Superblock {
            uuid,
            label: label.to_string(),
            size,
            max_hosts,
            lock_count: DEFAULT_LOCKS,
            profile,
            io_timeout_ms,
            fence_margin_ms: 2 * io_timeout_ms,
            hb_start,
            leader_rec,
            ballot_start,
            lock_start,
            journal_start,
            data_start,
            desc_start,
            desc_count,
            cluster_start,
            cluster_count,
            blocks_per_cluster,
            block_count,
        }
    }

    /// Byte offset of file block `b`.
    pub fn block_offset(&self, b: u64) -> u64 {
        self.data_start * RECORD as u64 + b * BLOCK
    }

    /// Record index of file block `b`'s first record.
    pub fn block_record(&self, b: u64) -> u64 {
        self.data_start + b * RECORDS_PER_BLOCK
    }

    /// Blocks in cluster `c` (the last one may be short).
    pub fn cluster_blocks(&self, c: u32) -> u32 {
        let first = c as u64 * self.blocks_per_cluster as u64;
        (self.block_count - first).min(self.blocks_per_cluster as u64) as u32
    }

    /// Record of journal `host_id`'s first record.
    pub fn journal_rec(&self, host_id: u32) -> u64 {
        self.journal_start + (host_id as u64 - 1) * JOURNAL_RECORDS
    }

    /// Bytes of metadata before the data area.
    pub fn metadata_bytes(&self) -> u64 {
        self.data_start * RECORD as u64
    }

    pub fn io_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.io_timeout_ms as u64)
    }

    /// How long a host may go without a good renewal before it must be fenced.
    pub fn fence_after(&self) -> std::time::Duration {
        8 * self.io_timeout()
    }

    /// How long an observer must see a slot unchanged before calling its host dead.
    pub fn host_dead(&self) -> std::time::Duration {
        self.fence_after() + std::time::Duration::from_millis(self.fence_margin_ms as u64)
    }

    /// Interval between renewals.
    pub fn renew_interval(&self) -> std::time::Duration {
        2 * self.io_timeout()
    }

    /// How long the watchdog waits for the killed cgroup to empty before it escalates:
    /// what is left of the fence margin once a write submitted just before the deadline
    /// has had `io_timeout` to land.
    pub fn kill_grace(&self) -> std::time::Duration {
        self.host_dead()
            .saturating_sub(self.fence_after())
            .saturating_sub(self.io_timeout())
    }

    /// The timing rules the safety argument rests on, all in one place (checked when a
    /// datastore is made and every time one is opened):
    /// 1. `2 × renew_interval + io_timeout ≤ fence_after`: a healthy host gets at least two
    ///    renewal attempts, each allowed `io_timeout`, before its deadline;
    /// 2. `fence_after + io_timeout ≤ host_dead`: a write submitted just before the
    ///    deadline (nothing is submitted after it: I/O fencing) lands before any peer,
    ///    counting from its own later sight of the last renewal, may break a lock;
    /// 3. `kill_grace ≥ io_timeout / 2`: the watchdog has time to see the cgroup empty
    ///    before those peers act (else it escalates; see `fence`);
    /// 4. `observer poll (io_timeout / 2) < io_timeout`: a renewal is seen within its
    ///    own time budget.
    pub fn check_timing(&self) -> Result<(), String> {
        let (io, renew, fence, dead) = (
            self.io_timeout(),
            self.renew_interval(),
            self.fence_after(),
            self.host_dead(),
        );
        let ms = |d: std::time::Duration| d.as_millis();
        if io.is_zero() {
            return Err("io_timeout is 0".into());
        }
        if 2 * renew + io > fence {
            return Err(format!(
                "2 x renew_interval + io_timeout ({} ms) exceeds fence_after ({} ms)",
                ms(2 * renew + io),
                ms(fence)
            ));
        }
        if fence + io > dead {
            return Err(format!(
                "fence_after + io_timeout ({} ms) exceeds host_dead ({} ms): the fence margin \
                 ({} ms) must be at least io_timeout",
                ms(fence + io),
                ms(dead),
                self.fence_margin_ms
            ));
        }
        if self.kill_grace() < io / 2 {
            return Err(format!(
                "the watchdog's kill grace ({} ms) is under io_timeout / 2",
                ms(self.kill_grace())
            ));
        }
        Ok(())
    }

    pub fn encode(&self, generation: u64) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        put_str(p, sb::LABEL, &self.label, MAX_LABEL);
        put64(p, sb::SIZE, self.size);
        put32(p, sb::MAX_HOSTS, self.max_hosts);
        put32(p, sb::LOCK_COUNT, self.lock_count);
        p[sb::PROFILE] = self.profile.code();
        put32(p, sb::IO_TIMEOUT_MS, self.io_timeout_ms);
        put32(p, sb::FENCE_MARGIN_MS, self.fence_margin_ms);
        put64(p, sb::HB_START, self.hb_start);
        put64(p, sb::LEADER_REC, self.leader_rec);
        put64(p, sb::BALLOT_START, self.ballot_start);
        put64(p, sb::LOCK_START, self.lock_start);
        put64(p, sb::JOURNAL_START, self.journal_start);
        put64(p, sb::DATA_START, self.data_start);
        put64(p, sb::DESC_START, self.desc_start);
        put32(p, sb::DESC_COUNT, self.desc_count);
        put32(p, sb::BLOCKS_PER_CLUSTER, self.blocks_per_cluster);
        put64(p, sb::CLUSTER_START, self.cluster_start);
        put32(p, sb::CLUSTER_COUNT, self.cluster_count);
        put64(p, sb::BLOCK_COUNT, self.block_count);
        seal(&mut b, MAGIC_SUPER, generation, &self.uuid);
        b
    }

    pub fn decode(b: &Block) -> Decoded<Superblock> {
        if let Err(e) = open(b, MAGIC_SUPER, None) {
            return fail(e);
        }
        let p = &b.0;
        let Some(label) = get_str(p, sb::LABEL, MAX_LABEL) else {
            return Decoded::Unknown("bad label");
        };
        let Some(profile) = Profile::from_code(p[sb::PROFILE]) else {
            return Decoded::Unknown("bad profile");
        };
        let sb = Superblock {
            uuid: Uuid::from_bytes(p[OFF_UUID..OFF_UUID + 16].try_into().expect("16 bytes")),
            label,
            size: u64le(p, sb::SIZE),
            max_hosts: u32le(p, sb::MAX_HOSTS),
            lock_count: u32le(p, sb::LOCK_COUNT),
            profile,
            io_timeout_ms: u32le(p, sb::IO_TIMEOUT_MS),
            fence_margin_ms: u32le(p, sb::FENCE_MARGIN_MS),
            hb_start: u64le(p, sb::HB_START),
            leader_rec: u64le(p, sb::LEADER_REC),
            ballot_start: u64le(p, sb::BALLOT_START),
            lock_start: u64le(p, sb::LOCK_START),
            journal_start: u64le(p, sb::JOURNAL_START),
            data_start: u64le(p, sb::DATA_START),
            desc_start: u64le(p, sb::DESC_START),
            desc_count: u32le(p, sb::DESC_COUNT),
            blocks_per_cluster: u32le(p, sb::BLOCKS_PER_CLUSTER),
            cluster_start: u64le(p, sb::CLUSTER_START),
            cluster_count: u32le(p, sb::CLUSTER_COUNT),
            block_count: u64le(p, sb::BLOCK_COUNT),
        };
        // Bound everything read from disk before anyone uses it.
        let sane = (1..=MAX_HOSTS).contains(&sb.max_hosts)
            && (1..=65536).contains(&sb.lock_count)
            && (100..=600_000).contains(&sb.io_timeout_ms)
            && sb.fence_margin_ms <= 600_000
            && sb.hb_start >= 2
            && sb.leader_rec >= sb.hb_start + sb.max_hosts as u64
            && sb.ballot_start > sb.leader_rec
            && sb.lock_start >= sb.ballot_start + sb.max_hosts as u64
            && sb.journal_start >= sb.lock_start + sb.lock_count as u64
            && sb.desc_start >= sb.journal_start + sb.max_hosts as u64 * JOURNAL_RECORDS
            && (1..=1 << 20).contains(&sb.desc_count)
            && sb.cluster_start >= sb.desc_start + sb.desc_count as u64
            && (1..=MAX_CLUSTER_BLOCKS).contains(&sb.blocks_per_cluster)
            && sb.data_start >= sb.cluster_start + 2 * sb.cluster_count as u64
            && sb.data_start.is_multiple_of(DATA_ALIGN)
            && sb.cluster_count as u64 == sb.block_count.div_ceil(sb.blocks_per_cluster as u64)
            && sb
                .block_count
                .checked_mul(BLOCK)
                .and_then(|d| d.checked_add(sb.data_start * RECORD as u64))
                .is_some_and(|end| end <= sb.size)
            && sb
                .data_start
                .checked_mul(RECORD as u64)
                .is_some_and(|m| m <= sb.size);
        if sane {
            Decoded::Valid(sb)
        } else {
            Decoded::Unknown("superblock geometry out of range")
        }
    }
}

/// State of a heartbeat slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// Never used, or left cleanly.
    Free,
    /// Held by a host that renews it.
    Joined,
}

/// A heartbeat slot: one host's delta lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostSlot {
    /// 1-based host id (slot index + 1).
    pub host_id: u32,
    pub state: SlotState,
    /// Incremented by every new incarnation (join) of a host in this slot.
    pub host_generation: u64,
    /// Random per incarnation: tells two joiners of one slot apart.
    pub incarnation: Uuid,
    /// Incremented by every renewal.
    pub renewal: u64,
    pub name: String,
    pub address: String,
}

impl HostSlot {
    pub fn encode(&self, ds: &Uuid) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        put32(p, slot::HOST_ID, self.host_id);
        p[slot::STATE] = match self.state {
            SlotState::Free => 0,
            SlotState::Joined => 1,
        };
        p[slot::INCARNATION..slot::INCARNATION + 16].copy_from_slice(self.incarnation.as_bytes());
        put64(p, slot::RENEWAL, self.renewal);
        put_str(p, slot::NAME, &self.name, MAX_NAME);
        put_str(p, slot::ADDRESS, &self.address, MAX_ADDR);
        seal(&mut b, MAGIC_HOST, self.host_generation, ds);
        b
    }

    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<HostSlot> {
        let generation = match open(b, MAGIC_HOST, Some(ds)) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        let p = &b.0;
        let state = match p[slot::STATE] {
            0 => SlotState::Free,
            1 => SlotState::Joined,
            _ => return Decoded::Unknown("bad slot state"),
        };
        let (Some(name), Some(address)) = (
            get_str(p, slot::NAME, MAX_NAME),
            get_str(p, slot::ADDRESS, MAX_ADDR),
        ) else {
            return Decoded::Unknown("bad name");
        };
        Decoded::Valid(HostSlot {
            host_id: u32le(p, slot::HOST_ID),
            state,
            host_generation: generation,
            incarnation: Uuid::from_bytes(
                p[slot::INCARNATION..slot::INCARNATION + 16]
                    .try_into()
                    .expect("16 bytes"),
            ),
            renewal: u64le(p, slot::RENEWAL),
            name,
            address,
        })
    }
}

/// A host incarnation: host id and host generation. Locks and leases name owners so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub host_id: u32,
    pub generation: u64,
}

impl Owner {
    pub const NONE: Owner = Owner {
        host_id: 0,
        generation: 0,
    };
    pub fn is_none(&self) -> bool {
        self.host_id == 0
    }
}

/// The volume lease's leader record: who won the last Disk Paxos instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Leader {
    /// Lease version: the Paxos instance that chose `owner`.
    pub lver: u64,
    /// Current owner, or `Owner::NONE` when released.
    pub owner: Owner,
}

impl Leader {
    pub fn encode(&self, ds: &Uuid) -> Box<Block> {
        let mut b = Block::zeroed();
        put64(&mut b.0, leader::LVER, self.lver);
        put32(&mut b.0, leader::OWNER_HOST, self.owner.host_id);
        put64(&mut b.0, leader::OWNER_GENERATION, self.owner.generation);
        seal(&mut b, MAGIC_LEADER, self.lver, ds);
        b
    }

    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<Leader> {
        if let Err(e) = open(b, MAGIC_LEADER, Some(ds)) {
            return fail(e);
        }
        Decoded::Valid(Leader {
            lver: u64le(&b.0, leader::LVER),
            owner: Owner {
                host_id: u32le(&b.0, leader::OWNER_HOST),
                generation: u64le(&b.0, leader::OWNER_GENERATION),
            },
        })
    }
}

/// A host's Disk Paxos ballot block for the volume lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ballot {
    /// The Paxos instance (lease version) this block is about.
    pub lver: u64,
    /// Highest ballot this host has started.
    pub mbal: u64,
    /// Ballot of the last value this host accepted (0: none).
    pub bal: u64,
    /// The value accepted at `bal`: the proposed lease owner.
    pub inp: Option<Owner>,
    /// This host holds no instance up to and including this one (written when it
    /// releases the lease or gives up on an instance it proposed itself in): a leader
    /// record that still names it for such an instance is stale.
    pub released: u64,
}

impl Ballot {
    pub fn encode(&self, ds: &Uuid) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        put64(p, ballot::LVER, self.lver);
        put64(p, ballot::MBAL, self.mbal);
        put64(p, ballot::BAL, self.bal);
        let inp = self.inp.unwrap_or(Owner::NONE);
        put32(p, ballot::INP_HOST, inp.host_id);
        put64(p, ballot::INP_GENERATION, inp.generation);
        put64(p, ballot::RELEASED, self.released);
        seal(&mut b, MAGIC_BALLOT, self.mbal, ds);
        b
    }

    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<Ballot> {
        if let Err(e) = open(b, MAGIC_BALLOT, Some(ds)) {
            return fail(e);
        }
        let p = &b.0;
        let inp = Owner {
            host_id: u32le(p, ballot::INP_HOST),
            generation: u64le(p, ballot::INP_GENERATION),
        };
        Decoded::Valid(Ballot {
            lver: u64le(p, ballot::LVER),
            mbal: u64le(p, ballot::MBAL),
            bal: u64le(p, ballot::BAL),
            inp: (!inp.is_none()).then_some(inp),
            released: u64le(p, ballot::RELEASED),
        })
    }
}

/// Lock modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// One holder, reading and writing.
    Exclusive,
    /// Many holders, all read-only.
    Shared,
    /// Many holders, all writing (they coordinate among themselves).
    MultiWriter,
}

impl std::str::FromStr for LockMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exclusive" => Ok(LockMode::Exclusive),
            "shared" => Ok(LockMode::Shared),
            "multi-writer" => Ok(LockMode::MultiWriter),
            _ => Err(format!(
                "unknown lock mode {s:?}: use exclusive, shared or multi-writer"
            )),
        }
    }
}

impl LockMode {
    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Exclusive => "exclusive",
            LockMode::Shared => "shared",
            LockMode::MultiWriter => "multi-writer",
        }
    }

    fn code(self) -> u8 {
        match self {
            LockMode::Exclusive => 1,
            LockMode::Shared => 2,
            LockMode::MultiWriter => 3,
        }
    }
    fn from_code(c: u8) -> Option<LockMode> {
        match c {
            1 => Some(LockMode::Exclusive),
            2 => Some(LockMode::Shared),
            3 => Some(LockMode::MultiWriter),
            _ => None,
        }
    }
}

/// A lock record: one object's lock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LockRecord {
    pub object: String,
    /// Mode of the current holders (meaningless when there are none).
    pub mode: LockMode,
    /// Rises on every change of holders.
    pub version: u64,
    pub holders: Vec<Owner>,
}

impl LockRecord {
    pub fn encode(&self, ds: &Uuid) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        put_str(p, lock::OBJECT, &self.object, MAX_OBJECT);
        p[lock::MODE] = self.mode.code();
        put64(p, lock::VERSION, self.version);
        let n = self.holders.len().min(MAX_HOSTS as usize);
        put32(p, lock::HOLDER_COUNT, n as u32);
        for (i, h) in self.holders.iter().take(n).enumerate() {
            let o = lock::HOLDERS + i * lock::HOLDER_SIZE;
            put32(p, o + lock::HOLDER_HOST, h.host_id);
            put64(p, o + lock::HOLDER_GENERATION, h.generation);
        }
        seal(&mut b, MAGIC_LOCK, self.version, ds);
        b
    }

    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<LockRecord> {
        if let Err(e) = open(b, MAGIC_LOCK, Some(ds)) {
            return fail(e);
        }
        let p = &b.0;
        let Some(object) = get_str(p, lock::OBJECT, MAX_OBJECT) else {
            return Decoded::Unknown("bad object name");
        };
        let Some(mode) = LockMode::from_code(p[lock::MODE]) else {
            return Decoded::Unknown("bad lock mode");
        };
        let n = u32le(p, lock::HOLDER_COUNT) as usize;
        if n > MAX_HOSTS as usize {
            return Decoded::Unknown("too many holders");
        }
        let holders = (0..n)
            .map(|i| {
                let o = lock::HOLDERS + i * lock::HOLDER_SIZE;
                Owner {
                    host_id: u32le(p, o + lock::HOLDER_HOST),
                    generation: u64le(p, o + lock::HOLDER_GENERATION),
                }
            })
            .collect();
        Decoded::Valid(LockRecord {
            object,
            mode,
            version: u64le(p, 292),
            holders,
        })
    }
}

#[cfg(test)]
mod tests;
