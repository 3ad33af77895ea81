//! `mirror` owns the IO-mirroring engine of DESIGN §4 (as Storage vMotion does it): one
//! bulk pass over the source's allocated data plus synchronous mirroring of guest writes,
//! between any two [`diskfmt::BlockDev`]s.
//!
//! A [`Mirror`] is itself a `BlockDev`: the owner of a disk (the agent's NBD export)
//! routes guest I/O through it while it runs.
//! - Guest writes to regions already on the target go to both sides in parallel and
//!   complete when both have (a target failure or timeout never fails the guest: the
//!   region is re-dirtied and copied again, a bounded number of times in a row, then the
//!   job fails and the source stays in use). Writes to regions not yet copied go to the
//!   source only. Flushes go to both sides.
//! - Ordering ([`ranges`]): overlapping guest writes apply in arrival order on both
//!   sides; a copy claims its range, waits for the writes in flight there, then copies;
//!   a range is re-sent only after every earlier target write to it has ended.
//! - The copier ([`copier`]) skips zeros on a target known to be zero; thick targets get
//!   their zeros written.
//! - Phases: copying → ready → completing → done, or cancelled / failed; the pivot
//!   ([`Mirror::prepare_pivot`]) holds guest I/O while the caller makes the switch durable.
#![forbid(unsafe_code)]

mod bitmap;
pub mod copier;
mod error;
mod job;
pub mod ranges;
mod state;

pub use error::{Error, Result};
pub use job::{prepare_pivots, Mirror, Pivot};
pub use state::{Options, Phase, Progress};
