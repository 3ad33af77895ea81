//! `vm-glue` owns everything that talks to QEMU and to other hosts (DESIGN §2): the NBD
//! server and client ([`nbd`]), the host agent and its control API ([`agent`], over the
//! small HTTP subset in [`http`]), the QMP client ([`qmp`]), VMs under QEMU ([`vm`]); later
//! relocation orchestration (storage pivot, compute handoff, rollback).
#![forbid(unsafe_code)]

pub mod agent;
pub mod http;
pub mod nbd;
pub mod qmp;
pub mod vm;
