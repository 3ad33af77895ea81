//! Test hooks: named points where a test can crash a process, stall a step or change a
//! setting, through one registry every crate of ferry asks.
//!
//! Nothing in the shipped `ferry` installs hooks, so there every point is a no-op (one
//! atomic load) and the binary reads no test variable. The test build of the command
//! (`ferry-hooked`, and the test tools) installs a [`Hooks`] reading `FERRY_FAILPOINTS`
//! (see `ferry_tests::hooks`). A cargo feature could not keep the hooks out of the shipped
//! binary: cargo unifies features within one build, so the `ferry` built beside the tests
//! would carry them.
//!
//! Points (by crate): datastore `journal-written`, `apply-partial`, `applied` (crash at
//! that journal step), setting `renew-delay-ms` (every heartbeat write that much slower
//! once joined), `unsafe-no-fence` (watchdogs only report); agent
//! `migrate-after-handoff`, `both-after-commit`, `pivot-before-config`,
//! `pivot-after-config`, `pivot-after-switch`, `mirror-freeze`, `switchover-hold-finish`
//! (the source holds its finish call until `run_dir/switchover.go` exists),
//! `finish-reply-lost` (the destination resumes but answers with an error),
//! `incoming-prepare-hold` (the destination holds before making a move's files until
//! `run_dir/prepare.go` exists), `commit-lands-then-fails`, `cold-finish-hold` (a
//! powered-off move's destination holds its commit); settings `finish-window-s`,
//! `settle-window-s` (how long the source waits for the destination's finish, and keeps
//! asking it after a failed switchover), `pivot-flush-fails=N` (a storage move's N-th
//! disk's new file fails its flushes from the pivot on).

use std::sync::OnceLock;

/// What a test build answers for each point.
pub trait Hooks: Send + Sync {
    /// Whether `point` fires at this hit (a registry may count hits).
    fn fires(&self, point: &str) -> bool;
    /// A number the test set for `setting`.
    fn setting(&self, setting: &str) -> Option<u64>;
}

static HOOKS: OnceLock<Box<dyn Hooks>> = OnceLock::new();

/// Installs the test hooks of this process (once; later calls are ignored).
pub fn install(hooks: Box<dyn Hooks>) {
    let _ = HOOKS.set(hooks);
}

/// Whether `point` fires now (never without installed hooks).
pub fn fires(point: &str) -> bool {
    HOOKS.get().is_some_and(|h| h.fires(point))
}

/// The test setting `setting`, if hooks are installed and set it.
pub fn setting(setting: &str) -> Option<u64> {
    HOOKS.get().and_then(|h| h.setting(setting))
}

/// Kills this process with SIGKILL if `point` fires (crash tests).
pub fn crash_at(point: &str) {
    if fires(point) {
        eprintln!("ferry: failpoint {point}: killing myself");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
