//! Fuzzes datastore record decoding: any 4 KiB block, every record type, never a panic;
//! a block that decodes must encode back to a block that decodes the same.
#![no_main]

use datastore::format::{
    Ballot, Block, Decoded, HostSlot, Leader, LockRecord, Superblock, OFF_UUID, RECORD,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Block::zeroed();
    let n = data.len().min(RECORD);
    b.0[..n].copy_from_slice(&data[..n]);
    if let Decoded::Valid(sb) = Superblock::decode(&b) {
        assert_eq!(Superblock::decode(&sb.encode(1)), Decoded::Valid(sb));
    }
    let ds = uuid::Uuid::from_bytes(b.0[OFF_UUID..OFF_UUID + 16].try_into().unwrap());
    if let Decoded::Valid(s) = HostSlot::decode(&b, &ds) {
        assert_eq!(HostSlot::decode(&s.encode(&ds), &ds), Decoded::Valid(s));
    }
    let _ = Leader::decode(&b, &ds);
    let _ = Ballot::decode(&b, &ds);
    if let Decoded::Valid(l) = LockRecord::decode(&b, &ds) {
        assert_eq!(LockRecord::decode(&l.encode(&ds), &ds), Decoded::Valid(l));
    }
});
