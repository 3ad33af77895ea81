//! The records of files, space and the journal: file descriptors, pointer
//! records (block maps), resource cluster bitmaps and inboxes, and journal headers.
//!
//! Same frame as every record (`format`): magic, version, generation, datastore uuid,
//! crc32c. Byte diagrams are in `docs/datastore-format.md`.

use uuid::Uuid;

use crate::format::{
    fail, get_str, open, put32, put64, put_str, seal, u32le, u64le, Block, Decoded, Owner,
    MAX_HOSTS, RECORD,
};
use diskfmt::Provisioning;

pub const MAGIC_DESC: u32 = u32::from_le_bytes(*b"FYFD");
pub const MAGIC_PTR: u32 = u32::from_le_bytes(*b"FYPT");
pub const MAGIC_CLUSTER: u32 = u32::from_le_bytes(*b"FYRC");
pub const MAGIC_INBOX: u32 = u32::from_le_bytes(*b"FYRI");
pub const MAGIC_JOURNAL: u32 = u32::from_le_bytes(*b"FYJH");

/// Longest file or folder name, in bytes.
pub const MAX_FILE_NAME: usize = 255;
/// Map blocks a descriptor can name (each holds 256 pointer records).
pub const MAX_MAP_BLOCKS: usize = 64;
/// Block-map entries per pointer record.
pub const ENTRIES_PER_PTR: usize = (RECORD - 4 - ptr::ENTRIES) / ptr::ENTRY_SIZE;
/// 4 KiB sub-blocks per 1 MiB block (one "written" bit each).
pub const SUB_BLOCKS: usize = 256;
/// Sub-block size.
pub const SUB_BLOCK: u64 = 4096;
/// Largest file: every entry of every pointer record of every map block.
pub const MAX_FILE_SIZE: u64 =
    (MAX_MAP_BLOCKS * 256 * ENTRIES_PER_PTR) as u64 * crate::format::BLOCK;
/// Most records one journal transaction carries.
pub const MAX_TXN_RECORDS: usize = crate::format::JOURNAL_RECORDS as usize - 1;

/// Payload offsets of a file descriptor (generation: the descriptor's own).
pub mod desc {
    /// 0 free, 1 file, 2 folder (u8).
    pub const KIND: usize = 32;
    /// Provisioning code (u8).
    pub const PROVISIONING: usize = 33;
    /// Descriptor index of the parent folder (u32).
    pub const PARENT: usize = 36;
    /// The file's uuid ([u8; 16]).
    pub const UUID: usize = 40;
    /// Size, bytes (u64).
    pub const SIZE: usize = 56;
    /// Sequence of the map blocks' current use (u64).
    pub const MAP_SEQ: usize = 64;
    /// Map blocks named (u32).
    pub const MAP_COUNT: usize = 72;
    /// Name (a length byte, then at most `MAX_FILE_NAME` bytes).
    pub const NAME: usize = 80;
    /// Map blocks, `MAP_SIZE` bytes each: data block (u64), then its sequence (u64) at
    /// `MAP_ENTRY_SEQ`.
    pub const MAPS: usize = 336;
    pub const MAP_SIZE: usize = 16;
    pub const MAP_ENTRY_SEQ: usize = 8;
}

/// Payload offsets of a pointer record.
pub mod ptr {
    /// The owning file's uuid ([u8; 16]).
    pub const FILE: usize = 32;
    /// The map block's sequence (u64).
    pub const SEQ: usize = 48;
    /// Index in the file's map (u32).
    pub const INDEX: usize = 56;
    /// Entries, `ENTRY_SIZE` bytes each: data block + 1 (u64, 0: none), then four u64
    /// words of written sub-block bits.
    pub const ENTRIES: usize = 64;
    pub const ENTRY_SIZE: usize = 40;
}

