//! This host's durable state: the journals of relocations and the export table live
//! in the agent's `state_dir` (default `/var/lib/ferry`, not the tmpfs `run_dir`), so a
//! host crash does not take them. Every write is atomic and durable: the file synced,
//! renamed into place, and its directory synced so the new name survives too.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};
use serde::Serialize;

/// Writes `v` as JSON to `p` atomically and durably.
pub fn write_durably(p: &Path, v: &impl Serialize) -> Result<()> {
    let dir = p.parent().expect("has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let tmp = p.with_extension("json.tmp");
    let f =
        std::fs::File::create(&tmp).with_context(|| format!("{}: cannot write", tmp.display()))?;
    serde_json::to_writer_pretty(&f, v)?;
    f.sync_all()
        .with_context(|| format!("{}: cannot sync", tmp.display()))?;
    std::fs::rename(&tmp, p).with_context(|| format!("{}: cannot write", p.display()))?;
    sync_dir(dir)
}

/// [`write_durably`] on a blocking thread, for async callers (the runtime's workers never
/// wait for a sync).
pub async fn write_durably_async<T: Serialize + Send + 'static>(p: PathBuf, v: T) -> Result<()> {
    tokio::task::spawn_blocking(move || write_durably(&p, &v))
        .await
        .expect("write task")
}

/// Removes a file written by [`write_durably`], the removal synced to its directory.
pub fn remove_durably(p: &Path) {
    if std::fs::remove_file(p).is_ok() {
        if let Some(d) = p.parent() {
            let _ = sync_dir(d);
        }
    }
}

/// [`remove_durably`] on a blocking thread, for async callers.
pub async fn remove_durably_async(p: PathBuf) {
    tokio::task::spawn_blocking(move || remove_durably(&p))
        .await
        .expect("remove task")
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync the directory", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_replaces_the_whole_file_and_a_removal_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j").join("vm.json");
        write_durably(&p, &serde_json::json!({"a": 1})).unwrap();
        write_durably(&p, &serde_json::json!({"a": 2})).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        assert!(!p.with_extension("json.tmp").exists());
        remove_durably(&p);
        assert!(!p.exists());
    }
}
