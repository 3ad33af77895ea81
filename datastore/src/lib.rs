//! `datastore` will own ferry's clustered on-disk format (DESIGN §3): superblocks, the
//! heartbeat region and host leases, the Disk Paxos volume lease, object locks, fencing,
//! resource clusters, files and directories, journals and fsck. Its files will implement
//! `diskfmt::BlockDev`.
//!
//! It is empty until Step 2: nothing here decides ownership yet.
#![forbid(unsafe_code)]