/// Payload offsets of a resource cluster record and of its inbox.
pub mod cluster {
    /// The cluster's index (u32).
    pub const CLUSTER: usize = 32;
    /// Owner host id (u32) and host generation (u64).
    pub const OWNER_HOST: usize = 40;
    pub const OWNER_GENERATION: usize = 48;
    /// Set bits in the bitmap (u32).
    pub const COUNT: usize = 56;
    /// The bitmap, `CLUSTER_WORDS` u64 words.
    pub const BITS: usize = 64;
}

/// Payload offsets of a journal header (generation: the transaction's sequence).
pub mod journal {
    /// 1 committed, 2 applied (u8).
    pub const STATE: usize = 32;
    /// crc32c of the images (u32).
    pub const IMAGES_CRC: usize = 36;
    /// Target records (u32).
    pub const TARGET_COUNT: usize = 40;
    /// The writer: host id (u32) and host generation (u64).
    pub const WRITER_HOST: usize = 44;
    pub const WRITER_GENERATION: usize = 48;
    /// Target record numbers, u64 each.
    pub const TARGETS: usize = 64;
}

/// What a descriptor describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Free,
    File,
    Folder,
}

fn prov_code(p: Provisioning) -> u8 {
    match p {
        Provisioning::Thin => 1,
        Provisioning::LazyThick => 2,
        Provisioning::EagerThick => 3,
    }
}

fn prov_from(c: u8) -> Option<Provisioning> {
    match c {
        1 => Some(Provisioning::Thin),
        2 => Some(Provisioning::LazyThick),
        3 => Some(Provisioning::EagerThick),
        _ => None,
    }
}

/// A map block of a file: a 1 MiB data block holding 256 pointer records, and the
/// sequence number that tells its records from stale ones of an earlier use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapBlock {
    pub block: u64,
    pub seq: u64,
}

/// A file descriptor: one file or folder (record `desc_start + id`; id 0 is the root).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Descriptor {
    pub kind: Kind,
    pub provisioning: Provisioning,
    /// Parent folder id (the root is its own parent).
    pub parent: u32,
    /// Identity of the file: names its lock and its pointer records.
    pub uuid: Uuid,
    /// Virtual size in bytes (files).
    pub size: u64,
    /// Last map-block sequence number handed out.
    pub map_seq: u64,
    pub maps: Vec<MapBlock>,
    pub name: String,
}

impl Descriptor {
    /// The root folder, written at format.
    pub fn root() -> Descriptor {
        Descriptor {
            kind: Kind::Folder,
            provisioning: Provisioning::Thin,
            parent: 0,
            uuid: Uuid::nil(),
            size: 0,
            map_seq: 0,
            maps: Vec::new(),
            name: String::new(),
        }
    }

    /// A free descriptor (what a deleted file leaves behind).
    pub fn free() -> Descriptor {
        Descriptor {
            kind: Kind::Free,
            ..Descriptor::root()
        }
    }

