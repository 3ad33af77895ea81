//! `vm-glue` owns everything that talks to QEMU and to other hosts (DESIGN §2): the host
//! agent and its control API ([`agent`], over the small HTTP subset in [`http`]), the QMP
//! client ([`qmp`]), VMs under QEMU and their relocation ([`vm`]). Disks travel between
//! hosts over the [`nbd`] crate.
#![forbid(unsafe_code)]

pub mod agent;
pub mod http;
pub mod qmp;
pub mod vm;
