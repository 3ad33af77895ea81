//! `nbd` owns ferry's NBD: the wire format ([`proto`]), a server of any
//! [`diskfmt::BlockDev`] over unix sockets and TCP ([`server`]), and a client that makes
//! a remote export a `BlockDev` ([`client`]). It depends on `diskfmt` alone.
#![forbid(unsafe_code)]

pub mod client;
pub mod proto;
pub mod server;

pub use client::NbdClient;
pub use server::{Export, Server};