    pub fn encode(&self, ds: &Uuid, generation: u64) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        p[desc::KIND] = match self.kind {
            Kind::Free => 0,
            Kind::File => 1,
            Kind::Folder => 2,
        };
        p[desc::PROVISIONING] = prov_code(self.provisioning);
        put32(p, desc::PARENT, self.parent);
        p[desc::UUID..desc::UUID + 16].copy_from_slice(self.uuid.as_bytes());
        put64(p, desc::SIZE, self.size);
        put64(p, desc::MAP_SEQ, self.map_seq);
        let n = self.maps.len().min(MAX_MAP_BLOCKS);
        put32(p, desc::MAP_COUNT, n as u32);
        put_str(p, desc::NAME, &self.name, MAX_FILE_NAME);
        for (i, m) in self.maps.iter().take(n).enumerate() {
            put64(p, desc::MAPS + i * desc::MAP_SIZE, m.block);
            put64(
                p,
                desc::MAPS + i * desc::MAP_SIZE + desc::MAP_ENTRY_SEQ,
                m.seq,
            );
        }
        seal(&mut b, MAGIC_DESC, generation, ds);
        b
    }

    /// Decodes a descriptor and its generation.
    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<(Descriptor, u64)> {
        let generation = match open(b, MAGIC_DESC, Some(ds)) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        let p = &b.0;
        let kind = match p[desc::KIND] {
            0 => Kind::Free,
            1 => Kind::File,
            2 => Kind::Folder,
            _ => return Decoded::Unknown("bad descriptor kind"),
        };
        let Some(provisioning) = prov_from(p[desc::PROVISIONING]) else {
            return Decoded::Unknown("bad provisioning");
        };
        let Some(name) = get_str(p, desc::NAME, MAX_FILE_NAME) else {
            return Decoded::Unknown("bad file name");
        };
        let n = u32le(p, desc::MAP_COUNT) as usize;
        if n > MAX_MAP_BLOCKS {
            return Decoded::Unknown("too many map blocks");
        }
        let size = u64le(p, desc::SIZE);
        if size > MAX_FILE_SIZE {
            return Decoded::Unknown("file size out of range");
        }
        let maps = (0..n)
            .map(|i| MapBlock {
                block: u64le(p, desc::MAPS + i * desc::MAP_SIZE),
                seq: u64le(p, desc::MAPS + i * desc::MAP_SIZE + desc::MAP_ENTRY_SEQ),
            })
            .collect();
        Decoded::Valid((
            Descriptor {
                kind,
                provisioning,
                parent: u32le(p, desc::PARENT),
                uuid: Uuid::from_bytes(
                    p[desc::UUID..desc::UUID + 16].try_into().expect("16 bytes"),
                ),
                size,
                map_seq: u64le(p, desc::MAP_SEQ),
                maps,
                name,
            },
            generation,
        ))
    }
}

/// One block-map entry: the data block (if allocated) and which 4 KiB sub-blocks hold
/// written data (the others read as zeros).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    pub block: Option<u64>,
    pub written: [u64; 4],
}

impl Entry {
    pub fn is_written(&self, sub: usize) -> bool {
        self.written[sub / 64] >> (sub % 64) & 1 == 1
    }
    pub fn set_written(&mut self, sub: usize, on: bool) {
        if on {
            self.written[sub / 64] |= 1 << (sub % 64);
        } else {
            self.written[sub / 64] &= !(1 << (sub % 64));
        }
    }
    pub fn any_written(&self) -> bool {
        self.written.iter().any(|w| *w != 0)
    }
}

/// A pointer record: `ENTRIES_PER_PTR` consecutive entries of one file's block map.
/// It belongs to the file and map block named inside it; anything else found at its
/// place (a stale record of an earlier use of the block) reads as empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointerRec {
    pub file: Uuid,
    pub seq: u64,
    /// Index of this record in the file's map (entry `index × ENTRIES_PER_PTR` first).
    pub index: u32,
    pub entries: Vec<Entry>,
}

impl PointerRec {
    pub fn encode(&self, ds: &Uuid, generation: u64) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        p[ptr::FILE..ptr::FILE + 16].copy_from_slice(self.file.as_bytes());
        put64(p, ptr::SEQ, self.seq);
        put32(p, ptr::INDEX, self.index);
        for (i, e) in self.entries.iter().take(ENTRIES_PER_PTR).enumerate() {
            let o = ptr::ENTRIES + i * ptr::ENTRY_SIZE;
            put64(p, o, e.block.map_or(0, |b| b + 1));
            for (w, word) in e.written.iter().enumerate() {
                put64(p, o + 8 + w * 8, *word);
            }
        }
        seal(&mut b, MAGIC_PTR, generation, ds);
        b
    }

    /// Decodes a pointer record and its generation.
    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<(PointerRec, u64)> {
        let generation = match open(b, MAGIC_PTR, Some(ds)) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        let p = &b.0;
        let entries = (0..ENTRIES_PER_PTR)
            .map(|i| {
                let o = ptr::ENTRIES + i * ptr::ENTRY_SIZE;
                let raw = u64le(p, o);
                Entry {
                    block: raw.checked_sub(1),
                    written: std::array::from_fn(|w| u64le(p, o + 8 + w * 8)),
                }
            })
            .collect();
        Decoded::Valid((
            PointerRec {
                file: Uuid::from_bytes(p[ptr::FILE..ptr::FILE + 16].try_into().expect("16 bytes")),
                seq: u64le(p, ptr::SEQ),
                index: u32le(p, ptr::INDEX),
                entries,
            },
            generation,
        ))
    }
}

