//! A deterministic simulator for the datastore's lease and lock protocol.
//!
//! Simulated hosts run the real protocol code (`HostLease`, `VolumeLease`, `locks`) over
//! an in-memory [`RecordIo`], each with a virtual `CLOCK_BOOTTIME` of its own (a random
//! offset from the simulation's time, so no cross-host clock comparison can pass by
//! accident). Every actor (a host's main task, its renewer) is an OS thread, but only the
//! one holding the baton runs: every record read, record write, clock read and sleep is a
//! scheduling point where a seeded generator picks who runs next. The same seed therefore
//! replays the same schedule, step for step.
//!
//! Faults, all seeded:
//! - **stalls**: at any read or clock read an actor may stop for up to `max_stall` (a
//!   process stopped, swapped out, starved), while every other actor goes on;
//! - **slow writes**: a write lands up to `max_inflight` after it was submitted; until it
//!   lands, reads of that record return, sector by sector, old or new data;
//! - **crashes**: a host dies at a random moment; its writes in flight land torn (a random
//!   subset of their 512-byte sectors), and it restarts later under the same name;
//! - **the watchdog**: a host is killed `fence_delay` after its own fencing deadline (last
//!   pet + `fence_after`), as the supervisor empties its cgroup; `fence_delay` may exceed
//!   the margin or be infinite (a process stuck in uninterruptible I/O).
//!
//! Invariants, checked at every step: no write is submitted by a host after its own
//! deadline; no two actors are at once inside the volume lease, or inside one lock with
//! at least one of them exclusive, while both of their hosts are within their deadlines;
//! no protocol code panics. Workloads add their own through [`World::violation`] (the
//! lock workload: a value its holders change only through their journals is never torn
//! and never behind one acknowledged earlier — journals are finished before their locks
//! change hands, and never replayed after).
//! Scripted stalls (a closure per actor) build directed scenarios on the same machinery.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use datastore::clock::Clock;
use datastore::device::RecordIo;
use datastore::format::{Block, RECORD};

/// Sector size at which writes tear.
pub const SECTOR: usize = 512;

/// Fault settings of one run.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance that an actor stalls at a read or a clock read.
    pub stall_prob: f64,
    /// Longest stall.
    pub max_stall: Duration,
    /// Longest time a write takes to land.
    pub max_inflight: Duration,
    /// Chance per scheduling step that a random host crashes.
    pub crash_prob: f64,
    /// How long after a crash the host restarts.
    pub restart_after: Duration,
    /// Longest delay between a host's deadline and its fencing; `None`: never fenced.
    pub fence_delay_max: Option<Duration>,
}

impl Faults {
    /// No faults at all: every request must succeed.
    pub fn none() -> Faults {
        Faults {
            stall_prob: 0.0,
            max_stall: Duration::ZERO,
            max_inflight: Duration::from_millis(5),
            crash_prob: 0.0,
            restart_after: Duration::from_secs(1),
            fence_delay_max: Some(Duration::ZERO),
        }
    }

    /// Everything at once, within what the protocol is built to survive.
    pub fn chaos() -> Faults {
        Faults {
            stall_prob: 0.01,
            max_stall: Duration::from_secs(25),
            max_inflight: Duration::from_millis(400),
            crash_prob: 0.0005,
            restart_after: Duration::from_secs(3),
            fence_delay_max: Some(Duration::from_millis(1500)),
        }
    }
}

/// What an actor is about to do at a scheduling point (scripted stalls look at it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Reading `n` records from `start`.
    Read { start: u64, n: u64 },
    /// Writing record `idx` (a scripted duration delays its landing, invisible until
    /// then; `Duration::MAX` crashes the host with the write half on the media).
    Write { idx: u64 },
    /// Reading the clock.
    Now,
    /// Sleeping.
    Sleep,
}

/// A scripted stall: called at every scheduling point of one actor.
pub type Script = Box<dyn FnMut(&Hook) -> Option<Duration> + Send>;

