//! The mirror job: a [`BlockDev`] that stands in for the source while a copier moves its
//! data to the target, mirrors guest writes synchronously once a region is copied, and
//! finally pivots to the target.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diskfmt::{BlockDev, Extent, IoFuture, Provisioning, Result, WriteFlags};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::bitmap::Bitmap;
use crate::error::Error as JobError;
use crate::ranges::{Kind, Queue, Ticket};
use crate::state::{timed_out, Options, Phase, Progress, Shared, State};

/// A running mirror from `source` to `target`. Serve guest I/O through it (it is a
/// [`BlockDev`]); wait for [`Mirror::wait_ready`]; then [`Mirror::prepare_pivot`] and
/// commit, or [`Mirror::cancel`].
pub struct Mirror {
    sh: Arc<Shared>,
    copier: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("name", &self.sh.name)
            .field("phase", &*self.sh.phase_tx.borrow())
            .finish()
    }
}
/// What a guest request does on each side.
#[derive(Clone)]
enum Op {
    Write(Arc<Vec<u8>>, WriteFlags),
    Zeroes(u64, bool),
    Discard(u64),
}

impl Op {
    fn len(&self) -> u64 {
        match self {
            Op::Write(b, _) => b.len() as u64,
            Op::Zeroes(l, _) | Op::Discard(l) => *l,
        }
    }

    async fn apply(&self, dev: &dyn BlockDev, offset: u64) -> Result<()> {
        match self {
            Op::Write(b, f) => dev.write(offset, b, *f).await,
            Op::Zeroes(l, u) => dev.write_zeroes(offset, *l, *u).await,
            Op::Discard(l) => dev.discard(offset, *l).await,
        }
    }
}
impl Shared {
    /// A guest write, zeroing or discard while the job mirrors.
    async fn guest_op(self: &Arc<Self>, offset: u64, op: Op, local: Option<&[u8]>) -> Result<()> {
        let len = op.len();
        match self.phase() {
            Phase::Done => return op.apply(&*self.target, offset).await,
            p if !p.mirroring() => {
                return match (&op, local) {
                    (Op::Write(_, f), Some(b)) => self.source.write(offset, b, *f).await,
                    _ => op.apply(&*self.source, offset).await,
                }
            }
            _ => {}
        }
        let ticket = self.queue.enter(offset, offset + len, Kind::Write).await;
        let (g0, g1) = self.grains_of(offset, len);
        let mirror = {
            let mut st = self.st.lock().expect("mirror state");
            if !st.phase.mirroring() {
                None
            } else if st.dirty.any_in(g0, g1) {
                // Not yet (all) on the target: the source only; the copy brings it over.
                self.redirty(&mut st, g0, g1);
                Some(false)
            } else {
                st.touched.set_range(g0, g1);
                Some(true)
            }
        };
        let source_op = async {
            match (&op, local) {
                (Op::Write(_, f), Some(b)) => self.source.write(offset, b, *f).await,
                _ => op.apply(&*self.source, offset).await,
            }
        };
        match mirror {
            None => {
                // The job ended while we waited: Done goes to the target, else the source.
                drop(ticket);
                if self.phase() == Phase::Done {
                    return op.apply(&*self.target, offset).await;
                }
                return source_op.await;
            }
            Some(false) => return source_op.await,
            Some(true) => {}
        }
        // The target half is an owned future polled right here alongside the source
        // half (no task hop per write); only if it outlives its timeout, or the guest's
        // request is dropped, does it move to a task of its own as a tail.
        let target = Arc::clone(&self.target);
        let top = op.clone();
        let mut pending = Pending {
            sh: Arc::clone(self),
            fut: Some(Box::pin(async move { top.apply(&*target, offset).await })),
            ticket: Some(ticket),
            grains: (g0, g1),
        };
        let t = self.opts.target_timeout;
        let fut = pending.fut.as_mut().expect("just set");
        let (src, tgt) = tokio::join!(source_op, tokio::time::timeout(t, fut));
        let tres = match tgt {
            Ok(r) => {
                pending.fut = None;
                r
            }
            Err(_) => Err(timed_out(self.target.name(), "mirror write", offset, t)),
        };
        match tres {
            Ok(()) => {
                let mut st = self.st.lock().expect("mirror state");
                st.mirrored_bytes += len;
                // Failures count only in a row: a target that answers is not failing.
                st.consecutive_errors = 0;
                if src.is_err() {
                    // The target may now hold what the source does not: copy it again.
                    self.redirty(&mut st, g0, g1);
                }
            }
            Err(e) => self.target_failed(g0, g1, &e),
        }
        pending.park();
        src
    }

