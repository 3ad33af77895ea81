//! The arrival-ordered range queue behind the mirror's ordering rules (DESIGN §4).
//!
//! Every guest write and every copy enters the queue with the byte range it touches and
//! waits until no *earlier* entry it conflicts with is still there:
//! - a guest **write** waits for earlier overlapping writes and copies, so overlapping
//!   guest writes apply in arrival order on both sides;
//! - a **copy** (the bulk copy of dirty grains) waits for every earlier overlapping entry
//!   (so it reads the source after every write that came before it), but later guest
//!   writes pass it: they find its grains dirty, go to the source only and mark them
//!   written during the copy, so the copy's result does not count for them (`redirtied`
//!   in the job state) — a copy whose target hangs never holds up a guest write;
//! - a **claim** (the pivot's claim of the whole device, the zero scan) waits for every
//!   earlier overlapping entry, and every later overlapping write waits for it;
//! - a **tail** is a write or copy whose target half outlived its timeout: its guest
//!   half is done and its range re-dirtied, so later guest writes (which then go to the
//!   source only) pass it, but later claims wait until the target write has really
//!   finished — a range is re-sent only after every earlier target write to it ended.
//!
//! Entries leave the queue when their [`Ticket`] is dropped, also when the waiting
//! future is dropped.

use std::pin::pin;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Write,
    Copy,
    Claim,
    Tail,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    kind: Kind,
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    entries: Mutex<(u64, Vec<Entry>)>,
    changed: Notify,
}

/// A place in the queue; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    queue: Arc<Queue>,
    id: u64,
}

fn conflicts(earlier: Kind, later: Kind) -> bool {
    match later {
        Kind::Claim | Kind::Copy => true,
        Kind::Write => matches!(earlier, Kind::Write | Kind::Claim),
        Kind::Tail => false,
    }
}

impl Queue {
    /// Enters the queue and waits for the turn of `start..end`.
    pub(crate) async fn enter(self: &Arc<Self>, start: u64, end: u64, kind: Kind) -> Ticket {
        let ticket = {
            let mut g = self.entries.lock().expect("queue");
            g.0 += 1;
            let id = g.0;
            g.1.push(Entry {
                id,
                start,
                end,
                kind,
            });
            Ticket {
                queue: Arc::clone(self),
                id,
            }
        };
        loop {
            let mut changed = pin!(self.changed.notified());
            {
                let g = self.entries.lock().expect("queue");
                let blocked =
                    g.1.iter()
                        .take_while(|e| e.id != ticket.id)
                        .any(|e| e.start < end && start < e.end && conflicts(e.kind, kind));
                if !blocked {
                    return ticket;
                }
                changed.as_mut().enable();
            }
            changed.await;
        }
    }

    /// How many entries are in the queue (granted or waiting).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().expect("queue").1.len()
    }
}

impl Ticket {
    /// Turns a granted write or claim into a tail (its target half still runs).
    pub(crate) fn into_tail(self) -> Ticket {
        {
            let mut g = self.queue.entries.lock().expect("queue");
            if let Some(e) = g.1.iter_mut().find(|e| e.id == self.id) {
                e.kind = Kind::Tail;
            }
        }
        self.queue.changed.notify_waiters();
        self
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut g = self.queue.entries.lock().expect("queue");
            g.1.retain(|e| e.id != self.id);
        }
        self.queue.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn blocked(q: &Arc<Queue>, s: u64, e: u64, k: Kind) -> bool {
        tokio::time::timeout(Duration::from_millis(50), q.enter(s, e, k))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn arrival_order_claims_and_tails() {
        let q = Arc::new(Queue::default());
        let w1 = q.enter(0, 10, Kind::Write).await;
        // Overlapping later writes and claims wait; disjoint ones do not.
        assert!(blocked(&q, 5, 15, Kind::Write).await);
        assert!(blocked(&q, 9, 12, Kind::Claim).await);
        let _w2 = q.enter(10, 20, Kind::Write).await;
        // A tail lets writes pass but not claims.
        let t1 = w1.into_tail();
        let w3 = q.enter(0, 5, Kind::Write).await;
        drop(w3);
        assert!(blocked(&q, 0, 5, Kind::Claim).await);
        drop(t1);
        let c = q.enter(0, 5, Kind::Claim).await;
        // A write that arrives after a claim waits for it, even if it arrived while the
        // claim itself was still waiting.
        assert!(blocked(&q, 4, 6, Kind::Write).await);
        drop(c);
        // Dropped waiters left the queue.
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn writes_pass_copies_and_copies_wait_for_writes() {
        let q = Arc::new(Queue::default());
        let w1 = q.enter(0, 10, Kind::Write).await;
        // A copy waits for the earlier write; a later write passes the waiting copy.
        let q2 = Arc::clone(&q);
        let copy = tokio::spawn(async move { q2.enter(0, 10, Kind::Copy).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!copy.is_finished());
        drop(w1);
        let c = copy.await.unwrap();
        // Granted, it still lets writes pass; a claim waits for it.
        let w2 = q.enter(0, 10, Kind::Write).await;
        drop(w2);
        assert!(blocked(&q, 0, 10, Kind::Claim).await);
        drop(c);
    }
}
