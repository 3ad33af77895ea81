//! `vm-glue` will own everything that talks to QEMU and to other hosts (DESIGN §2): the
//! QEMU launcher, QMP client and VM spec; the NBD server and client; the host agent and
//! its control API; relocation orchestration (storage pivot, compute handoff, rollback).
//!
//! Today: [`nbd`], the NBD server (Step 4, in progress).
#![forbid(unsafe_code)]

pub mod nbd;
