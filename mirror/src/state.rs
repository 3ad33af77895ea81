//! A mirror job's state, shared by the guest I/O path ([`crate::job`]) and the copier
//! ([`crate::copier`]): options, phases, the dirty/copying/touched bitmaps, counters,
//! and the state changes both make (a target failure, a region dirtied again).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskfmt::{BlockDev, Error};
use tokio::sync::{watch, Notify};

use crate::bitmap::Bitmap;
use crate::ranges::Queue;

/// How a mirror job runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes per dirty-bitmap bit (a power of two, at least 4 KiB).
    pub grain: u64,
    /// Largest single copy.
    pub chunk: u64,
    /// Copies in flight at once (memory is bounded by `chunk × in_flight`).
    pub in_flight: usize,
    /// Bulk copy rate limit in bytes/s (guest writes are never throttled).
    pub speed: Option<u64>,
    /// A target request not done by then counts as failed (the guest is not failed).
    pub target_timeout: Duration,
    /// Consecutive target failures tolerated before the job fails.
    pub max_retries: u32,
    /// The target reads as zeros everywhere at the start (a freshly created file): the
    /// bulk pass skips zero regions instead of writing zeros.
    pub target_zeroed: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            grain: 64 << 10,
            chunk: 1 << 20,
            in_flight: 8,
            speed: None,
            target_timeout: Duration::from_secs(10),
            max_retries: 5,
            target_zeroed: true,
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The bulk pass runs; guest writes to copied regions are mirrored.
    Copying,
    /// Everything is on the target and every guest write is mirrored.
    Ready,
    /// `prepare_pivot` holds the device: guest I/O waits.
    Completing,
    /// Pivoted: all I/O goes to the target only.
    Done,
    /// Stopped by request; the source stays authoritative.
    Cancelled,
    /// Stopped by an error; the source stays authoritative.
    Failed(String),
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Ready => "ready",
            Phase::Completing => "completing",
            Phase::Done => "done",
            Phase::Cancelled => "cancelled",
            Phase::Failed(_) => "failed",
        }
    }

    /// Whether guest I/O still goes to both sides.
    pub(crate) fn mirroring(&self) -> bool {
        matches!(self, Phase::Copying | Phase::Ready | Phase::Completing)
    }
}

/// A snapshot of a job's progress.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    pub phase: &'static str,
    pub error: Option<String>,
    /// Bytes copied by the bulk pass and re-copies.
    pub done_bytes: u64,
    /// Bytes the job has had to copy so far (allocated data, plus anything re-dirtied).
    pub total_bytes: u64,
    /// Bytes not yet known to be on the target.
    pub dirty_bytes: u64,
    /// Guest bytes written to both sides.
    pub mirrored_bytes: u64,
    pub rate_bytes_per_s: f64,
    pub eta_s: Option<f64>,
    pub target_errors: u64,
    pub elapsed_s: f64,
}

pub(crate) struct State {
    pub(crate) phase: Phase,
    /// Not known to be on the target.
    pub(crate) dirty: Bitmap,
    /// Picked by a copy in flight.
    pub(crate) copying: Bitmap,
    /// Written by the guest (to the source only) since a copy picked them: that copy's
    /// result does not make them clean.
    pub(crate) redirtied: Bitmap,
    /// Written on the target by this job (so no longer known to read as zeros there).
    pub(crate) touched: Bitmap,
    pub(crate) done_bytes: u64,
    pub(crate) total_bytes: u64,
    pub(crate) mirrored_bytes: u64,
    pub(crate) consecutive_errors: u32,
    pub(crate) target_errors: u64,
    pub(crate) frozen: bool,
    pub(crate) speed: Option<u64>,
    /// The earliest time the next bulk copy may start (throttle).
    pub(crate) next_slot: Instant,
}

pub(crate) struct Shared {
    pub(crate) name: PathBuf,
    pub(crate) source: Arc<dyn BlockDev>,
    pub(crate) target: Arc<dyn BlockDev>,
    pub(crate) opts: Options,
    pub(crate) size: u64,
    pub(crate) grains: u64,
    pub(crate) queue: Arc<Queue>,
    pub(crate) st: Mutex<State>,
    /// Wakes the copier (new dirty grains, phase changes, freeze/unfreeze).
    pub(crate) poke: Notify,
    pub(crate) phase_tx: watch::Sender<Phase>,
    pub(crate) started: Instant,
}

pub(crate) fn timed_out(name: &Path, op: &'static str, offset: u64, t: Duration) -> Error {
    Error::Io {
        object: name.to_path_buf(),
        op,
        offset,
        err: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the target did not answer within {} ms", t.as_millis()),
        ),
    }
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}
impl Shared {
    pub(crate) fn grains_of(&self, offset: u64, len: u64) -> (u64, u64) {
        let g = self.opts.grain;
        (offset / g, (offset + len).div_ceil(g).min(self.grains))
    }

    pub(crate) fn phase(&self) -> Phase {
        self.st.lock().expect("mirror state").phase.clone()
    }

    pub(crate) fn set_phase(&self, st: &mut State, p: Phase) {
        if st.phase != p {
            tracing::debug!(
                "{}: mirror {} -> {}",
                self.name.display(),
                st.phase.as_str(),
                p.as_str()
            );
            st.phase = p.clone();
            self.phase_tx.send_replace(p);
            self.poke.notify_one();
        }
    }

    /// Records a target failure over grains `g0..g1`: they are dirty again; past the
    /// retry bound the job fails (the source stays authoritative).
    pub(crate) fn target_failed(&self, g0: u64, g1: u64, e: &Error) {
        let mut st = self.st.lock().expect("mirror state");
        self.redirty(&mut st, g0, g1);
        st.consecutive_errors += 1;
        st.target_errors += 1;
        tracing::warn!(
            "{}: target request failed ({}/{} in a row): {e}",
            self.name.display(),
            st.consecutive_errors,
            self.opts.max_retries
        );
        // While a pivot holds guest I/O (Completing) only its holder changes the phase: a
        // failure then (say, a guest flush sent just before the hold) must not reroute
        // guest writes to the source behind the pivot's back.
        if st.consecutive_errors > self.opts.max_retries
            && st.phase.mirroring()
            && st.phase != Phase::Completing
        {
            let msg = format!(
                "the target {} failed {} times in a row, last: {e}; the source stays in use",
                self.target.name().display(),
                st.consecutive_errors
            );
            self.set_phase(&mut st, Phase::Failed(msg));
        }
        drop(st);
        self.poke.notify_one();
    }

    /// Marks grains `g0..g1` as not on the target.
    pub(crate) fn redirty(&self, st: &mut State, g0: u64, g1: u64) {
        st.redirtied.set_range(g0, g1);
        let added = st.dirty.set_range(g0, g1);
        st.total_bytes += added * self.opts.grain;
        if added > 0 && st.phase == Phase::Ready {
            self.set_phase(st, Phase::Copying);
        }
    }

    pub(crate) fn timed_out(&self, op: &'static str, offset: u64) -> Error {
        timed_out(self.target.name(), op, offset, self.opts.target_timeout)
    }
}
