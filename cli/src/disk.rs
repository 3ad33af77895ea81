//! `ferry disk ...`: image files users bring (raw, qcow2), and datastore files
//! (`DEVICE:/folder/file`): create, inspect, convert between them (import into and export
//! out of a datastore), compare, hash. Reading a datastore file needs no host identity
//! (it reads the committed state); creating one joins the datastore as this host.

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use datastore::files::DsFile;
use diskfmt::convert::{self, ConvertOptions};
use diskfmt::image::CreateSpec;
use diskfmt::ops::{self, Comparison};
use diskfmt::{qcow2, BlockDev, Engine, Format, Image, Provisioning};
use serde_json::json;

use crate::dsfiles::ds_path;
use crate::host::{host_name, HostSession};
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
        /// Host name to join a datastore as (default: FERRY_HOST, else the host name).
        #[arg(long)]
        host: Option<String>,
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
        /// Host name to join a target datastore as (default: FERRY_HOST, else the host
        /// name).
        #[arg(long)]
        host: Option<String>,
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

/// An opened image file or datastore file.
enum Dev {
    Img(Image),
    Ds(DsFile, Option<HostSession>),
}

impl Dev {
    fn dev(&self) -> &dyn BlockDev {
        match self {
            Dev::Img(i) => i.dev(),
            Dev::Ds(f, _) => f,
        }
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(match self {
            Dev::Img(i) => i.allocated_bytes()?,
            Dev::Ds(f, _) => {
                let (dev, path) = ds_path(&f.name().display().to_string())?;
                datastore::files::stat(&datastore::Datastore::open(&dev)?, &path)?.allocated_bytes
            }
        })
    }

    async fn close(self) -> Result<()> {
        match self {
            Dev::Img(i) => Ok(i.close().await?),
            Dev::Ds(f, hs) => {
                let closed = f.close().await;
                if let Some(hs) = hs {
                    hs.check()?;
                    hs.leave()?;
                }
                Ok(closed?)
            }
        }
    }
}

/// The datastore part of a path argument, if it is one.
fn as_ds(p: &Path) -> Option<(PathBuf, String)> {
    let s = p.to_str()?;
    datastore::files::split_ds_path(s).map(|(d, q)| (d, q.to_string()))
}

/// Opens an image or datastore file for reading.
async fn open_ro(p: &Path) -> Result<Dev> {
    match as_ds(p) {
        Some((dev, path)) => {
            let f =
                tokio::task::spawn_blocking(move || DsFile::open_readonly(&dev, &path)).await??;
            Ok(Dev::Ds(f, None))
        }
        None => Ok(Dev::Img(Image::open(p, None, false, engine()?).await?)),
    }
}

/// Joins the datastore as this host and creates a file there (replacing one with
/// `force`).
async fn create_ds(
    dev: &Path,
    path: &str,
    size: u64,
    provisioning: Provisioning,
    force: bool,
    host: Option<&str>,
) -> Result<Dev> {
    let name = host_name(host)?;
    let device = dev.to_path_buf();
    let hs = tokio::task::spawn_blocking(move || HostSession::join(&device, &name)).await??;
    if force {
        match hs.session.remove(path).await {
            Ok(()) | Err(datastore::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let f = hs.session.create(path, size, provisioning).await?;
    Ok(Dev::Ds(f, Some(hs)))
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
            host,
        } => {
            if let Some((dev, p)) = as_ds(&path) {
                if format != Format::Raw || backing.is_some() {
                    bail!(
                        "{}: datastore files have their own format: drop --format and --backing",
                        path.display()
                    );
                }
                let f = create_ds(
                    &dev,
                    &p,
                    size.div_ceil(512) * 512,
                    provisioning,
                    force,
                    host.as_deref(),
                )
                .await?;
                f.close().await?;
                println!(
                    "Created {} (datastore file, {}, {provisioning})",
                    path.display(),
                    human(size)
                );
                return Ok(0);
            }
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
        DiskCommand::Info { path, json } if as_ds(&path).is_some() => {
            let f = open_ro(&path).await?;
            let extents = ops::extents(f.dev()).await?;
            let data: u64 = extents
                .iter()
                .filter(|e| e.kind == diskfmt::ExtentKind::Data)
                .map(|e| e.length)
                .sum();
            let (size, prov, allocated) =
                (f.dev().size(), f.dev().provisioning(), f.allocated_bytes()?);
            f.close().await?;
            if json {
                print_json(&json!({
                    "path": path, "format": "datastore", "virtual_size": size,
                    "allocated_bytes": allocated, "data_bytes": data, "provisioning": prov,
                }))?;
            } else {
                println!("image:            {}", path.display());
                println!("format:           datastore file");
                println!("virtual size:     {} ({size} bytes)", human(size));
                println!("allocated:        {}", human(allocated));
                println!("data:             {}", human(data));
                println!("provisioning:     {prov}");
            }
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
            let img = open_ro(&path).await?;
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
            host,
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
            convert_cmd(&src, &dst, spec, in_flight, host.as_deref(), json).await
        }
        DiskCommand::Compare { a, b, json } => {
            let ia = open_ro(&a).await?;
            let ib = open_ro(&b).await?;
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
            let img = open_ro(&path).await?;
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
    host: Option<&str>,
    json: bool,
) -> Result<u8> {
    let e = engine()?;
    if let (Ok(a), Ok(b)) = (std::fs::canonicalize(src), std::fs::canonicalize(dst)) {
        if a == b {
            bail!("{}: source and target are the same file", dst.display());
        }
    }
    if src == dst {
        bail!("{}: source and target are the same file", dst.display());
    }
    let source = open_ro(src).await?;
    let started = Instant::now();
    // A datastore file or image file is created (size rounded up to 512 bytes, as every
    // image size must be); a block device is written in place.
    let dst_ds = as_ds(dst);
    let (target, target_is_zero) = if let Some((dev, p)) = &dst_ds {
        if spec.format != Format::Raw {
            bail!(
                "{}: datastore files have their own format: drop --format",
                dst.display()
            );
        }
        let size = source.dev().size().div_ceil(512) * 512;
        (
            create_ds(dev, p, size, spec.provisioning, spec.overwrite, host).await?,
            true,
        )
    } else if is_blockdev(dst) {
        if spec.format != Format::Raw {
            bail!(
                "{}: a block device target must be --format raw",
                dst.display()
            );
        }
        (
            Dev::Img(Image::open(dst, Some(Format::Raw), true, e.clone()).await?),
            false,
        )
    } else {
        spec.size = source.dev().size().div_ceil(512) * 512;
        let img = Image::create(dst, &spec, e.clone()).await?;
        if let Image::Qcow2(q) = &img {
            // Nobody reads the new target before the conversion flushes it.
            q.enable_unordered_allocation();
        }
        (Dev::Img(img), true)
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
        Err(err) => {
            // Do not leave a half-written image behind that looks like a good one.
            match (target, &dst_ds) {
                (Dev::Ds(f, Some(hs)), Some((_, p))) => {
                    let _ = f.close().await;
                    let _ = hs.session.remove(p).await;
                    let _ = hs.leave();
                }
                (t, _) => {
                    let _ = t.close().await;
                    if target_is_zero {
                        let _ = std::fs::remove_file(dst);
                    }
                }
            }
            return Err(err.into());
        }
    };
    source.close().await?;
    // A datastore target commits on close: count its blocks after that.
    let allocated = if dst_ds.is_some() {
        target.close().await?;
        open_ro(dst).await?.allocated_bytes()?
    } else {
        let a = target.allocated_bytes()?;
        target.close().await?;
        a
    };
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
