//! `ferry guest-check`: the host-side judge of the test guest. Reads the console logs
//! its workload wrote, checks that every acknowledged write is on a disk (an NBD export
//! or a raw image), and reports the longest gap between acknowledged writes — the
//! guest-visible I/O pause. Exit status 1 when anything is missing.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use diskfmt::BlockDev;
use ferry_guest::{check, parse_logs};

/// `ferry guest-check`.
#[derive(clap::Args, Debug)]
pub struct GuestCheckArgs {
    /// Console log(s) of the test guest (one workload run).
    #[arg(long = "log", required = true)]
    logs: Vec<PathBuf>,
    /// An agent's NBD unix socket, with --export.
    #[arg(long, requires = "export", conflicts_with = "image")]
    nbd: Option<PathBuf>,
    /// The export name on --nbd.
    #[arg(long)]
    export: Option<String>,
    /// A raw image (or block device) holding the guest's disk.
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn run(a: GuestCheckArgs) -> Result<u8> {
    let mut texts = Vec::new();
    for l in &a.logs {
        texts.push(
            std::fs::read_to_string(l).with_context(|| format!("{}: cannot read", l.display()))?,
        );
    }
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let mut acked = parse_logs(&refs);
    // The last run (a guest booted several times logs several).
    if let Some(run) = acked.last().map(|a| a.run) {
        acked.retain(|a| a.run == run);
    }
    let dev: Box<dyn BlockDev> = match (&a.nbd, &a.export, &a.image) {
        (Some(sock), Some(e), None) => Box::new(
            nbd::NbdClient::connect_unix(sock, e)
                .await
                .with_context(|| format!("export {e:?} on {}", sock.display()))?,
        ),
        (None, None, Some(img)) => Box::new(diskfmt::raw::RawImage::open(
            img,
            false,
            diskfmt::Engine::global()?,
        )?),
        _ => bail!("give the disk as --nbd SOCKET --export NAME, or --image FILE"),
    };
    let handle = tokio::runtime::Handle::current();
    let r = tokio::task::block_in_place(|| {
        check(&acked, &[], |first, n| {
            let mut b = vec![0u8; n as usize * 512];
            handle
                .block_on(dev.read(first * 512, &mut b))
                .map_err(std::io::Error::other)?;
            Ok(b)
        })
    });
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "acked_writes": r.acked, "overwrites": r.overwrites, "sectors": r.sectors,
                "longest_gap_ms": r.longest_gap_ms, "ok": r.ok(), "errors": r.errors,
            })
        );
    } else {
        println!(
            "{} acknowledged writes ({} overwrites, {} sectors) checked: {}; longest gap between acknowledged writes {} ms",
            r.acked,
            r.overwrites,
            r.sectors,
            if r.ok() { "every one is on the disk" } else { "MISSING WRITES" },
            r.longest_gap_ms
        );
        for e in &r.errors {
            println!("  {e}");
        }
    }
    Ok(if r.ok() { 0 } else { 1 })
}