/// A resource cluster's allocation record (`FYRC`, record `cluster_start + 2c`) or its
/// inbox (`FYRI`, the next record): the owner and a bitmap over the cluster's blocks.
/// In the allocation record a set bit is a used block; in the inbox, a block freed by a
/// host that does not own the cluster, waiting for the owner to take it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRec {
    pub cluster: u32,
    /// Owner of the cluster (allocation record only; none in an inbox).
    pub owner: Owner,
    pub bits: Vec<u64>,
}

/// Words of a cluster bitmap (16384 bits).
pub const CLUSTER_WORDS: usize = crate::format::MAX_CLUSTER_BLOCKS as usize / 64;

impl ClusterRec {
    pub fn empty(cluster: u32) -> ClusterRec {
        ClusterRec {
            cluster,
            owner: Owner::NONE,
            bits: vec![0; CLUSTER_WORDS],
        }
    }

    pub fn get(&self, i: u32) -> bool {
        self.bits[i as usize / 64] >> (i % 64) & 1 == 1
    }

    pub fn set(&mut self, i: u32, on: bool) {
        if on {
            self.bits[i as usize / 64] |= 1 << (i % 64);
        } else {
            self.bits[i as usize / 64] &= !(1 << (i % 64));
        }
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|w| w.count_ones()).sum()
    }

    pub fn encode(&self, ds: &Uuid, inbox: bool, generation: u64) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        put32(p, cluster::CLUSTER, self.cluster);
        put32(p, cluster::OWNER_HOST, self.owner.host_id);
        put64(p, cluster::OWNER_GENERATION, self.owner.generation);
        put32(p, cluster::COUNT, self.count());
        for (i, w) in self.bits.iter().take(CLUSTER_WORDS).enumerate() {
            put64(p, cluster::BITS + i * 8, *w);
        }
        let magic = if inbox { MAGIC_INBOX } else { MAGIC_CLUSTER };
        seal(&mut b, magic, generation, ds);
        b
    }

    /// Decodes a cluster record (blank: unowned, nothing used) and its generation.
    pub fn decode(b: &Block, ds: &Uuid, inbox: bool, cluster: u32) -> Decoded<(ClusterRec, u64)> {
        let magic = if inbox { MAGIC_INBOX } else { MAGIC_CLUSTER };
        let generation = match open(b, magic, Some(ds)) {
            Ok(g) => g,
            Err(Decoded::Blank) => return Decoded::Valid((ClusterRec::empty(cluster), 0)),
            Err(e) => return fail(e),
        };
        let p = &b.0;
        let rec = ClusterRec {
            cluster: u32le(p, cluster::CLUSTER),
            owner: Owner {
                host_id: u32le(p, cluster::OWNER_HOST),
                generation: u64le(p, cluster::OWNER_GENERATION),
            },
            bits: (0..CLUSTER_WORDS)
                .map(|i| u64le(p, cluster::BITS + i * 8))
                .collect(),
        };
        if rec.cluster != cluster || rec.owner.host_id > MAX_HOSTS {
            return Decoded::Unknown("cluster record of another cluster");
        }
        if rec.count() != u32le(p, cluster::COUNT) {
            return Decoded::Unknown("cluster bitmap disagrees with its count");
        }
        Decoded::Valid((rec, generation))
    }
}

/// State of a journal transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TxnState {
    /// Written to the journal; its records may not all be in place yet.
    Committed,
    /// Every record is in place.
    Applied,
}

/// A journal header (record 0 of a host's journal): the last transaction, the records it
/// writes, and the crc32c of its images (records 1..=n of the journal).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JournalHeader {
    pub seq: u64,
    /// The host incarnation that wrote the transaction.
    pub writer: Owner,
    pub state: TxnState,
    pub images_crc: u32,
    pub targets: Vec<u64>,
}

