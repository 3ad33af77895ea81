use super::*;

fn ds() -> Uuid {
    Uuid::from_u128(0x1234)
}

#[test]
fn records_round_trip() {
    let sb = Superblock::layout(ds(), "lab", 1 << 30, 8, Profile::Test);
    assert_eq!(
        Superblock::decode(&sb.encode(3)),
        Decoded::Valid(sb.clone())
    );
    let slot = HostSlot {
        host_id: 3,
        state: SlotState::Joined,
        host_generation: 7,
        incarnation: Uuid::from_u128(9),
        renewal: 42,
        name: "h3".into(),
        address: "10.0.0.3:7000".into(),
    };
    assert_eq!(
        HostSlot::decode(&slot.encode(&ds()), &ds()),
        Decoded::Valid(slot)
    );
    let lk = LockRecord {
        object: "vm/disk0".into(),
        mode: LockMode::Shared,
        version: 5,
        holders: vec![
            Owner {
                host_id: 1,
                generation: 2,
            },
            Owner {
                host_id: 4,
                generation: 1,
            },
        ],
    };
    assert_eq!(
        LockRecord::decode(&lk.encode(&ds()), &ds()),
        Decoded::Valid(lk)
    );
    let bal = Ballot {
        lver: 3,
        mbal: 17,
        bal: 17,
        inp: Some(Owner {
            host_id: 1,
            generation: 1,
        }),
        released: 2,
    };
    assert_eq!(
        Ballot::decode(&bal.encode(&ds()), &ds()),
        Decoded::Valid(bal)
    );
}

#[test]
fn damaged_records_are_unknown_never_blank() {
    let lk = LockRecord {
        object: "x".into(),
        mode: LockMode::Exclusive,
        version: 1,
        holders: vec![],
    };
    let good = lk.encode(&ds());
    for off in [0usize, 8, 16, 40, 300, 4000, RECORD - 1] {
        let mut b = good.clone();
        b.0[off] ^= 0x40;
        assert!(
            matches!(LockRecord::decode(&b, &ds()), Decoded::Unknown(_)),
            "byte {off}"
        );
    }
    assert_eq!(LockRecord::decode(&Block::zeroed(), &ds()), Decoded::Blank);
    // A record of another datastore is not ours.
    assert!(matches!(
        LockRecord::decode(&good, &Uuid::from_u128(1)),
        Decoded::Unknown(_)
    ));
}

proptest::proptest! {
    #[test]
    fn arbitrary_blocks_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, RECORD)) {
        let mut b = Block::zeroed();
        b.0.copy_from_slice(&bytes);
        let _ = Superblock::decode(&b);
        let _ = HostSlot::decode(&b, &ds());
        let _ = Leader::decode(&b, &ds());
        let _ = Ballot::decode(&b, &ds());
        let _ = LockRecord::decode(&b, &ds());
    }
}

mod timing {
    use super::*;

    #[test]
    fn both_profiles_keep_the_timing_rules_and_a_broken_margin_is_refused() {
        for p in [Profile::Production, Profile::Test] {
            let sb = Superblock::layout(Uuid::new_v4(), "t", 1 << 30, 8, p);
            sb.check_timing().unwrap();
            assert!(sb.kill_grace() >= sb.io_timeout() / 2);
            let mut bad = sb.clone();
            bad.fence_margin_ms = bad.io_timeout_ms / 2;
            let e = bad.check_timing().unwrap_err();
            assert!(e.contains("fence margin"), "{e}");
        }
    }
}