/// The payload an actor unwinds with when its host crashes or is fenced.
#[derive(Debug)]
pub struct Crashed;

type ActorId = usize;

struct Actor {
    host: usize,
    name: String,
    wake_at: Duration,
    done: bool,
    crashed: bool,
    script: Option<Script>,
}

#[derive(Default)]
struct HostState {
    /// Offset of this host's clock from simulation time.
    offset: Duration,
    /// Latest pet (simulation time of the issue time it carries).
    last_pet: Option<Duration>,
    /// Delay between the deadline and the kill.
    fence_delay: Option<Duration>,
    /// Incremented by every crash; actors of older epochs are dead.
    epoch: u64,
    crashed_at: Option<Duration>,
    /// How to restart the host after a crash.
    restart: Option<Arc<dyn Fn() + Send + Sync>>,
    restart_at: Option<Duration>,
    fenced: u64,
    crashes: u64,
}

struct Inflight {
    actor: ActorId,
    idx: u64,
    data: Box<Block>,
    /// Reaching the media: reads may see its sectors. A write held in a queue (a
    /// scripted delay) is invisible until it lands.
    visible: bool,
}

/// Simulation state, under one mutex.
struct St {
    now: Duration,
    end: Duration,
    current: Option<ActorId>,
    actors: Vec<Actor>,
    hosts: Vec<HostState>,
    rng: Rng,
    faults: Faults,
    fence_after: Duration,
    disk: HashMap<u64, Box<Block>>,
    inflight: Vec<Inflight>,
    /// Critical sections: object -> actors inside, and whether each holds it shared.
    inside: BTreeMap<String, Vec<(ActorId, bool)>>,
    /// Per object: the highest value whose journal commit returned success to its holder.
    acked: BTreeMap<String, u64>,
    violations: Vec<String>,
    trace: std::collections::VecDeque<String>,
    steps: u64,
    shutting_down: bool,
    /// Free-form counters the workloads bump.
    pub counters: BTreeMap<String, u64>,
}

