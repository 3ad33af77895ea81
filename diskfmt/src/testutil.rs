//! Helpers shared by the crate's unit tests (fault injection itself lives in
//! `engine::faults`, next to the engine internals it wraps).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A current-thread runtime with timers.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `f` once: `Some` if it finished, `None` if it is waiting (it may be polled again).
pub(crate) fn poll_once<F: Future>(f: Pin<&mut F>) -> Option<F::Output> {
    let waker = futures::task::noop_waker();
    match f.poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// A recognisable non-zero byte pattern for `len` bytes at `offset`.
pub(crate) fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (offset + i).wrapping_mul(131).wrapping_add(seed as u64) as u8 | 1)
        .collect()
}