    /// A guest flush while the job mirrors: both sides, in parallel. A target that
    /// fails to flush counts as a target failure but does not fail the guest: until the
    /// pivot (which flushes the target again) the source is the authoritative copy.
    async fn guest_flush(self: &Arc<Self>) -> Result<()> {
        match self.phase() {
            Phase::Done => return self.target.flush().await,
            p if !p.mirroring() => return self.source.flush().await,
            _ => {}
        }
        let t = self.opts.target_timeout;
        let (src, tgt) = tokio::join!(
            self.source.flush(),
            tokio::time::timeout(t, self.target.flush())
        );
        let tgt = tgt.unwrap_or_else(|_| Err(timed_out(self.target.name(), "flush", 0, t)));
        match tgt {
            Ok(()) => self.st.lock().expect("mirror state").consecutive_errors = 0,
            Err(e) => self.target_failed(0, 0, &e),
        }
        src
    }
}

/// A mirrored target request that may outlive its guest request: if the guest request
/// ends (or is dropped) first, its range stays claimed as a tail until the target
/// request has really finished.
struct Pending {
    sh: Arc<Shared>,
    /// The target request, while it has not finished.
    fut: Option<TargetFut>,
    ticket: Option<Ticket>,
    grains: (u64, u64),
}

type TargetFut = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

impl Pending {
    /// Lets an unfinished target request run on as a tail (its range stays claimed
    /// against copies until it ends); a finished one just releases its range.
    fn park(&mut self) {
        if let (Some(fut), Some(ticket)) = (self.fut.take(), self.ticket.take()) {
            let tail = ticket.into_tail();
            tokio::spawn(async move {
                let _ = fut.await;
                drop(tail);
            });
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.fut.is_some() {
            // Dropped mid-flight (the guest's connection went away): the outcome on
            // either side is unknown, so the range is copied again.
            let (g0, g1) = self.grains;
            {
                let mut st = self.sh.st.lock().expect("mirror state");
                self.sh.redirty(&mut st, g0, g1);
            }
            self.sh.poke.notify_one();
            if tokio::runtime::Handle::try_current().is_ok() {
                self.park();
            }
        }
    }
}

impl Mirror {
    /// Starts mirroring `source` to `target` (same size). Guest I/O must go through the
    /// returned device from now on.
    pub fn start(
        source: Arc<dyn BlockDev>,
        target: Arc<dyn BlockDev>,
        opts: Options,
    ) -> crate::error::Result<Arc<Mirror>> {
        let name = source.name().to_path_buf();
        if source.size() != target.size() {
            return Err(JobError::Invalid {
                object: target.name().to_path_buf(),
                detail: format!(
                    "the mirror target has {} bytes, the source {} has {}",
                    target.size(),
                    name.display(),
                    source.size()
                ),
            });
        }
        if !target.writable() {
            return Err(JobError::Invalid {
                object: target.name().to_path_buf(),
                detail: "the mirror target is read-only".into(),
            });
        }
        if !opts.grain.is_power_of_two() || opts.grain < 4096 || opts.chunk < opts.grain {
            return Err(JobError::Invalid {
                object: name,
                detail: format!(
                    "mirror grain {} must be a power of two ≥ 4096 and ≤ the chunk {}",
                    opts.grain, opts.chunk
                ),
            });
        }
        let size = source.size();
        let grains = size.div_ceil(opts.grain);
        let st = State {
            phase: Phase::Copying,
            dirty: Bitmap::full(grains),
            copying: Bitmap::new(grains),
            redirtied: Bitmap::new(grains),
            touched: Bitmap::new(grains),
            done_bytes: 0,
            total_bytes: size,
            mirrored_bytes: 0,
            consecutive_errors: 0,
            target_errors: 0,
            frozen: false,
            speed: opts.speed,
            next_slot: Instant::now(),
        };
        let sh = Arc::new(Shared {
            name,
            source,
            target,
            opts,
            size,
            grains,
            queue: Arc::new(Queue::default()),
            st: Mutex::new(st),
            poke: Notify::new(),
            phase_tx: watch::Sender::new(Phase::Copying),
            started: Instant::now(),
        });
        let copier = tokio::spawn(crate::copier::run(Arc::clone(&sh)));
        Ok(Arc::new(Mirror {
            sh,
            copier: Mutex::new(Some(copier)),
        }))
    }

    pub fn source(&self) -> &Arc<dyn BlockDev> {
        &self.sh.source
    }

    pub fn target(&self) -> &Arc<dyn BlockDev> {
        &self.sh.target
    }

    pub fn phase(&self) -> Phase {
        self.sh.phase()
    }

    /// Changes the bulk copy rate limit.
    pub fn set_speed(&self, speed: Option<u64>) {
        self.sh.st.lock().expect("mirror state").speed = speed;
        self.sh.poke.notify_one();
    }

