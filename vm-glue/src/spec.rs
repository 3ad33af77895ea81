//! The VM definition, `vm.toml`, kept in the VM's datastore folder; schema in
//! `docs/vm.md`. Validation errors name the field.

use serde::{Deserialize, Serialize};

/// A VM disk: a file in a datastore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Short name, unique in the VM (`disk0`, …): also the export's suffix.
    pub name: String,
    /// The datastore holding the file (its name).
    pub datastore: String,
    /// The file's path in that datastore.
    pub path: String,
    pub size: u64,
    pub provisioning: String,
}

/// A network card.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub mac: String,
    /// A host bridge to attach a tap to; none: user-mode networking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

/// What the guest boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

/// A VM definition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub uuid: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// A versioned machine type (`pc-q35-7.2`), never an alias, so the VM can migrate.
    pub machine: String,
    /// A named CPU model (`qemu64`, `Westmere`, …).
    pub cpu: String,
    #[serde(default)]
    pub boot: Boot,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// A tombstone: the VM moved to this datastore (written where it was, before a
    /// move's commit, so the old definition can never start it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
}

fn bad(field: &str, detail: impl std::fmt::Display) -> String {
    format!("vm.toml: `{field}`: {detail}")
}

/// Whether `s` is 1 to `max` letters, digits, '-', '_' or '.'.
fn plain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_name(field: &str, s: &str) -> Result<(), String> {
    if !plain(s, 48) {
        return Err(bad(
            field,
            format!("{s:?} must be 1 to 48 letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// A value QEMU reads inside an option list (`-machine TYPE,…`, `-cpu MODEL,…`): only
/// letters, digits, '-', '_' and '.', so it cannot add options of its own.
fn check_word(field: &str, s: &str) -> Result<(), String> {
    if !plain(s, 64) {
        return Err(bad(
            field,
            format!("{s:?} must be 1 to 64 letters, digits, '-', '_' or '.' (no options)"),
        ));
    }
    Ok(())
}

/// Whether `s` is a unicast MAC `aa:bb:cc:dd:ee:ff`.
pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

impl VmSpec {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        check_name("name", &self.name)?;
        if uuid::Uuid::parse_str(&self.uuid).is_err() {
            return Err(bad("uuid", format!("{:?} is not a uuid", self.uuid)));
        }
        if !(16..=1 << 20).contains(&self.memory_mib) {
            return Err(bad("memory_mib", "must be 16 MiB to 1 TiB"));
        }
        if !(1..=256).contains(&self.vcpus) {
            return Err(bad("vcpus", "must be 1 to 256"));
        }
        check_word("machine", &self.machine)?;
        check_word("cpu", &self.cpu)?;
        let versioned = self.machine.rsplit_once('-').is_some_and(|(_, v)| {
            v.contains('.') && v.chars().all(|c| c.is_ascii_digit() || c == '.')
        });
        if !versioned {
            return Err(bad(
                "machine",
                format!(
                    "{:?} is not a versioned machine type (use e.g. pc-q35-7.2, not an alias such as q35)",
                    self.machine
                ),
            ));
        }
        if ["host", "max"].contains(&self.cpu.to_ascii_lowercase().as_str()) {
            return Err(bad(
                "cpu",
                "name a CPU model (e.g. qemu64, Westmere): host and max do not migrate",
            ));
        }
        match (&self.boot.kernel, &self.boot.firmware) {
            (Some(_), Some(_)) => return Err(bad("boot", "give kernel or firmware, not both")),
            (None, None) => {
                return Err(bad(
                    "boot",
                    "give a kernel (with initrd/append) or firmware",
                ))
            }
            (None, Some(_)) if self.boot.initrd.is_some() || self.boot.append.is_some() => {
                return Err(bad("boot", "initrd and append go with a kernel"))
            }
            _ => {}
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            check_name(&format!("disks[{i}].name"), &d.name)?;
            if !names.insert(&d.name) {
                return Err(bad(
                    &format!("disks[{i}].name"),
                    format!("{:?} is used twice", d.name),
                ));
            }
            if d.size == 0 || d.size % 512 != 0 {
                return Err(bad(
                    &format!("disks[{i}].size"),
                    "must be a positive multiple of 512",
                ));
            }
            if d.provisioning.parse::<diskfmt::Provisioning>().is_err() {
                return Err(bad(
                    &format!("disks[{i}].provisioning"),
                    "must be thin, lazy-thick or eager-thick",
                ));
            }
            if !d.path.starts_with('/') {
                return Err(bad(
                    &format!("disks[{i}].path"),
                    "must be absolute in the datastore",
                ));
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            if !valid_mac(&n.mac) {
                return Err(bad(
                    &format!("nics[{i}].mac"),
                    format!("{:?} is not a unicast MAC like 52:54:00:12:34:56", n.mac),
                ));
            }
            if let Some(b) = &n.bridge {
                if !plain(b, 15) {
                    return Err(bad(
                        &format!("nics[{i}].bridge"),
                        format!(
                            "{b:?} is not a bridge name (1 to 15 letters, digits, '-', '_', '.')"
                        ),
                    ));
                }
            }
        }
        for (field, p) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.initrd", &self.boot.initrd),
            ("boot.firmware", &self.boot.firmware),
        ] {
            if let Some(p) = p {
                if !p.starts_with('/') || p.contains(',') {
                    return Err(bad(
                        field,
                        format!("{p:?} must be an absolute path without commas"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn parse(text: &str) -> Result<VmSpec, String> {
        let s: VmSpec =
            toml::from_str(text).map_err(|e| format!("vm.toml: {}", e.to_string().trim()))?;
        s.validate()?;
        Ok(s)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a VmSpec serialises")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            uuid: "6f1c0c53-3a47-4c55-9d7e-4c3d8f1e2a10".into(),
            memory_mib: 256,
            vcpus: 1,
            machine: "pc-q35-7.2".into(),
            cpu: "qemu64".into(),
            boot: Boot {
                kernel: Some("/k".into()),
                initrd: Some("/i".into()),
                append: Some("console=ttyS0".into()),
                firmware: None,
            },
            disks: vec![Disk {
                name: "disk0".into(),
                datastore: "ds0".into(),
                path: "/vm1/disk0".into(),
                size: 1 << 30,
                provisioning: "thin".into(),
            }],
            nics: vec![Nic {
                mac: "52:54:00:12:34:56".into(),
                bridge: None,
            }],
            moved_to: None,
        }
    }

    #[test]
    fn a_spec_round_trips_through_toml() {
        let s = spec();
        assert_eq!(VmSpec::parse(&s.to_toml()).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field() {
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.machine = "q35".into()), "`machine`"),
            (Box::new(|s| s.cpu = "host".into()), "`cpu`"),
            (Box::new(|s| s.memory_mib = 1), "`memory_mib`"),
            (
                Box::new(|s| s.nics[0].mac = "01:00:00:00:00:01".into()),
                "`nics[0].mac`",
            ),
            (
                Box::new(|s| s.disks[0].provisioning = "fat".into()),
                "`disks[0].provisioning`",
            ),
            (Box::new(|s| s.boot.firmware = Some("/f".into())), "`boot`"),
            (Box::new(|s| s.name = "a b".into()), "`name`"),
            // Option injection into -machine / -cpu.
            (
                Box::new(|s| s.machine = "pc-q35-7.2,memory-backend=x".into()),
                "`machine`",
            ),
            (
                Box::new(|s| s.machine = "pc-q35-7.2,accel=kvm,x-1.2".into()),
                "`machine`",
            ),
            (Box::new(|s| s.cpu = "max,migratable=on".into()), "`cpu`"),
            (Box::new(|s| s.cpu = "qemu64,+vmx".into()), "`cpu`"),
            (Box::new(|s| s.cpu = "MAX".into()), "`cpu`"),
            (Box::new(|s| s.cpu = "".into()), "`cpu`"),
            (
                Box::new(|s| s.nics[0].bridge = Some("br0,script=/x".into())),
                "`nics[0].bridge`",
            ),
            (
                Box::new(|s| s.boot.kernel = Some("vmlinuz".into())),
                "`boot.kernel`",
            ),
        ];
        for (f, field) in cases {
            let mut s = spec();
            f(&mut s);
            let e = s.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        }
        assert!(VmSpec::parse("name = 1")
            .unwrap_err()
            .starts_with("vm.toml"));
    }
}
