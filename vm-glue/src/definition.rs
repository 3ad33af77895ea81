//! How `vm.toml` is stored so that rewriting it is crash-safe.
//!
//! The file has two 64 KiB slots. Each holds a header line
//! `# ferry vm.toml generation=N crc32c=XXXXXXXX` and then the TOML text (zero-padded);
//! the checksum covers the text. A rewrite goes to the slot *not* holding the newest
//! valid definition, with the next generation, and is flushed: torn, it fails its
//! checksum and the previous definition stands; whole, it wins. When a relocation moves
//! the definition to another datastore, the new file starts at the next generation, so
//! of two copies left by a crash the newer is the VM (the older is deleted when found).
//! A slot 0 without a header (written before this format) is generation 0.

use datastore::files::DsFile;
use diskfmt::{BlockDev, WriteFlags};

use crate::spec::VmSpec;

/// Bytes of the `vm.toml` file.
pub const CONFIG_SIZE: u64 = 1 << 20;
/// Bytes per slot.
const SLOT: u64 = 64 << 10;
const MAGIC: &str = "# ferry vm.toml generation=";

/// What can go wrong reading or writing `vm.toml`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The definition does not fit in a slot.
    #[error("the definition of {vm} is larger than 64 KiB")]
    TooLarge { vm: String },
    /// Neither slot holds a whole definition (never written, or both torn).
    #[error("{label}: holds no valid VM definition")]
    NoDefinition { label: String },
    /// The newest slot holds a definition that does not parse or validate.
    #[error("{label}: {detail}")]
    Invalid { label: String, detail: String },
    /// Reading or writing the file failed.
    #[error("{what}: {err}")]
    Disk {
        what: &'static str,
        err: diskfmt::Error,
    },
}

/// The result of the definition's operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A definition as read from its file.
#[derive(Debug, Clone)]
pub struct Stored {
    pub spec: VmSpec,
    pub generation: u64,
    pub slot: u64,
}

impl Stored {
    /// Whether this copy of a definition is the VM rather than `other`, another copy of
    /// the same VM on another datastore (left by a move interrupted at its commit): the
    /// higher generation wins; at equal generations the moved definition wins over the
    /// tombstone left where it was.
    pub fn supersedes(&self, other: &Stored) -> bool {
        self.generation > other.generation
            || (self.generation == other.generation
                && other.spec.moved_to.is_some()
                && self.spec.moved_to.is_none())
    }
}

fn encode(spec: &VmSpec, generation: u64) -> Result<Vec<u8>> {
    let text = spec.to_toml();
    let header = format!(
        "{MAGIC}{generation} crc32c={:08x}\n",
        crc32c::crc32c(text.as_bytes())
    );
    let mut buf = format!("{header}{text}").into_bytes();
    let len = (buf.len() as u64 + 1).div_ceil(4096) * 4096;
    if len > SLOT {
        return Err(Error::TooLarge {
            vm: spec.name.clone(),
        });
    }
    buf.resize(len as usize, 0);
    Ok(buf)
}

/// The generation and text of one slot, if it holds a valid definition.
fn decode(buf: &[u8], slot: u64) -> Option<(u64, String)> {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let text = std::str::from_utf8(&buf[..end]).ok()?;
    if text.trim().is_empty() {
        return None;
    }
    let Some(rest) = text.strip_prefix(MAGIC) else {
        return (slot == 0).then(|| (0, text.to_string()));
    };
    let (line, body) = rest.split_once('\n')?;
    let (g, crc) = line.split_once(" crc32c=")?;
    let g: u64 = g.parse().ok()?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32c::crc32c(body.as_bytes()) == crc).then(|| (g, body.to_string()))
}

/// Reads the newest valid definition in an open (or lock-free) `vm.toml`.
pub async fn read(f: &DsFile, label: &str) -> Result<Stored> {
    read_opt(f, label)
        .await?
        .ok_or_else(|| Error::NoDefinition {
            label: label.to_string(),
        })
}