    /// Stops (or restarts) the bulk copier; guest writes still go on as before. A test
    /// hook: with the copier frozen after `Ready`, every guest write acknowledged from
    /// then on must already be on the target.
    pub fn freeze_copier(&self, frozen: bool) {
        self.sh.st.lock().expect("mirror state").frozen = frozen;
        self.sh.poke.notify_one();
    }

    pub fn progress(&self) -> Progress {
        let st = self.sh.st.lock().expect("mirror state");
        let elapsed = self.sh.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            st.done_bytes as f64 / elapsed
        } else {
            0.0
        };
        let dirty = (st.dirty.count() * self.sh.opts.grain).min(self.sh.size);
        Progress {
            phase: st.phase.as_str(),
            error: match &st.phase {
                Phase::Failed(e) => Some(e.clone()),
                _ => None,
            },
            done_bytes: st.done_bytes,
            total_bytes: st.total_bytes,
            dirty_bytes: dirty,
            mirrored_bytes: st.mirrored_bytes,
            rate_bytes_per_s: rate,
            eta_s: (rate > 0.0 && dirty > 0).then(|| dirty as f64 / rate),
            target_errors: st.target_errors,
            elapsed_s: elapsed,
        }
    }

    /// Waits until the job is ready (or ended); fails if it ended without becoming ready.
    pub async fn wait_ready(&self) -> crate::error::Result<()> {
        let mut rx = self.sh.phase_tx.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p, Phase::Copying))
            .await
            .map(|p| p.clone())
            .unwrap_or(Phase::Cancelled);
        match p {
            Phase::Ready | Phase::Completing | Phase::Done => Ok(()),
            Phase::Failed(reason) => Err(JobError::Failed {
                object: self.sh.name.clone(),
                reason,
            }),
            _ => Err(JobError::Cancelled {
                object: self.sh.name.clone(),
            }),
        }
    }

    /// Holds all guest I/O, checks that everything is on the target, and flushes the
    /// target. Guest I/O stays held until the returned [`Pivot`] is committed (I/O goes
    /// to the target from then on) or dropped (back to `Ready`). Waits at most `within`.
    pub async fn prepare_pivot(self: &Arc<Self>, within: Duration) -> crate::error::Result<Pivot> {
        let deadline = tokio::time::Instant::now() + within;
        let fail = |detail: String| JobError::Pivot {
            object: self.sh.name.clone(),
            detail,
        };
        loop {
            tokio::time::timeout_at(deadline, self.wait_ready())
                .await
                .map_err(|_| {
                    fail(format!(
                        "the mirror was not ready within {} ms",
                        within.as_millis()
                    ))
                })??;
            let claim = tokio::time::timeout_at(
                deadline,
                self.sh.queue.enter(0, self.sh.size, Kind::Claim),
            )
            .await
            .map_err(|_| {
                fail(format!(
                    "requests in flight did not finish within {} ms; the pivot was not done",
                    within.as_millis()
                ))
            })?;
            let clean = {
                let mut st = self.sh.st.lock().expect("mirror state");
                if !matches!(st.phase, Phase::Ready | Phase::Copying) {
                    return Err(fail(format!("cannot pivot a {} mirror", st.phase.as_str())));
                }
                let clean =
                    st.phase == Phase::Ready && st.dirty.count() == 0 && st.copying.count() == 0;
                if clean {
                    self.sh.set_phase(&mut st, Phase::Completing);
                }
                clean
            };
            if !clean {
                // Re-dirtied while we waited for the claim: let the copier bring it over
                // and try again.
                drop(claim);
                self.sh.poke.notify_one();
                if tokio::time::Instant::now() >= deadline {
                    return Err(fail(format!(
                        "the target did not stay in sync for {} ms; the pivot was not done",
                        within.as_millis()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            // Only the target needs flushing: it becomes the disk. (Everything acknowledged
            // on the source was made durable there as the guest asked.)
            let t = self.sh.opts.target_timeout;
            let flushed = tokio::time::timeout(t, self.sh.target.flush())
                .await
                .unwrap_or_else(|_| Err(timed_out(self.sh.target.name(), "flush", 0, t)));
            if let Err(e) = flushed {
                let mut st = self.sh.st.lock().expect("mirror state");
                self.sh.set_phase(&mut st, Phase::Ready);
                return Err(fail(format!(
                    "flushing the target before the pivot failed: {e}"
                )));
            }
            return Ok(Pivot {
                mirror: Arc::clone(self),
                _claim: Some(claim),
            });
        }
    }

    /// Stops the job; the source stays authoritative. Waits (up to the target timeout)
    /// until no target request is in flight any more, so the target may be deleted.
    pub async fn cancel(&self) {
        {
            let mut st = self.sh.st.lock().expect("mirror state");
            if st.phase.mirroring() {
                self.sh.set_phase(&mut st, Phase::Cancelled);
            }
        }
        self.finish().await;
    }

    /// Waits for the copier and for every target request still in flight.
    pub async fn finish(&self) {
        let h = self.copier.lock().expect("copier").take();
        if let Some(h) = h {
            let _ = h.await;
        }
        let _ = tokio::time::timeout(
            self.sh.opts.target_timeout * 2,
            self.sh.queue.enter(0, self.sh.size, Kind::Claim),
        )
        .await;
    }

    /// Waits until the job has ended (done, cancelled or failed) and returns its phase.
    pub async fn ended(&self) -> Phase {
        let mut rx = self.sh.phase_tx.subscribe();
        rx.wait_for(|p| matches!(p, Phase::Done | Phase::Cancelled | Phase::Failed(_)))
            .await
            .map(|p| p.clone())
            .unwrap_or(Phase::Cancelled)
    }
}

/// [`Mirror::prepare_pivot`] for several disks that must switch together (one VM's
/// disks, committed with one definition): waits until every mirror is ready *before*
/// holding any I/O, then prepares them all at once, so a disk's guest I/O is held for
/// the slowest disk's final catch-up and flush, not for the sum of every disk's. On any
/// failure every pivot already prepared is dropped (those disks go back to `Ready`).
pub async fn prepare_pivots(
    mirrors: &[Arc<Mirror>],
    within: Duration,
) -> crate::error::Result<Vec<Pivot>> {
    let deadline = tokio::time::Instant::now() + within;
    let ready = futures::future::join_all(mirrors.iter().map(|m| m.wait_ready()));
    match tokio::time::timeout_at(deadline, ready).await {
        Ok(all) => all.into_iter().collect::<crate::error::Result<Vec<()>>>()?,
        Err(_) => {
            return Err(JobError::Pivot {
                object: mirrors
                    .first()
                    .map_or_else(Default::default, |m| m.sh.name.clone()),
                detail: format!(
                    "the mirrors were not all ready within {} ms",
                    within.as_millis()
                ),
            })
        }
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let prepared = futures::future::join_all(mirrors.iter().map(|m| m.prepare_pivot(left))).await;
    // (Dropping the successful ones on the way out releases their holds.)
    prepared.into_iter().collect()
}

/// Guest I/O held at the pivot point, everything on the target and flushed.
#[derive(Debug)]
pub struct Pivot {
    mirror: Arc<Mirror>,
    _claim: Option<Ticket>,
}

impl Pivot {
    /// From now on all I/O goes to the target. Call once whatever names the target as
    /// the device is durable. Refused (routing unchanged) unless the job is still
    /// completing: a cancelled job never switches to its target.
    pub fn commit(mut self) -> crate::error::Result<()> {
        let sh = &self.mirror.sh;
        {
            let mut st = sh.st.lock().expect("mirror state");
            if st.phase != Phase::Completing {
                return Err(JobError::Pivot {
                    object: sh.name.clone(),
                    detail: format!(
                        "cannot switch to the target of a {} mirror",
                        st.phase.as_str()
                    ),
                });
            }
            sh.set_phase(&mut st, Phase::Done);
        }
        self._claim = None;
        Ok(())
    }
}

impl Drop for Pivot {
    fn drop(&mut self) {
        let sh = &self.mirror.sh;
        let mut st = sh.st.lock().expect("mirror state");
        if st.phase == Phase::Completing {
            sh.set_phase(&mut st, Phase::Ready);
        }
    }
}

impl Mirror {
    fn routed(&self) -> &Arc<dyn BlockDev> {
        if self.sh.phase_tx.borrow().clone() == Phase::Done {
            &self.sh.target
        } else {
            &self.sh.source
        }
    }
}

impl BlockDev for Mirror {
    fn name(&self) -> &Path {
        &self.sh.name
    }

    fn size(&self) -> u64 {
        self.sh.size
    }

    fn logical_block_size(&self) -> u32 {
        self.sh.source.logical_block_size()
    }

    fn physical_block_size(&self) -> u32 {
        self.sh.source.physical_block_size()
    }

    fn writable(&self) -> bool {
        self.sh.source.writable()
    }

    fn provisioning(&self) -> Provisioning {
        self.routed().provisioning()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> IoFuture<'a, ()> {
        self.routed().read(offset, buf)
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a, ()> {
        Box::pin(async move {
            // Guest data is bounced once into a buffer the target request owns.
            let op = Op::Write(Arc::new(buf.to_vec()), flags);
            self.sh.guest_op(offset, op, Some(buf)).await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.sh.guest_flush())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(
            self.sh
                .guest_op(offset, Op::Zeroes(length, may_unmap), None),
        )
    }

    fn discard(&self, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(self.sh.guest_op(offset, Op::Discard(length), None))
    }

    fn block_status(&self, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        self.routed().block_status(offset, length)
    }
}