impl JournalHeader {
    pub fn encode(&self, ds: &Uuid) -> Box<Block> {
        let mut b = Block::zeroed();
        let p = &mut b.0;
        p[journal::STATE] = match self.state {
            TxnState::Committed => 1,
            TxnState::Applied => 2,
        };
        put32(p, journal::IMAGES_CRC, self.images_crc);
        put32(p, journal::WRITER_HOST, self.writer.host_id);
        put64(p, journal::WRITER_GENERATION, self.writer.generation);
        let n = self.targets.len().min(MAX_TXN_RECORDS);
        put32(p, journal::TARGET_COUNT, n as u32);
        for (i, t) in self.targets.iter().take(n).enumerate() {
            put64(p, journal::TARGETS + i * 8, *t);
        }
        seal(&mut b, MAGIC_JOURNAL, self.seq, ds);
        b
    }

    pub fn decode(b: &Block, ds: &Uuid) -> Decoded<JournalHeader> {
        let seq = match open(b, MAGIC_JOURNAL, Some(ds)) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        let p = &b.0;
        let state = match p[journal::STATE] {
            1 => TxnState::Committed,
            2 => TxnState::Applied,
            _ => return Decoded::Unknown("bad journal state"),
        };
        let n = u32le(p, journal::TARGET_COUNT) as usize;
        if n > MAX_TXN_RECORDS {
            return Decoded::Unknown("journal transaction too long");
        }
        Decoded::Valid(JournalHeader {
            seq,
            state,
            writer: Owner {
                host_id: u32le(p, journal::WRITER_HOST),
                generation: u64le(p, journal::WRITER_GENERATION),
            },
            images_crc: u32le(p, journal::IMAGES_CRC),
            targets: (0..n).map(|i| u64le(p, journal::TARGETS + i * 8)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_records_round_trip() {
        let ds = Uuid::from_u128(7);
        let d = Descriptor {
            kind: Kind::File,
            provisioning: Provisioning::LazyThick,
            parent: 3,
            uuid: Uuid::from_u128(99),
            size: 5 << 30,
            map_seq: 4,
            maps: vec![MapBlock { block: 17, seq: 4 }],
            name: "disk0.raw".into(),
        };
        assert_eq!(
            Descriptor::decode(&d.encode(&ds, 9), &ds),
            Decoded::Valid((d, 9))
        );
        let mut e = Entry {
            block: Some(0),
            ..Entry::default()
        };
        e.set_written(255, true);
        let pr = PointerRec {
            file: Uuid::from_u128(99),
            seq: 4,
            index: 2,
            entries: (0..ENTRIES_PER_PTR)
                .map(|i| if i == 5 { e } else { Entry::default() })
                .collect(),
        };
        assert_eq!(
            PointerRec::decode(&pr.encode(&ds, 3), &ds),
            Decoded::Valid((pr, 3))
        );
        let mut c = ClusterRec::empty(4);
        c.owner = Owner {
            host_id: 2,
            generation: 5,
        };
        c.set(100, true);
        assert_eq!(
            ClusterRec::decode(&c.encode(&ds, false, 2), &ds, false, 4),
            Decoded::Valid((c.clone(), 2))
        );
        // An inbox never reads as an allocation record, nor a cluster as another.
        assert!(matches!(
            ClusterRec::decode(&c.encode(&ds, true, 2), &ds, false, 4),
            Decoded::Unknown(_)
        ));
        assert!(matches!(
            ClusterRec::decode(&c.encode(&ds, false, 2), &ds, false, 5),
            Decoded::Unknown(_)
        ));
        let j = JournalHeader {
            seq: 12,
            writer: Owner {
                host_id: 3,
                generation: 8,
            },
            state: TxnState::Committed,
            images_crc: 0xdead,
            targets: vec![5, 6, 900],
        };
        assert_eq!(
            JournalHeader::decode(&j.encode(&ds), &ds),
            Decoded::Valid(j)
        );
    }
}
