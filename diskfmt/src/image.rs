//! Images of either format behind one type: format detection, create, open, `info`.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::blockdev::{BlockDev, ExtentKind, Provisioning};
use crate::engine::Engine;
use crate::qcow2::{self, Qcow2Image};
use crate::raw::RawImage;
use crate::{Error, Result};

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(format!("unknown format {s:?}: use raw or qcow2")),
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: Format,
    pub size: u64,
    pub provisioning: Provisioning,
    pub qcow2: qcow2::CreateOptions,
    pub overwrite: bool,
    /// Zero-fill eager-thick images now (false when the caller writes every byte).
    pub prefill: bool,
}

/// An open image of either format.
#[derive(Debug)]
pub enum Image {
    Raw(RawImage),
    Qcow2(Qcow2Image),
}

/// Detects the format of an existing image from its first bytes.
pub fn detect_format(path: &Path) -> Result<Format> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::open(path, "open", e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "read", 0, e)),
        }
    }
    Ok(
        if got == 4 && u32::from_be_bytes(magic) == qcow2::header::MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        },
    )
}

impl Image {
    /// Opens an image, detecting its format unless given.
    pub async fn open(
        path: &Path,
        format: Option<Format>,
        writable: bool,
        engine: Engine,
    ) -> Result<Image> {
        let format = match format {
            Some(f) => f,
            None => detect_format(path)?,
        };
        Ok(match format {
            Format::Raw => Image::Raw(RawImage::open(path, writable, engine)?),
            Format::Qcow2 => Image::Qcow2(Qcow2Image::open(path, writable, engine).await?),
        })
    }

    /// Creates an image.
    pub async fn create(path: &Path, spec: &CreateSpec, engine: Engine) -> Result<Image> {
        Ok(match spec.format {
            Format::Raw => Image::Raw(
                RawImage::create(
                    path,
                    spec.size,
                    spec.provisioning,
                    spec.prefill,
                    spec.overwrite,
                    engine,
                )
                .await?,
            ),
            Format::Qcow2 => Image::Qcow2(
                Qcow2Image::create(
                    path,
                    spec.size,
                    spec.provisioning,
                    spec.prefill,
                    &spec.qcow2,
                    spec.overwrite,
                    engine,
                )
                .await?,
            ),
        })
    }

    /// The image as a block device.
    pub fn dev(&self) -> &dyn BlockDev {
        match self {
            Image::Raw(r) => r,
            Image::Qcow2(q) => q,
        }
    }

    /// Its format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// Bytes the image occupies on the host.
    pub fn allocated_bytes(&self) -> Result<u64> {
        match self {
            Image::Raw(r) => r.allocated_bytes(),
            Image::Qcow2(q) => q.allocated_bytes(),
        }
    }

    /// Flushes (if writable) and closes.
    pub async fn close(self) -> Result<()> {
        match self {
            Image::Raw(r) => {
                if r.writable() {
                    r.flush().await?;
                }
                Ok(())
            }
            Image::Qcow2(q) => q.close().await,
        }
    }

    /// Describes the image.
    pub async fn info(&self) -> Result<ImageInfo> {
        let dev = self.dev();
        let mut data_bytes = 0;
        for e in crate::ops::extents(dev).await? {
            if e.kind == ExtentKind::Data {
                data_bytes += e.length;
            }
        }
        let header = match self {
            Image::Qcow2(q) => Some(q.header().clone()),
            Image::Raw(_) => None,
        };
        Ok(ImageInfo {
            path: dev.name().to_path_buf(),
            format: self.format(),
            virtual_size: dev.size(),
            allocated_bytes: self.allocated_bytes()?,
            data_bytes,
            provisioning: dev.provisioning(),
            logical_block_size: dev.logical_block_size(),
            physical_block_size: dev.physical_block_size(),
            cluster_size: header.as_ref().map(|h| h.cluster_size()),
            backing_file: header.as_ref().and_then(|h| h.backing_file.clone()),
            backing_format: header.as_ref().and_then(|h| h.backing_format.clone()),
            internal_snapshots: header.as_ref().map(|h| h.nb_snapshots),
        })
    }
}

/// What `ferry disk info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes the image occupies on the host.
    pub allocated_bytes: u64,
    /// Bytes block status reports as data.
    pub data_bytes: u64,
    pub provisioning: Provisioning,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_snapshots: Option<u32>,
}
