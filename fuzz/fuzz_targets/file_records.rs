//! Fuzzes the records of files, space and the journal, and datastore path parsing: any
//! 4 KiB block decodes without a panic, and whatever decodes encodes back to the same;
//! any path either parses to one that prints and parses the same, or is refused.
#![no_main]

use datastore::filerec::{cluster, ClusterRec, Descriptor, JournalHeader, PointerRec};
use datastore::files::DsPath;
use datastore::format::{Block, Decoded, OFF_UUID, RECORD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Block::zeroed();
    let n = data.len().min(RECORD);
    b.0[..n].copy_from_slice(&data[..n]);
    let ds = uuid::Uuid::from_bytes(b.0[OFF_UUID..OFF_UUID + 16].try_into().unwrap());
    if let Decoded::Valid((d, g)) = Descriptor::decode(&b, &ds) {
        assert_eq!(Descriptor::decode(&d.encode(&ds, g), &ds), Decoded::Valid((d, g)));
    }
    if let Decoded::Valid((p, g)) = PointerRec::decode(&b, &ds) {
        assert_eq!(PointerRec::decode(&p.encode(&ds, g), &ds), Decoded::Valid((p, g)));
    }
    let cluster = u32::from_le_bytes(b.0[cluster::CLUSTER..cluster::CLUSTER + 4].try_into().unwrap());
    for inbox in [false, true] {
        if let Decoded::Valid((c, g)) = ClusterRec::decode(&b, &ds, inbox, cluster) {
            if g > 0 {
                assert_eq!(
                    ClusterRec::decode(&c.encode(&ds, inbox, g), &ds, inbox, cluster),
                    Decoded::Valid((c, g))
                );
            }
        }
    }
    if let Decoded::Valid(j) = JournalHeader::decode(&b, &ds) {
        assert_eq!(JournalHeader::decode(&j.encode(&ds), &ds), Decoded::Valid(j));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = DsPath::parse(std::path::Path::new("fuzz"), s) {
            let shown = p.to_string();
            assert_eq!(DsPath::parse(std::path::Path::new("fuzz"), &shown).ok(), Some(p));
        }
    }
});
