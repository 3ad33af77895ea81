//! `mirror` will own the IO-mirroring engine of DESIGN §4: one bulk pass plus synchronous
//! mirroring of guest writes between any two `diskfmt::BlockDev`s, with a dirty bitmap,
//! in-flight range tracking, zero/thin awareness, throttle, progress and
//! ready/complete/cancel.
//!
//! It is empty until Step 6.
#![forbid(unsafe_code)]
