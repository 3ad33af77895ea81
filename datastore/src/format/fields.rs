//! The payload offsets of every record of [`super`]: one module per record, one constant
//! per field (the common header's are in [`super`] itself). `docs/datastore-format.md`
//! draws the same layouts.

/// Payload offsets of the superblock (both copies).
pub mod sb {
    /// The datastore label (a length byte, then at most `MAX_LABEL` bytes of UTF-8).
    pub const LABEL: usize = 32;
    /// Device size, bytes (u64).
    pub const SIZE: usize = 100;
    /// Heartbeat slots (u32).
    pub const MAX_HOSTS: usize = 108;
    /// Lock records (u32).
    pub const LOCK_COUNT: usize = 112;
    /// Timing profile code (u8).
    pub const PROFILE: usize = 116;
    /// io_timeout, ms (u32).
    pub const IO_TIMEOUT_MS: usize = 120;
    /// Fence margin, ms (u32).
    pub const FENCE_MARGIN_MS: usize = 124;
    /// Region starts and counts, in records or blocks (u64 unless said).
    pub const HB_START: usize = 128;
    pub const LEADER_REC: usize = 136;
    pub const BALLOT_START: usize = 144;
    pub const LOCK_START: usize = 152;
    pub const JOURNAL_START: usize = 160;
    pub const DATA_START: usize = 168;
    pub const DESC_START: usize = 176;
    /// File descriptors (u32).
    pub const DESC_COUNT: usize = 184;
    /// File blocks per resource cluster (u32).
    pub const BLOCKS_PER_CLUSTER: usize = 188;
    pub const CLUSTER_START: usize = 192;
    /// Resource clusters (u32).
    pub const CLUSTER_COUNT: usize = 200;
    /// File blocks in the data area (u64).
    pub const BLOCK_COUNT: usize = 208;
}

/// Payload offsets of a heartbeat slot (the record generation is the host generation).
pub mod slot {
    /// 1-based host id (u32).
    pub const HOST_ID: usize = 32;
    /// 0 free, 1 joined (u8).
    pub const STATE: usize = 36;
    /// Incarnation uuid ([u8; 16]).
    pub const INCARNATION: usize = 40;
    /// Renewal counter (u64).
    pub const RENEWAL: usize = 56;
    /// Host name (a length byte, then at most `MAX_NAME` bytes).
    pub const NAME: usize = 64;
    /// Management address (a length byte, then at most `MAX_ADDR` bytes).
    pub const ADDRESS: usize = 160;
}

/// Payload offsets of the volume lease's leader record (generation: the lease version).
pub mod leader {
    /// Lease version (u64).
    pub const LVER: usize = 32;
    /// Owner host id (u32) and host generation (u64).
    pub const OWNER_HOST: usize = 40;
    pub const OWNER_GENERATION: usize = 48;
}

/// Payload offsets of a Disk Paxos ballot record (generation: `mbal`).
pub mod ballot {
    /// Paxos instance (u64).
    pub const LVER: usize = 32;
    /// Highest ballot started (u64).
    pub const MBAL: usize = 40;
    /// Ballot of the value accepted (u64).
    pub const BAL: usize = 48;
    /// The accepted value: owner host id (u32) and host generation (u64).
    pub const INP_HOST: usize = 56;
    pub const INP_GENERATION: usize = 64;
    /// Highest instance released (u64).
    pub const RELEASED: usize = 72;
}

/// Payload offsets of a lock record (generation: the lock version).
pub mod lock {
    /// Object name (a length byte, then at most `MAX_OBJECT` bytes).
    pub const OBJECT: usize = 32;
    /// Mode code (u8): 1 exclusive, 2 shared, 3 multi-writer.
    pub const MODE: usize = 288;
    /// Lock version (u64).
    pub const VERSION: usize = 292;
    /// Number of holders (u32).
    pub const HOLDER_COUNT: usize = 300;
    /// Holders, `HOLDER_SIZE` bytes each: host id (u32) at `HOLDER_HOST`, host
    /// generation (u64) at `HOLDER_GENERATION`.
    pub const HOLDERS: usize = 304;
    pub const HOLDER_SIZE: usize = 16;
    pub const HOLDER_HOST: usize = 0;
    pub const HOLDER_GENERATION: usize = 8;
}
