//! `ferry datastore ls|check|mkdir|rm|mv`: files and folders inside a datastore.
//!
//! Listing and checking read the committed state and need no host identity; commands
//! that change the datastore join it as this host (see `host`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use datastore::files::{self, split_ds_path, Stat};
use datastore::{check, Datastore};

use crate::host::{host_name, HostSession};
use crate::units::human;

/// `DEVICE` or `DEVICE:/path` → (device, path inside, "/" when absent).
pub fn target(s: &str) -> (PathBuf, String) {
    match split_ds_path(s) {
        Some((dev, p)) => (dev, p.to_string()),
        None => (PathBuf::from(s), "/".to_string()),
    }
}

/// `DEVICE:/path`, required.
pub fn ds_path(s: &str) -> Result<(PathBuf, String)> {
    match split_ds_path(s) {
        Some((dev, p)) => Ok((dev, p.to_string())),
        None => bail!("{s:?} is not a datastore path: write DEVICE:/folder/file"),
    }
}

async fn join(device: &Path, host: Option<&str>) -> Result<HostSession> {
    let name = host_name(host)?;
    let device = device.to_path_buf();
    tokio::task::spawn_blocking(move || HostSession::join(&device, &name)).await?
}

pub async fn ls(what: &str, json: bool) -> Result<u8> {
    let (dev, path) = target(what);
    let ds = Datastore::open(&dev)?;
    let entries = files::list(&ds, &path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(0);
    }
    println!(
        "{:<8}{:>12}{:>12}  {:<14}{:<40}lock",
        "kind", "size", "allocated", "provisioning", "path"
    );
    for Stat {
        path,
        kind,
        size,
        provisioning,
        allocated_bytes,
        lock,
        ..
    } in entries
    {
        let kind = serde_json::to_value(kind)?;
        println!(
            "{:<8}{:>12}{:>12}  {:<14}{:<40}{}",
            kind.as_str().unwrap_or("?"),
            human(size),
            human(allocated_bytes),
            provisioning.map(|p| p.as_str()).unwrap_or("-"),
            path,
            lock.unwrap_or_default()
        );
    }
    Ok(0)
}

pub async fn check_cmd(device: &Path, repair: bool, host: Option<&str>, json: bool) -> Result<u8> {
    let report = if repair {
        let hs = join(device, host).await?;
        let s = std::sync::Arc::clone(&hs.session);
        let r = tokio::task::spawn_blocking(move || check::repair(&s)).await??;
        hs.leave()?;
        r
    } else {
        check::check(&Datastore::open(device)?)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} files, {} folders, {} blocks used, {} free",
            device.display(),
            report.files,
            report.folders,
            report.used_blocks,
            report.free_blocks
        );
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        if !report.leaked_blocks.is_empty() {
            println!(
                "leaked: {} block(s) marked used by no file (--repair frees them)",
                report.leaked_blocks.len()
            );
        }
        if !report.stray_inbox_bits.is_empty() {
            println!(
                "stray: {} inbox bit(s) for unused blocks (--repair clears them)",
                report.stray_inbox_bits.len()
            );
        }
        for (h, gone) in &report.unapplied_journals {
            if *gone {
                println!("journal: host {h} left a transaction unapplied (--repair finishes it)");
            } else {
                println!("journal: host {h} is live and in the middle of a transaction");
            }
        }
        for r in &report.torn_lock_records {
            println!(
                "torn: lock record {r} is unreadable; the objects whose records lie past it \
                 count as held (--repair clears it once no other host is live)"
            );
        }
        for p in &report.problems {
            println!("problem: {p}");
        }
        if report.clean() {
            println!("clean");
        }
    }
    Ok(if report.clean() { 0 } else { 1 })
}

pub async fn mkdir(what: &str, host: Option<&str>) -> Result<u8> {
    let (dev, path) = ds_path(what)?;
    let hs = join(&dev, host).await?;
    let s = std::sync::Arc::clone(&hs.session);
    let p = path.clone();
    tokio::task::spawn_blocking(move || s.mkdir(&p)).await??;
    hs.leave()?;
    println!("Created folder {what}");
    Ok(0)
}

pub async fn rm(what: &str, host: Option<&str>) -> Result<u8> {
    let (dev, path) = ds_path(what)?;
    let hs = join(&dev, host).await?;
    hs.session.remove(&path).await?;
    hs.leave()?;
    println!("Removed {what}");
    Ok(0)
}

pub async fn mv(from: &str, to: &str, host: Option<&str>) -> Result<u8> {
    let (dev, src) = ds_path(from)?;
    let dst = match split_ds_path(to) {
        Some((d, p)) if d == dev => p.to_string(),
        Some(_) => bail!("{to}: moving between datastores is a copy: use `ferry disk convert`"),
        None => to.to_string(),
    };
    let hs = join(&dev, host).await?;
    hs.session.rename(&src, &dst).await?;
    hs.leave()?;
    println!("Moved {from} to {}:{dst}", dev.display());
    Ok(0)
}