/// [`read`], with `Ok(None)` when the file was read but holds no valid definition (a
/// new `vm.toml` never committed); errors are failures to read it.
pub async fn read_opt(f: &DsFile, label: &str) -> Result<Option<Stored>> {
    let mut buf = vec![0u8; (2 * SLOT) as usize];
    f.read(0, &mut buf).await.map_err(|err| Error::Disk {
        what: "reading the VM definition",
        err,
    })?;
    let mut best: Option<(u64, u64, String)> = None;
    for slot in 0..2u64 {
        let b = &buf[(slot * SLOT) as usize..((slot + 1) * SLOT) as usize];
        if let Some((g, text)) = decode(b, slot) {
            if best.as_ref().is_none_or(|(bg, _, _)| g > *bg) {
                best = Some((g, slot, text));
            }
        }
    }
    let Some((generation, slot, text)) = best else {
        return Ok(None);
    };
    let spec = VmSpec::parse(&text).map_err(|detail| Error::Invalid {
        label: label.to_string(),
        detail,
    })?;
    Ok(Some(Stored {
        spec,
        generation,
        slot,
    }))
}

/// Writes `spec` as the next generation after `prev` (into the other slot) and flushes.
pub async fn write_next(f: &DsFile, spec: &VmSpec, prev: Option<&Stored>) -> Result<Stored> {
    let (generation, slot) = match prev {
        Some(p) => (p.generation + 1, 1 - p.slot),
        None => (1, 0),
    };
    write_at(f, spec, generation, slot).await
}

/// Writes `spec` with `generation` into `slot` and flushes.
pub async fn write_at(f: &DsFile, spec: &VmSpec, generation: u64, slot: u64) -> Result<Stored> {
    let buf = encode(spec, generation)?;
    f.write(slot * SLOT, &buf, WriteFlags::NONE)
        .await
        .map_err(|err| Error::Disk {
            what: "writing the VM definition",
            err,
        })?;
    f.flush().await.map_err(|err| Error::Disk {
        what: "committing the VM definition",
        err,
    })?;
    Ok(Stored {
        spec: spec.clone(),
        generation,
        slot,
    })
}

/// Makes `slot` hold no definition (a commit that failed half-way must not count).
pub async fn invalidate(f: &DsFile, slot: u64) -> Result<()> {
    f.write(slot * SLOT, &[0u8; 4096], WriteFlags::FUA)
        .await
        .map_err(|err| Error::Disk {
            what: "clearing a VM definition slot",
            err,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_decode_only_when_whole() {
        let spec = crate::spec::tests::spec();
        let buf = encode(&spec, 7).unwrap();
        let (g, text) = decode(&buf, 1).unwrap();
        assert_eq!(g, 7);
        assert_eq!(VmSpec::parse(&text).unwrap(), spec);
        // A torn write (half of the new text) fails its checksum.
        let mut torn = buf.clone();
        let n = torn.iter().position(|b| *b == 0).unwrap();
        torn[n / 2..].fill(0);
        assert!(decode(&torn, 1).is_none());
        // Legacy text without a header counts in slot 0 only.
        assert_eq!(decode(b"name = \"a\"\n\0\0", 0).unwrap().0, 0);
        assert!(decode(b"name = \"a\"\n\0\0", 1).is_none());
        assert!(decode(&[0u8; 64], 0).is_none());
    }

    #[test]
    fn the_newest_copy_wins_and_a_moved_copy_wins_a_tie_with_its_tombstone() {
        let at = |generation, moved_to: Option<&str>| {
            let mut spec = crate::spec::tests::spec();
            spec.moved_to = moved_to.map(str::to_string);
            Stored {
                spec,
                generation,
                slot: 0,
            }
        };
        let (old, new) = (at(4, None), at(5, None));
        assert!(new.supersedes(&old) && !old.supersedes(&new));
        // A tombstone at the generation of the definition it points to loses to it.
        let (tomb, moved) = (at(5, Some("ds1")), at(5, None));
        assert!(moved.supersedes(&tomb) && !tomb.supersedes(&moved));
        // A higher generation wins whatever it holds: a tombstone written after a copy.
        let tomb6 = at(6, Some("ds1"));
        assert!(tomb6.supersedes(&moved) && !moved.supersedes(&tomb6));
        // Equal copies: neither supersedes the other (the first one found stays).
        assert!(!new.supersedes(&at(5, None)));
    }
}
