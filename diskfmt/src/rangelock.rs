//! Byte-range locks that serialise read-modify-write cycles against overlapping writes.
//!
//! Plain aligned writes take a *shared* range (they may overlap each other: the caller
//! orders overlapping writes, as with any disk); read-modify-writes and zeroing take an
//! *exclusive* range, which waits for, and blocks, every overlapping holder. A guard is an
//! `Arc`, so the engine can keep a range held until the kernel finished writing even if
//! the caller dropped its future.

use std::pin::pin;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    state: Mutex<State>,
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

/// A held range; released when the last clone is dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl RangeLock {
    /// Waits until `start..end` can be held in the given mode, then holds it.
    pub(crate) async fn lock(
        self: &Arc<Self>,
        start: u64,
        end: u64,
        exclusive: bool,
    ) -> Arc<RangeGuard> {
        loop {
            let mut notified = pin!(self.released.notified());
            {
                let mut st = self.state.lock().expect("range lock state");
                let conflict = st
                    .held
                    .iter()
                    .any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
                if !conflict {
                    st.next_id += 1;
                    let id = st.next_id;
                    st.held.push(Held {
                        id,
                        start,
                        end,
                        exclusive,
                    });
                    return Arc::new(RangeGuard {
                        lock: Arc::clone(self),
                        id,
                    });
                }
                // Register for the wake-up before releasing the state lock, so a release
                // between here and the await is not missed.
                notified.as_mut().enable();
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut st = self.lock.state.lock().expect("range lock state");
        st.held.retain(|h| h.id != self.id);
        drop(st);
        self.lock.released.notify_waiters();
    }
}
