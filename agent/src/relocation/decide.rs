//! The decision table: which kind of move a relocation request makes. One pure function,
//! asked by the entry point ([`super::start`]) and again by the host move once it knows
//! the VM's state and where its files go.

/// Every kind of move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Disks and/or the definition to other datastores; the VM stays on this host, live
    /// or powered off ([`super::storage`]).
    Storage,
    /// A running VM to another host ([`super::host_move`]); with `storage`, its disks move
    /// to new files there at the same time (mirrored over NBD before the memory moves).
    Host { storage: bool },
    /// A powered-off VM to another host that sees its files already: nothing moves, the
    /// destination is checked.
    PoweredOffCheck,
    /// A powered-off VM whose files go to datastores this host sees too: they move here
    /// first (a storage move), then the destination is checked.
    PoweredOffStorageHere,
    /// A powered-off VM whose files go to datastores only the destination sees: copied
    /// over NBD into files it makes ([`super::cold_move`]).
    PoweredOffOverNbd,
}

/// Decides the move: `other_host` — the request names a host other than this one;
/// `running` — the VM runs here; `storage` — some disk or the definition changes
/// datastore or format; `sees_targets` — this host sees every datastore they go to.
pub fn decide(other_host: bool, running: bool, storage: bool, sees_targets: bool) -> Move {
    match (other_host, running, storage, sees_targets) {
        (false, ..) => Move::Storage,
        (true, true, storage, _) => Move::Host { storage },
        (true, false, false, _) => Move::PoweredOffCheck,
        (true, false, true, true) => Move::PoweredOffStorageHere,
        (true, false, true, false) => Move::PoweredOffOverNbd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_has_one_move() {
        for other_host in [false, true] {
            for running in [false, true] {
                for storage in [false, true] {
                    for sees in [false, true] {
                        let want = match (other_host, running, storage, sees) {
                            // This host: a storage move, running or not, wherever the
                            // files go (a host sees the datastores it moves files to).
                            (false, _, _, _) => Move::Storage,
                            // Running: always live, the storage along or not.
                            (true, true, false, _) => Move::Host { storage: false },
                            (true, true, true, _) => Move::Host { storage: true },
                            // Powered off, nothing to copy: a check of the destination.
                            (true, false, false, _) => Move::PoweredOffCheck,
                            // Powered off with files to move: here if this host sees
                            // where they go, else over NBD.
                            (true, false, true, true) => Move::PoweredOffStorageHere,
                            (true, false, true, false) => Move::PoweredOffOverNbd,
                        };
                        assert_eq!(
                            decide(other_host, running, storage, sees),
                            want,
                            "other host {other_host}, running {running}, storage {storage}, \
                             sees {sees}"
                        );
                    }
                }
            }
        }
    }
}
