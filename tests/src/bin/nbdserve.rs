//! nbdserve: serves one raw image or block device over ferry's NBD server on a unix
//! socket, until killed. `nbdserve PATH SOCKET NAME`. Used by scripts/bench-nbd.sh to
//! compare with `qemu-nbd` on the same device (the agent serves datastore files the same way).

use std::sync::Arc;

use diskfmt::raw::RawImage;
use diskfmt::{BlockDev, Engine};
use nbd::{Export, Server};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert!(a.len() == 4, "usage: nbdserve PATH SOCKET NAME");
    // One thread runs every connection's reader, request tasks and writer: no hand-offs
    // between runtime threads on the request path (the I/O engine has its own thread).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dev: Arc<dyn BlockDev> = Arc::new(
        RawImage::open(
            std::path::Path::new(&a[1]),
            true,
            Engine::global().expect("engine"),
        )
        .expect("open image"),
    );
    let server = Server::new();
    server.add(Export {
        name: a[3].clone(),
        description: String::new(),
        dev,
        read_only: false,
    });
    let _ = std::fs::remove_file(&a[2]);
    rt.block_on(async {
        let l = tokio::net::UnixListener::bind(&a[2]).expect("bind");
        server.serve_unix(l).await.expect("serve");
    });
}
