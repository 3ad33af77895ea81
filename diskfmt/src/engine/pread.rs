//! The pread/pwrite backend: a few worker threads sharing one request queue, each doing
//! blocking positional I/O. Chosen when io_uring is unavailable or `FERRY_IO_ENGINE=pread`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{mpsc, Arc, Mutex};

use super::{Backend, Op, OpKind};
use crate::sys;

pub(super) struct PreadBackend {
    tx: mpsc::Sender<Op>,
}

impl PreadBackend {
    pub(super) fn start(threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("ferry-pread-{i}"))
                .spawn(move || loop {
                    let op = match rx.lock().expect("queue lock").recv() {
                        Ok(op) => op,
                        Err(_) => return,
                    };
                    execute(op);
                })?;
        }
        Ok(PreadBackend { tx })
    }
}

impl Backend for PreadBackend {
    fn submit(&self, op: Op) {
        let _ = self.tx.send(op);
    }
}

fn execute(mut op: Op) {
    let fd = op.fd.as_raw_fd();
    let offset = op.offset;
    let res = match &mut op.kind {
        OpKind::Read { buf, at, len } => {
            assert!(*at + *len <= buf.capacity());
            // SAFETY: the buffer is owned by this op and at least `at + len` bytes long.
            unsafe { sys::pread(fd, buf.as_mut_ptr().add(*at), *len, offset) }
        }
        OpKind::Write { buf, len, dsync } => {
            assert!(*len <= buf.capacity());
            // SAFETY: the buffer is owned by this op and at least `len` bytes long.
            unsafe { sys::pwrite(fd, buf.as_mut_ptr(), *len, offset, *dsync) }
        }
        OpKind::Fsync { datasync } => sys::fsync(fd, *datasync).map(|_| 0),
        OpKind::Fallocate { mode, len } => {
            sys::fallocate(op.fd.as_fd(), *mode, offset, *len).map(|_| 0)
        }
    };
    op.complete(res);
}