struct Inner {
    st: Mutex<St>,
    cv: Condvar,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The simulated world; clone freely.
#[derive(Clone)]
pub struct World(Arc<Inner>);

thread_local! {
    static ME: std::cell::Cell<Option<(usize, ActorId)>> = const { std::cell::Cell::new(None) };
}

/// A splitmix64 generator: small, seedable, good enough for schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn dur(&mut self, max: Duration) -> Duration {
        Duration::from_nanos(self.below(max.as_nanos() as u64 + 1))
    }
    /// A stall: mostly short, sometimes up to `max`.
    pub fn stall(&mut self, max: Duration) -> Duration {
        match self.below(4) {
            0 => self.dur(max),
            1 => self.dur(max / 4),
            _ => self.dur(max / 40),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    pub steps: u64,
    pub now: Duration,
    pub counters: BTreeMap<String, u64>,
    pub fenced: u64,
    pub crashes: u64,
}

impl Report {
    /// Panics with the seed, the violations and the last steps, if anything broke.
    pub fn assert_ok(&self) {
        if std::env::var("FERRY_SIM_TRACE").is_ok() {
            eprintln!("seed {} trace:\n{}", self.seed, self.trace.join("\n"));
        }
        if !self.violations.is_empty() {
            panic!(
                "simulation seed {} broke the protocol (replay with FERRY_SIM_SEED={}):\n{}\nlast steps:\n{}",
                self.seed,
                self.seed,
                self.violations.join("\n"),
                self.trace.join("\n")
            );
        }
    }
}

impl World {
    /// A world of `hosts` hosts over a fresh in-memory device of `size` bytes.
    pub fn new(seed: u64, hosts: usize, faults: Faults, duration: Duration) -> World {
        let mut rng = Rng::new(seed);
        let hosts_v = (0..hosts)
            .map(|_| {
                let fence_delay = faults.fence_delay_max.map(|m| rng.dur(m));
                HostState {
                    offset: Duration::from_secs(rng.below(1000)) + rng.dur(Duration::from_secs(1)),
                    fence_delay,
                    ..HostState::default()
                }
            })
            .collect();
        World(Arc::new(Inner {
            st: Mutex::new(St {
                now: Duration::ZERO,
                end: duration,
                current: None,
                actors: Vec::new(),
                hosts: hosts_v,
                rng,
                faults,
                fence_after: Duration::from_secs(8),
                disk: HashMap::new(),
                inflight: Vec::new(),
                inside: BTreeMap::new(),
                acked: BTreeMap::new(),
                violations: Vec::new(),
                trace: std::collections::VecDeque::new(),
                steps: 0,
                shutting_down: false,
                counters: BTreeMap::new(),
            }),
            cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, St> {
        self.0.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the fencing deadline span (the datastore's `fence_after`).
    pub fn set_fence_after(&self, d: Duration) {
        self.lock().fence_after = d;
    }

    /// Overrides host `h`'s fencing delay (`None`: never fenced).
    pub fn set_fence_delay(&self, h: usize, d: Option<Duration>) {
        self.lock().hosts[h].fence_delay = d;
    }

    /// The record I/O of host `h`.
    pub fn io(&self, h: usize) -> Arc<dyn RecordIo> {
        Arc::new(SimIo {
            world: self.clone(),
            host: h,
            path: PathBuf::from(format!("sim-lun(host{h})")),
        })
    }

    /// The clock of host `h`.
    pub fn clock(&self, h: usize) -> Arc<dyn Clock> {
        Arc::new(SimClock {
            world: self.clone(),
            host: h,
        })
    }

    /// A pet function for host `h`'s lease: records its fencing deadline.
    pub fn pet(&self, h: usize) -> datastore::hostlease::PetFn {
        let w = self.clone();
        Box::new(move |issue: Duration| {
            let mut st = w.lock();
            let off = st.hosts[h].offset;
            let t = issue.saturating_sub(off);
            let hs = &mut st.hosts[h];
            hs.last_pet = Some(hs.last_pet.map_or(t, |p| p.max(t)));
        })
    }

    /// Registers how host `h` restarts after a crash.
    pub fn on_restart(&self, h: usize, f: impl Fn() + Send + Sync + 'static) {
        self.lock().hosts[h].restart = Some(Arc::new(f));
    }

    /// Starts an actor of host `h`. Called before `run` or by a running actor.
    pub fn spawn(&self, h: usize, name: &str, f: impl FnOnce() + Send + 'static) {
        let mut st = self.lock();
        self.spawn_locked(&mut st, h, name, f);
    }

    fn spawn_locked(&self, st: &mut St, h: usize, name: &str, f: impl FnOnce() + Send + 'static) {
        let id = st.actors.len();
        let wake_at = st.now;
        st.actors.push(Actor {
            host: h,
            name: format!("{name}{h}#{id}"),
            wake_at,
            done: false,
            crashed: false,
            script: None,
        });
        let w = self.clone();
        let t = std::thread::Builder::new()
            .name(format!("sim-{name}{h}"))
            .spawn(move || {
                ME.with(|m| m.set(Some((h, id))));
                // Wait for the first turn.
                {
                    let mut st = w.lock();
                    while st.current != Some(id) {
                        st = w.0.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    if st.actors[id].crashed {
                        drop(st);
                        w.finish(id, None);
                        return;
                    }
                }
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
                let why = match r {
                    Ok(()) => None,
                    Err(p) if p.is::<Crashed>() => None,
                    Err(p) => Some(
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into()),
                    ),
                };
                w.finish(id, why);
            })
            .expect("spawn a simulated actor");
        self.0.threads.lock().unwrap().push(t);
    }

    /// Sets the scripted stalls of the calling actor.
    pub fn script(&self, s: Script) {
        let id = current().1;
        self.lock().actors[id].script = Some(s);
    }

    fn finish(&self, id: ActorId, panic: Option<String>) {
        let mut st = self.lock();
        if let Some(p) = panic {
            if !st.actors[id].crashed {
                let name = st.actors[id].name.clone();
                let now = st.now;
                st.violations
                    .push(format!("t={now:?} {name}: protocol code panicked: {p}"));
                st.shutting_down = true;
            }
        }
        st.actors[id].done = true;
        st.inside
            .values_mut()
            .for_each(|v| v.retain(|(a, _)| *a != id));
        if st.current == Some(id) {
            self.schedule(&mut st);
            self.0.cv.notify_all();
        }
    }

    /// Runs until every actor is done (the end time crashes whoever is left).
    pub fn run(&self, seed: u64) -> Report {
        {
            let mut st = self.lock();
            self.schedule(&mut st);
            self.0.cv.notify_all();
            while st.actors.iter().any(|a| !a.done) {
                st = self.0.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        loop {
            let t = self.0.threads.lock().unwrap().pop();
            match t {
                Some(t) => {
                    let _ = t.join();
                }
                None => break,
            }
        }
        let st = self.lock();
        Report {
            seed,
            violations: st.violations.clone(),
            trace: st.trace.iter().cloned().collect(),
            steps: st.steps,
            now: st.now,
            counters: st.counters.clone(),
            fenced: st.hosts.iter().map(|h| h.fenced).sum(),
            crashes: st.hosts.iter().map(|h| h.crashes).sum(),
        }
    }

    /// Bumps a counter (workload statistics, liveness checks).
    pub fn count(&self, what: &str) {
        *self.lock().counters.entry(what.to_string()).or_default() += 1;
    }

    /// Simulation time.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// A random number, from the run's generator (call only from an actor).
    pub fn random(&self, n: u64) -> u64 {
        self.lock().rng.below(n)
    }

    /// Whether the run is ending (actors should wind down).
    pub fn ending(&self) -> bool {
        let st = self.lock();
        st.shutting_down || st.now >= st.end
    }

    /// Notes a line in the trace.
    pub fn note(&self, what: &str) {
        let mut st = self.lock();
        let me = current_opt().map(|(_, a)| st.actors[a].name.clone());
        let line = format!("t={:?} {}: {what}", st.now, me.unwrap_or_default());
        push_trace(&mut st, line);
    }

    /// The calling actor enters the critical section `object` (the volume lease, or an
    /// exclusive lock): checked against everyone inside whose host is within its deadline.
    pub fn enter(&self, object: &str) {
        self.enter_mode(object, false);
    }

    /// The calling actor enters `object` under a shared lock: checked against every
    /// exclusive holder inside whose host is within its deadline.
    pub fn enter_shared(&self, object: &str) {
        self.enter_mode(object, true);
    }

    fn enter_mode(&self, object: &str, shared: bool) {
        let (h, me) = current();
        let mut st = self.lock();
        let now = st.now;
        let mine_live = host_live(&st, h, now);
        let others: Vec<(ActorId, bool)> = st.inside.get(object).cloned().unwrap_or_default();
        for (other, other_shared) in others {
            if shared && other_shared {
                continue;
            }
            let oh = st.actors[other].host;
            if mine_live && host_live(&st, oh, now) && !st.actors[other].crashed {
                let v = format!(
                    "t={now:?} {} entered {object:?} ({}) while {} (host {oh}, deadline {:?}) is inside ({})",
                    st.actors[me].name,
                    if shared { "shared" } else { "exclusive" },
                    st.actors[other].name,
                    deadline(&st, oh),
                    if other_shared { "shared" } else { "exclusive" },
                );
                st.violations.push(v);
                st.shutting_down = true;
            }
        }
        st.inside
            .entry(object.to_string())
            .or_default()
            .push((me, shared));
        let line = format!(
            "t={now:?} {}: enters {object}{}",
            st.actors[me].name,
            if shared { " (shared)" } else { "" }
        );
        push_trace(&mut st, line);
    }

    /// The calling actor leaves the critical section `object`.
    pub fn leave(&self, object: &str) {
        let (_, me) = current();
        let mut st = self.lock();
        if let Some(v) = st.inside.get_mut(object) {
            v.retain(|(a, _)| *a != me);
        }
        let line = format!("t={:?} {}: leaves {object}", st.now, st.actors[me].name);
        push_trace(&mut st, line);
    }

    /// The highest value of `object` whose commit was acknowledged.
    pub fn acked(&self, object: &str) -> u64 {
        self.lock().acked.get(object).copied().unwrap_or(0)
    }

    /// A holder of `object` saw its commit of `value` acknowledged.
    pub fn ack(&self, object: &str, value: u64) {
        let mut st = self.lock();
        let e = st.acked.entry(object.to_string()).or_default();
        *e = (*e).max(value);
    }

    /// Records a violation of a workload's own invariant.
    pub fn violation(&self, what: &str) {
        let mut st = self.lock();
        let me = current_opt().map(|(_, a)| st.actors[a].name.clone());
        let v = format!("t={:?} {}: {what}", st.now, me.unwrap_or_default());
        st.violations.push(v);
        st.shutting_down = true;
    }

    // ---- scheduling ----

    /// A scheduling point of the calling actor: maybe stall, then let someone run.
    fn point(&self, hook: Hook, stall_ok: bool) -> MutexGuard<'_, St> {
        let (_, me) = current();
        let mut st = self.lock();
        if st.actors[me].crashed {
            drop(st);
            std::panic::resume_unwind(Box::new(Crashed));
        }
        let mut stall = Duration::ZERO;
        if let Some(s) = st.actors[me].script.as_mut() {
            if let Some(d) = s(&hook) {
                stall = d;
            }
        }
        if stall_ok && stall.is_zero() {
            let (p, max) = (st.faults.stall_prob, st.faults.max_stall);
            if st.rng.chance(p) {
                stall = st.rng.stall(max);
            }
        }
        if !stall.is_zero() {
            let line = format!(
                "t={:?} {}: stalls {stall:?} at {hook:?}",
                st.now, st.actors[me].name
            );
            push_trace(&mut st, line);
        }
        st.actors[me].wake_at = st.now + stall;
        self.switch(st, me)
    }

    /// Hands the baton on and waits for it to come back to `me`.
    fn switch<'a>(&'a self, mut st: MutexGuard<'a, St>, me: ActorId) -> MutexGuard<'a, St> {
        st.steps += 1;
        check_overlaps(&mut st);
        self.schedule(&mut st);
        self.0.cv.notify_all();
        while st.current != Some(me) {
            st = self.0.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.actors[me].crashed {
            drop(st);
            std::panic::resume_unwind(Box::new(Crashed));
        }
        st
    }

    /// Picks the next actor to run, advancing time and firing events as needed.
    fn schedule(&self, st: &mut St) {
        loop {
            if (st.now >= st.end || st.shutting_down) && !st.actors.iter().all(|a| a.done) {
                // The end: everyone left unwinds.
                for a in st.actors.iter_mut().filter(|a| !a.done) {
                    a.crashed = true;
                    a.wake_at = st.now;
                }
                st.shutting_down = true;
            }
            // A random crash.
            let cp = st.faults.crash_prob;
            if !st.shutting_down && st.rng.chance(cp) {
                let h = st.rng.below(st.hosts.len() as u64) as usize;
                if st
                    .actors
                    .iter()
                    .any(|a| a.host == h && !a.done && !a.crashed)
                {
                    self.crash(st, h, "crashes");
                }
            }
            let ready: Vec<ActorId> = (0..st.actors.len())
                .filter(|&a| !st.actors[a].done && st.actors[a].wake_at <= st.now)
                .collect();
            if !ready.is_empty() {
                let pick = ready[st.rng.below(ready.len() as u64) as usize];
                st.current = Some(pick);
                return;
            }
            // Nobody can run now: advance to the next event.
            let mut next: Option<Duration> = st
                .actors
                .iter()
                .filter(|a| !a.done)
                .map(|a| a.wake_at)
                .min();
            if next.is_none() && st.hosts.iter().all(|h| h.restart_at.is_none()) {
                st.current = None;
                return;
            }
            for h in 0..st.hosts.len() {
                if let Some(k) = kill_time(st, h) {
                    next = Some(next.map_or(k, |n| n.min(k)));
                }
                if let Some(r) = st.hosts[h].restart_at {
                    next = Some(next.map_or(r, |n| n.min(r)));
                }
            }
            let Some(next) = next else {
                st.current = None;
                return;
            };
            st.now = st.now.max(next);
            // The watchdog: hosts past their deadline (and delay) are fenced.
            for h in 0..st.hosts.len() {
                if kill_time(st, h).is_some_and(|k| k <= st.now) {
                    st.hosts[h].fenced += 1;
                    self.crash(st, h, "is fenced by its watchdog");
                }
            }
            for h in 0..st.hosts.len() {
                if st.hosts[h].restart_at.is_some_and(|r| r <= st.now) {
                    st.hosts[h].restart_at = None;
                    if !st.shutting_down && st.now < st.end {
                        if let Some(f) = st.hosts[h].restart.clone() {
                            let line = format!("t={:?} host {h} restarts", st.now);
                            push_trace(st, line);
                            self.spawn_locked(st, h, "restarted", move || f());
                        }
                    }
                }
            }
        }
    }

    /// Marks every actor of host `h` crashed; their writes in flight land torn.
    fn crash(&self, st: &mut St, h: usize, how: &str) {
        let now = st.now;
        let mut torn = Vec::new();
        for (i, f) in st.inflight.iter().enumerate() {
            if st.actors[f.actor].host == h {
                torn.push(i);
            }
        }
        for i in torn.into_iter().rev() {
            let f = st.inflight.remove(i);
            if !f.visible {
                // Still queued, never reached the media: lost with the host.
                let line = format!(
                    "t={now:?} host {h}: queued write to record {} is lost",
                    f.idx
                );
                push_trace(st, line);
                continue;
            }
            let old = st.disk.get(&f.idx).cloned().unwrap_or_else(Block::zeroed);
            let mut mixed = old.clone();
            for s in 0..RECORD / SECTOR {
                if st.rng.chance(0.5) {
                    mixed.0[s * SECTOR..(s + 1) * SECTOR]
                        .copy_from_slice(&f.data.0[s * SECTOR..(s + 1) * SECTOR]);
                }
            }
            let line = format!("t={now:?} host {h}: write to record {} lands torn", f.idx);
            push_trace(st, line);
            st.disk.insert(f.idx, mixed);
        }
        for a in st.actors.iter_mut().filter(|a| a.host == h && !a.done) {
            a.crashed = true;
            a.wake_at = now;
        }
        let ids: Vec<ActorId> = (0..st.actors.len())
            .filter(|&a| st.actors[a].host == h)
            .collect();
        st.inside
            .values_mut()
            .for_each(|v| v.retain(|(a, _)| !ids.contains(a)));
        let hs = &mut st.hosts[h];
        hs.epoch += 1;
        hs.crashes += 1;
        hs.last_pet = None;
        hs.crashed_at = Some(now);
        if hs.restart.is_some() {
            let after = st.faults.restart_after;
            st.hosts[h].restart_at = Some(now + after);
        }
        let line = format!("t={now:?} host {h} {how}");
        push_trace(st, line);
    }

    /// Crashes host `h` now (directed scenarios; call from an actor).
    pub fn crash_host(&self, h: usize) {
        let mut st = self.lock();
        self.crash(&mut st, h, "crashes (scripted)");
    }

    fn read_rec(&self, st: &mut St, idx: u64, reader: ActorId) -> Box<Block> {
        let mut b = st.disk.get(&idx).cloned().unwrap_or_else(Block::zeroed);
        // A write in flight by someone else: each sector old or new.
        let flying: Vec<Box<Block>> = st
            .inflight
            .iter()
            .filter(|f| f.idx == idx && f.actor != reader && f.visible)
            .map(|f| f.data.clone())
            .collect();
        for data in flying {
            for s in 0..RECORD / SECTOR {
                if st.rng.chance(0.5) {
                    b.0[s * SECTOR..(s + 1) * SECTOR]
                        .copy_from_slice(&data.0[s * SECTOR..(s + 1) * SECTOR]);
                }
            }
        }
        b
    }
}

fn push_trace(st: &mut St, line: String) {
    st.trace.push_back(line);
    while st.trace.len() > 200 {
        st.trace.pop_front();
    }
}

/// Two actors inside one critical section while both hosts are within their deadlines.
/// (Checked at every step: a deadline can also move after an actor entered.)
fn check_overlaps(st: &mut St) {
    let now = st.now;
    let mut found = Vec::new();
    for (object, inside) in &st.inside {
        for (i, &(a, a_shared)) in inside.iter().enumerate() {
            for &(b, b_shared) in &inside[i + 1..] {
                if a_shared && b_shared {
                    continue;
                }
                let (ha, hb) = (st.actors[a].host, st.actors[b].host);
                let live = |x: ActorId, h: usize| !st.actors[x].crashed && host_live(st, h, now);
                if live(a, ha) && live(b, hb) {
                    found.push(format!(
                        "t={now:?} {} and {} are both inside {object:?} within their deadlines ({:?}, {:?})",
                        st.actors[a].name,
                        st.actors[b].name,
                        deadline(st, ha),
                        deadline(st, hb)
                    ));
                }
            }
        }
    }
    if !found.is_empty() {
        st.violations.extend(found);
        st.shutting_down = true;
    }
}

fn deadline(st: &St, h: usize) -> Option<Duration> {
    st.hosts[h].last_pet.map(|p| p + st.fence_after)
}

/// Whether host `h` is within its own fencing deadline (a host that never petted is not
/// bound by one yet).
fn host_live(st: &St, h: usize, now: Duration) -> bool {
    deadline(st, h).is_none_or(|d| now < d)
}

/// When the watchdog kills host `h`, if it has live actors and a deadline.
fn kill_time(st: &St, h: usize) -> Option<Duration> {
    let d = deadline(st, h)?;
    let delay = st.hosts[h].fence_delay?;
    st.actors
        .iter()
        .any(|a| a.host == h && !a.done && !a.crashed)
        .then_some(d + delay)
}

fn current() -> (usize, ActorId) {
    current_opt().expect("simulated I/O outside a simulated actor")
}

fn current_opt() -> Option<(usize, ActorId)> {
    ME.with(|m| m.get())
}

/// Host `h`'s view of the shared device.
#[derive(Debug)]
struct SimIo {
    world: World,
    host: usize,
    path: PathBuf,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("World")
    }
}

fn crashed_io() -> io::Error {
    io::Error::other("simulated host crashed")
}

impl RecordIo for SimIo {
    fn read(&self, idx: u64, buf: &mut Block) -> io::Result<()> {
        let v = self.read_many(idx, 1)?;
        buf.0.copy_from_slice(&v[0].0);
        Ok(())
    }

    fn read_many(&self, start: u64, n: u64) -> io::Result<Vec<Box<Block>>> {
        if std::thread::panicking() {
            return Err(crashed_io());
        }
        let Some((_, me)) = current_opt() else {
            // Set-up outside the simulation (formatting).
            let st = self.world.lock();
            return Ok((start..start + n)
                .map(|i| st.disk.get(&i).cloned().unwrap_or_else(Block::zeroed))
                .collect());
        };
        let mut st = self.world.point(Hook::Read { start, n }, true);
        Ok((start..start + n)
            .map(|i| self.world.read_rec(&mut st, i, me))
            .collect())
    }

    fn write(&self, idx: u64, buf: &Block) -> io::Result<()> {
        self.submit(idx, &[buf])
    }

    fn write_many(&self, start: u64, blocks: &[Box<Block>]) -> io::Result<()> {
        let refs: Vec<&Block> = blocks.iter().map(|b| &**b).collect();
        self.submit(start, &refs)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl SimIo {
    /// One write submission of consecutive records (one system call: one deadline check,
    /// one landing time; each record may still tear on a crash).
    fn submit(&self, start: u64, blocks: &[&Block]) -> io::Result<()> {
        if std::thread::panicking() {
            return Err(crashed_io());
        }
        let Some((h, me)) = current_opt() else {
            let mut st = self.world.lock();
            for (i, b) in (start..).zip(blocks) {
                st.disk.insert(i, Box::new((*b).clone()));
            }
            return Ok(());
        };
        let w = &self.world;
        let mut st = w.lock();
        if st.actors[me].crashed {
            drop(st);
            std::panic::resume_unwind(Box::new(Crashed));
        }
        // Submission: the host must be within its own deadline.
        let now = st.now;
        if !host_live(&st, h, now) {
            let v = format!(
                "t={now:?} {} submitted a write to record {start} after its host's deadline {:?}",
                st.actors[me].name,
                deadline(&st, h)
            );
            st.violations.push(v);
            st.shutting_down = true;
        }
        let max = st.faults.max_inflight;
        let mut land = now + st.rng.dur(max);
        // A scripted delay on a write holds it in a queue, invisible, that much longer.
        let mut delay = None;
        for i in start..start + blocks.len() as u64 {
            if let Some(d) = st.actors[me]
                .script
                .as_mut()
                .and_then(|s| s(&Hook::Write { idx: i }))
            {
                delay = Some(delay.map_or(d, |x: Duration| x.max(d)));
            }
        }
        for (i, b) in (start..).zip(blocks) {
            st.inflight.push(Inflight {
                actor: me,
                idx: i,
                data: Box::new((*b).clone()),
                visible: delay.is_none_or(|d| d == Duration::MAX),
            });
        }
        if delay == Some(Duration::MAX) {
            // The host crashes with this write on its way to the media: it lands torn.
            w.crash(&mut st, h, "crashes mid-write (scripted)");
            drop(st);
            std::panic::resume_unwind(Box::new(Crashed));
        }
        if let Some(d) = delay {
            let line = format!(
                "t={now:?} {}: write to record {start} is delayed {d:?}",
                st.actors[me].name
            );
            push_trace(&mut st, line);
            land += d;
        }
        st.actors[me].wake_at = land;
        let mut st = w.switch(st, me);
        // Landed.
        for i in start..start + blocks.len() as u64 {
            if let Some(pos) = st.inflight.iter().position(|f| f.actor == me && f.idx == i) {
                let f = st.inflight.remove(pos);
                st.disk.insert(i, f.data);
            }
        }
        Ok(())
    }
}

/// Host `h`'s `CLOCK_BOOTTIME`.
#[derive(Debug)]
struct SimClock {
    world: World,
    host: usize,
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        let off = self.world.lock().hosts[self.host].offset;
        if std::thread::panicking() || current_opt().is_none() {
            return self.world.lock().now + off;
        }
        let st = self.world.point(Hook::Now, true);
        st.now + off
    }

    fn sleep(&self, d: Duration) {
        if std::thread::panicking() || current_opt().is_none() {
            return;
        }
        let (_, me) = current();
        let mut st = self.world.lock();
        if st.actors[me].crashed {
            drop(st);
            std::panic::resume_unwind(Box::new(Crashed));
        }
        if let Some(s) = st.actors[me].script.as_mut() {
            let _ = s(&Hook::Sleep);
        }
        st.actors[me].wake_at = st.now + d;
        drop(self.world.switch(st, me));
    }
}
