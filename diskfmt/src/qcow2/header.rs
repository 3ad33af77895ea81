//! qcow2 header parsing and the feature gate: decides, before the qcow2 driver touches
//! an image, whether ferry can open it, and says precisely why not.
//!
//! Input is untrusted (any file a user points at): every offset and length read from it
//! is bounds-checked and capped; parsing never panics (a fuzz target checks this).
//! All qcow2 integers are big-endian.

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

const V2_LEN: usize = 72;
const V3_MIN_LEN: usize = 104;
const MAX_BACKING_NAME: u32 = 1023;
const MAX_EXT_LEN: u32 = 64 * 1024;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// The parts of a qcow2 header ferry uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub nb_snapshots: u32,
    pub refcount_order: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// Why a header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a qcow2 file at all.
    NotQcow2,
    /// A feature ferry does not support, and a hint of what to do.
    Unsupported(String, &'static str),
    /// The header contradicts itself or the file.
    Corrupt(String),
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn corrupt(msg: impl Into<String>) -> HeaderError {
    HeaderError::Corrupt(msg.into())
}

/// Parses the start of a qcow2 file (`bytes`, at least its first 64 KiB or the whole
/// file) of `file_len` bytes, checking every feature and every table offset.
pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    if bytes.len() < 4 || be32(bytes, 0) != MAGIC {
        return Err(HeaderError::NotQcow2);
    }
    if bytes.len() < V2_LEN {
        return Err(corrupt(format!(
            "truncated header ({} bytes, need {V2_LEN})",
            bytes.len()
        )));
    }
    let version = be32(bytes, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Unsupported(
            format!("qcow2 version {version}"),
            "convert it with a newer qemu-img",
        ));
    }
    let backing_off = be64(bytes, 8);
    let backing_len = be32(bytes, 16);
    let cluster_bits = be32(bytes, 20);
    let size = be64(bytes, 24);
    let crypt = be32(bytes, 32);
    let l1_size = be32(bytes, 36) as u64;
    let l1_off = be64(bytes, 40);
    let rt_off = be64(bytes, 48);
    let rt_clusters = be32(bytes, 56) as u64;
    let nb_snapshots = be32(bytes, 60);

    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster bits {cluster_bits} out of range 9..=21"
        )));
    }
    let cs = 1u64 << cluster_bits;
    match crypt {
        0 => {}
        1 => {
            return Err(HeaderError::Unsupported(
                "qcow2 AES encryption".into(),
                "decrypt it with qemu-img convert",
            ))
        }
        2 => {
            return Err(HeaderError::Unsupported(
                "qcow2 LUKS encryption".into(),
                "decrypt it with qemu-img convert",
            ))
        }
        n => return Err(corrupt(format!("unknown encryption method {n}"))),
    }

    let (mut incompat, mut refcount_order, mut header_len, mut compression) = (0, 4, V2_LEN, 0u8);
    if version == 3 {
        if bytes.len() < V3_MIN_LEN {
            return Err(corrupt(format!(
                "truncated version 3 header ({} bytes, need {V3_MIN_LEN})",
                bytes.len()
            )));
        }
        incompat = be64(bytes, 72);
        refcount_order = be32(bytes, 96);
        header_len = be32(bytes, 100) as usize;
        if header_len < V3_MIN_LEN || header_len as u64 > cs || header_len > bytes.len() {
            return Err(corrupt(format!("header length {header_len} is invalid")));
        }
        if header_len > 104 {
            compression = bytes[104];
        }
    }
    if incompat & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt(
            "the image is marked corrupt; repair it with `qemu-img check -r all`",
        ));
    }
    if incompat & INCOMPAT_DIRTY != 0 {
        return Err(HeaderError::Unsupported(
            "a dirty image (lazy refcounts not written back)".into(),
            "repair it with `qemu-img check -r all`",
        ));
    }
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(HeaderError::Unsupported(
            "an external data file".into(),
            "convert it with qemu-img first",
        ));
    }
    if incompat & INCOMPAT_COMPRESSION != 0 && compression != 0 {
        return Err(HeaderError::Unsupported(
            format!("compression type {compression} (zstd)"),
            "convert it with qemu-img first",
        ));
    }
    if incompat & INCOMPAT_EXTL2 != 0 {
        return Err(HeaderError::Unsupported(
            "extended L2 entries (subclusters)".into(),
            "convert it with qemu-img first",
        ));
    }
    let unknown = incompat
        & !(INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2);
    if unknown != 0 {
        return Err(HeaderError::Unsupported(
            format!("incompatible features {unknown:#x}"),
            "convert it with qemu-img first",
        ));
    }
    if refcount_order > 6 {
        return Err(corrupt(format!("refcount order {refcount_order} > 6")));
    }

    // Tables must be cluster-aligned and inside the file.
    let inside = |what: &str, off: u64, len: u64| -> Result<(), HeaderError> {
        if !off.is_multiple_of(cs) {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is not cluster-aligned"
            )));
        }
        match off.checked_add(len) {
            Some(end) if end <= file_len => Ok(()),
            _ => Err(corrupt(format!(
                "{what} at {off:#x} ({len} bytes) lies beyond the end of the file \
                 ({file_len} bytes): the image is truncated"
            ))),
        }
    };
    let entries_per_l2 = cs / 8;
    let needed_l1 = size.div_ceil(cs.saturating_mul(entries_per_l2));
    if l1_size < needed_l1 {
        return Err(corrupt(format!(
            "L1 table has {l1_size} entries, a {size}-byte disk needs {needed_l1}"
        )));
    }
    if l1_size > 0 {
        inside("L1 table", l1_off, l1_size * 8)?;
    }
    if rt_clusters == 0 {
        return Err(corrupt("refcount table is empty"));
    }
    inside("refcount table", rt_off, rt_clusters.saturating_mul(cs))?;

    let mut backing_file = None;
    if backing_off != 0 {
        if backing_len == 0 || backing_len > MAX_BACKING_NAME {
            return Err(corrupt(format!("backing file name length {backing_len}")));
        }
        let start = backing_off as usize;
        let end = start.checked_add(backing_len as usize);
        match end {
            Some(end) if backing_off < cs && end <= bytes.len() => {
                let name = std::str::from_utf8(&bytes[start..end])
                    .map_err(|_| corrupt("backing file name is not UTF-8"))?;
                backing_file = Some(name.to_string());
            }
            _ => return Err(corrupt("backing file name lies outside the first cluster")),
        }
    }

    // Header extensions follow the header, 8-byte aligned, until type 0.
    let mut backing_format = None;
    let mut pos = header_len.div_ceil(8) * 8;
    loop {
        if pos + 8 > bytes.len() || pos as u64 + 8 > cs {
            // The first cluster ends without an end marker.
            return Err(corrupt("header extensions are not terminated"));
        }
        let ty = be32(bytes, pos);
        let len = be32(bytes, pos + 4);
        if ty == EXT_END {
            break;
        }
        if len > MAX_EXT_LEN {
            return Err(corrupt(format!(
                "header extension {ty:#x} is {len} bytes long"
            )));
        }
        let data_start = pos + 8;
        let data_end = data_start + len as usize;
        if data_end > bytes.len() || data_end as u64 > cs {
            return Err(corrupt(format!(
                "header extension {ty:#x} overruns the first cluster"
            )));
        }
        let data = &bytes[data_start..data_end];
        match ty {
            EXT_BACKING_FORMAT => {
                backing_format = Some(
                    std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format is not UTF-8"))?
                        .to_string(),
                );
            }
            EXT_DATA_FILE if incompat & INCOMPAT_DATA_FILE == 0 => {}
            _ => {}
        }
        pos = data_start + (len as usize).div_ceil(8) * 8;
    }

    Ok(Header {
        version,
        cluster_bits,
        size,
        nb_snapshots,
        refcount_order,
        backing_file,
        backing_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_v3(size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 65536 * 4];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3 * 65536u64).to_be_bytes());
        b[48..56].copy_from_slice(&65536u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn minimal_header_parses() {
        let b = minimal_v3(1 << 29);
        let h = parse(&b, b.len() as u64).unwrap();
        assert_eq!(h.size, 1 << 29);
        assert_eq!(h.cluster_size(), 65536);
    }

    #[test]
    fn encryption_is_named() {
        let mut b = minimal_v3(1 << 20);
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        let e = parse(&b, b.len() as u64).unwrap_err();
        assert!(
            matches!(e, HeaderError::Unsupported(ref f, _) if f.contains("LUKS")),
            "{e:?}"
        );
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let b = minimal_v3(1 << 20);
        let e = parse(&b[..65536], 65536).unwrap_err();
        assert!(
            matches!(e, HeaderError::Corrupt(ref m) if m.contains("truncated")),
            "{e:?}"
        );
    }

    #[test]
    fn short_header_is_corrupt_not_panic() {
        let b = minimal_v3(1 << 20);
        for n in 0..120 {
            let _ = parse(&b[..n], n as u64);
        }
        assert_eq!(parse(&b[..3], 3), Err(HeaderError::NotQcow2));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
                                       flips in proptest::collection::vec((0usize..512, proptest::num::u8::ANY), 0..16)) {
            let _ = parse(&bytes, bytes.len() as u64);
            let mut b = minimal_v3(1 << 20);
            b.truncate(4096);
            for (i, v) in flips { b[i % 512] = v; }
            let _ = parse(&b, 65536 * 4);
        }
    }
}
