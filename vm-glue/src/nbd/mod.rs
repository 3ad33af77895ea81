//! NBD: ferry's own server and client. `proto` is the wire format, `server` serves any
//! `diskfmt::BlockDev` over unix sockets and TCP, `client` is a remote export as a
//! `BlockDev`.

pub mod client;
pub mod proto;
pub mod server;

pub use client::NbdClient;
pub use server::{Export, Server};
