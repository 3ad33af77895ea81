//! `ferry disk ...`: image files users bring (raw, qcow2), outside any datastore.

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use diskfmt::convert::{self, ConvertOptions};
use diskfmt::image::CreateSpec;
use diskfmt::ops::{self, Comparison};
use diskfmt::{qcow2, Engine, Format, Image, Provisioning};
use serde_json::json;

use crate::units::{human, parse_size};

#[derive(Subcommand, Debug)]
pub enum DiskCommand {
    /// Create an image file.
    Create {
        path: PathBuf,
        /// Virtual size (bytes, or with a K/M/G/T suffix); a multiple of 512.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value = "raw")]
        format: Format,
        #[arg(long, default_value = "thin")]
        provisioning: Provisioning,
        /// qcow2 cluster size.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// qcow2 backing file (stored as given, relative to the image).
        #[arg(long)]
        backing: Option<String>,
        /// Format of the backing file (raw or qcow2; default: detected).
        #[arg(long, requires = "backing")]
        backing_format: Option<Format>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Show format, sizes and provisioning of an image.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the image's extents (data, zero, hole), like `qemu-img map`.
    Map {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Copy an image into a new image (or onto a block device) with a provisioning choice.
    Convert {
        src: PathBuf,
        dst: PathBuf,
        /// Target format (default raw).
        #[arg(long, default_value = "raw")]
        format: Format,
        /// Target provisioning (default thin).
        #[arg(long, default_value = "thin")]
        provisioning: Provisioning,
        /// qcow2 cluster size of the target.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Chunks of 1 MiB copied concurrently (default 8 for raw targets, 16 for qcow2
        /// targets, whose driver has more latency per request; measured best here).
        #[arg(long)]
        in_flight: Option<usize>,
        /// Overwrite an existing target file.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Compare the content of two images: exit 0 identical, 1 different, 2 error.
    Compare {
        a: PathBuf,
        b: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// blake3 of the guest-visible content (equal for raw and qcow2 of the same content).
    Hash {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn engine() -> Result<Engine> {
    Engine::global().context("cannot start the I/O engine")
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a disk command; returns the exit status.
pub async fn run(cmd: DiskCommand) -> Result<u8> {
    match cmd {
        DiskCommand::Create {
            path,
            size,
            format,
            provisioning,
            cluster_size,
            backing,
            backing_format,
            force,
        } => {
            let backing_format = match (&backing, backing_format) {
                (Some(_), Some(f)) => Some(f.as_str().to_string()),
                (Some(b), None) => {
                    let resolved = path.parent().unwrap_or(Path::new(".")).join(b);
                    Some(
                        diskfmt::image::detect_format(&resolved)?
                            .as_str()
                            .to_string(),
                    )
                }
                _ => None,
            };
            if backing.is_some() && format != Format::Qcow2 {
                bail!("{}: --backing needs --format qcow2", path.display());
            }
            let spec = CreateSpec {
                format,
                size,
                provisioning,
                qcow2: qcow2::CreateOptions {
                    cluster_size: cluster_size as usize,
                    backing_file: backing,
                    backing_format,
                },
                overwrite: force,
                prefill: true,
            };
            let img = Image::create(&path, &spec, engine()?).await?;
            img.close().await?;
            println!(
                "Created {} ({}, {}, {})",
                path.display(),
                format.as_str(),
                human(size),
                provisioning
            );
            Ok(0)
        }
        DiskCommand::Info { path, json } => {
            let img = Image::open(&path, None, false, engine()?).await?;
            let info = img.info().await?;
            img.close().await?;
            if json {
                print_json(&serde_json::to_value(&info)?)?;
            } else {
                println!("image:            {}", info.path.display());
                println!("format:           {}", info.format.as_str());
                println!(
                    "virtual size:     {} ({} bytes)",
                    human(info.virtual_size),
                    info.virtual_size
                );
                println!("allocated:        {}", human(info.allocated_bytes));
                println!("data:             {}", human(info.data_bytes));
                println!("provisioning:     {}", info.provisioning);
                if let Some(cs) = info.cluster_size {
                    println!("cluster size:     {cs}");
                }
                if let Some(b) = &info.backing_file {
                    let f = info.backing_format.as_deref().unwrap_or("?");
                    println!("backing file:     {b} ({f})");
                }
                if let Some(n) = info.internal_snapshots.filter(|&n| n > 0) {
                    println!("snapshots:        {n} (read-only)");
                }
            }
            Ok(0)
        }
        DiskCommand::Map { path, json } => {
            let img = Image::open(&path, None, false, engine()?).await?;
            let extents = ops::extents(img.dev()).await?;
            img.close().await?;
            if json {
                let v: Vec<_> = extents
                    .iter()
                    .map(|e| {
                        json!({
                            "start": e.offset,
                            "length": e.length,
                            "data": e.kind == diskfmt::ExtentKind::Data,
                            "zero": e.kind.reads_zero(),
                            "kind": e.kind,
                        })
                    })
                    .collect();
                print_json(&serde_json::Value::Array(v))?;
            } else {
                println!("{:<20}{:<20}kind", "offset", "length");
                for e in extents {
                    let kind = serde_json::to_value(e.kind)?;
                    println!(
                        "{:<20}{:<20}{}",
                        format!("{:#x}", e.offset),
                        format!("{:#x}", e.length),
                        kind.as_str().unwrap_or("?")
                    );
                }
            }
            Ok(0)
        }
        DiskCommand::Convert {
            src,
            dst,
            format,
            provisioning,
            cluster_size,
            in_flight,
            force,
            json,
        } => {
            let spec = CreateSpec {
                format,
                size: 0,
                provisioning,
                qcow2: qcow2::CreateOptions {
                    cluster_size: cluster_size as usize,
                    ..Default::default()
                },
                overwrite: force,
                prefill: false,
            };
            let in_flight = in_flight.unwrap_or(match format {
                Format::Qcow2 => 16,
                Format::Raw => 8,
            });
            convert_cmd(&src, &dst, spec, in_flight, json).await
        }
        DiskCommand::Compare { a, b, json } => {
            let e = engine()?;
            let ia = Image::open(&a, None, false, e.clone()).await?;
            let ib = Image::open(&b, None, false, e).await?;
            let r = ops::compare(ia.dev(), ib.dev()).await?;
            ia.close().await?;
            ib.close().await?;
            if json {
                print_json(&serde_json::to_value(r)?)?;
            }
            let (Comparison::Identical { size_mismatch }
            | Comparison::Different { size_mismatch, .. }) = r;
            if size_mismatch && !json {
                println!("Warning: Image size mismatch!");
            }
            match r {
                Comparison::Identical { .. } => {
                    if !json {
                        println!("Images are identical.");
                    }
                    Ok(0)
                }
                Comparison::Different { offset, .. } => {
                    if !json {
                        println!("Content mismatch at offset {offset}!");
                    }
                    Ok(1)
                }
            }
        }
        DiskCommand::Hash { path, json } => {
            let img = Image::open(&path, None, false, engine()?).await?;
            let h = ops::hash(img.dev()).await?;
            let size = img.dev().size();
            img.close().await?;
            if json {
                print_json(&json!({"path": path, "size": size, "blake3": h.to_hex().as_str()}))?;
            } else {
                println!("{}  {}", h.to_hex(), path.display());
            }
            Ok(0)
        }
    }
}

fn is_blockdev(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

async fn convert_cmd(
    src: &Path,
    dst: &Path,
    mut spec: CreateSpec,
    in_flight: usize,
    json: bool,
) -> Result<u8> {
    let e = engine()?;
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(src), std::fs::canonicalize(dst)) {
        if a == b {
            bail!("{}: source and target are the same file", dst.display());
        }
    }
    let source = Image::open(src, None, false, e.clone()).await?;
    let started = Instant::now();
    // A block device is written in place; a file is created (round the size up to 512
    // bytes, as every image size must be).
    let (target, target_is_zero) = if is_blockdev(dst) {
        if spec.format != Format::Raw {
            bail!(
                "{}: a block device target must be --format raw",
                dst.display()
            );
        }
        (
            Image::open(dst, Some(Format::Raw), true, e.clone()).await?,
            false,
        )
    } else {
        spec.size = source.dev().size().div_ceil(512) * 512;
        let img = Image::create(dst, &spec, e.clone()).await?;
        if let Image::Qcow2(q) = &img {
            // Nobody reads the new target before the conversion flushes it.
            q.enable_unordered_allocation();
        }
        (img, true)
    };
    let total = source.dev().size();
    let reporter = Reporter::new(total, !json);
    let stats = convert::convert(
        source.dev(),
        target.dev(),
        ConvertOptions {
            in_flight,
            target_is_zero,
        },
        &|done, total| reporter.update(done, total),
    )
    .await;
    reporter.finish();
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            // Do not leave a half-written image behind that looks like a good one.
            let _ = target.close().await;
            if target_is_zero {
                let _ = std::fs::remove_file(dst);
            }
            return Err(e.into());
        }
    };
    source.close().await?;
    let allocated = target.allocated_bytes()?;
    target.close().await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        print_json(&json!({
            "source": src, "target": dst, "seconds": secs,
            "stats": stats, "target_allocated_bytes": allocated,
        }))?;
    } else {
        println!(
            "Converted {} -> {} in {secs:.2}s: {} written, {} zeroed, {} skipped; target allocates {}",
            src.display(),
            dst.display(),
            human(stats.bytes_written),
            human(stats.bytes_zeroed),
            human(stats.bytes_skipped),
            human(allocated)
        );
    }
    Ok(0)
}

/// Progress on stderr: a bar on a terminal, a line per 10% otherwise.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    last_decile: Mutex<u64>,
}

impl Reporter {
    fn new(total: u64, enabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        Reporter {
            bar,
            plain: enabled && !tty,
            last_decile: Mutex::new(0),
        }
    }

    fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if self.plain && total > 0 {
            let decile = done * 10 / total;
            let mut last = self.last_decile.lock().expect("progress lock");
            if decile > *last {
                *last = decile;
                eprintln!(
                    "progress: {}% ({} of {})",
                    decile * 10,
                    human(done),
                    human(total)
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
