//! Waiting for the mirrors that copy a VM's disks to another host to be in sync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{bail, Result};

use crate::host::tasks::Task;

/// Waits until every mirror (labelled for messages) is in sync, reporting progress in
/// `task` (stage `copying disks`); fails on a mirror's failure, a cancel, or after
/// `limit_s`.
pub(super) async fn wait_in_sync(
    task: &Task,
    mirrors: &[(String, Arc<mirror::Mirror>)],
    host: &str,
    limit_s: Option<u64>,
) -> Result<()> {
    task.stage("copying disks");
    let deadline = limit_s.map(|l| Instant::now() + Duration::from_secs(l));
    loop {
        let (mut done, mut total, mut ready) = (0u64, 0u64, true);
        for (what, m) in mirrors {
            let p = m.progress();
            done += p.done_bytes;
            total += p.total_bytes;
            match m.phase() {
                mirror::Phase::Ready => {}
                mirror::Phase::Failed(err) => bail!("copying {what} to host {host}: {err}"),
                mirror::Phase::Cancelled => bail!("the copy of {what} was cancelled"),
                _ => ready = false,
            }
        }
        task.progress(done.min(total), total);
        if ready {
            return Ok(());
        }
        if task.cancelled() {
            bail!("cancelled while copying the disks");
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            bail!(
                "the disks' copy to host {host} was not in sync within {} s",
                limit_s.unwrap_or(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
