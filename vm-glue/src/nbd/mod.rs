//! NBD: ferry's own server (and, later, client). `proto` is the wire format, `server`
//! serves any `diskfmt::BlockDev` over unix sockets and TCP.

pub mod proto;
pub mod server;

pub use server::{Export, Server};
