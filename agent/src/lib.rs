//! `agent` is the host daemon (`ferry agent`), layered bottom to top: the small HTTP
//! subset it speaks ([`http`]) and the protocol between agents ([`wire`]); the host's
//! state ([`host`]: configuration, datastore membership, NBD exports, tasks, the VMs
//! running here); VMs under QEMU ([`vms`]); relocation of VMs between datastores and
//! hosts ([`relocation`]); the control API ([`api`]); and the daemon that starts,
//! recovers and stops it all ([`daemon`]). Each layer uses only the ones below it.
#![forbid(unsafe_code)]

pub mod error;
pub mod http;
pub mod wire;

pub mod host;

pub mod vms;

pub mod relocation;

pub mod api;

pub mod daemon;
