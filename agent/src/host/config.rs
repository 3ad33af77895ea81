//! The agent's TOML configuration (`ferry agent --config FILE`), validated with errors
//! that name the field. The schema is documented in `docs/api.md`.

use crate::error::{fail, Error, Result};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// What the agent is tuned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Writes to an inactive export wait up to 60 s for the lock.
    #[default]
    Production,
    /// Writes to an inactive export wait up to 5 s, so fault tests finish quickly.
    Test,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreConfig {
    /// The block device (or image file) holding the datastore.
    pub device: PathBuf,
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    host: String,
    #[serde(default)]
    datastore: Vec<DatastoreConfig>,
    run_dir: PathBuf,
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    management_listen: Option<String>,
    nbd_listen: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    profile: Profile,
    write_hold_secs: Option<u64>,
    accel: Option<String>,
    qemu: Option<String>,
    advertise: Option<String>,
    boot_dirs: Option<Vec<PathBuf>>,
}

/// Where VM kernels, initrds and firmware may come from unless the config says otherwise.
pub const DEFAULT_BOOT_DIRS: [&str; 3] =
    ["/var/lib/ferry/boot", "/usr/share/qemu", "/usr/share/ovmf"];

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub datastores: Vec<DatastoreConfig>,
    pub run_dir: PathBuf,
    /// Journals and the export table: kept across a host crash.
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub management_listen: Option<SocketAddr>,
    pub nbd_listen: Option<SocketAddr>,
    /// The cluster secret: every TCP control call and TCP export needs it.
    pub secret: Option<String>,
    pub profile: Profile,
    /// How long a write to an inactive export waits for the lock before failing (EIO).
    pub write_hold: Duration,
    /// VM acceleration: auto (KVM where usable), kvm or tcg.
    pub accel: String,
    /// The QEMU binary.
    pub qemu: String,
    /// The IP peers dial for this host's TCP listeners (needed with a wildcard listen).
    pub advertise: Option<IpAddr>,
    /// The only directories a VM's kernel, initrd or firmware may lie under.
    pub boot_dirs: Vec<PathBuf>,
}

fn field_err(file: &Path, field: &str, detail: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{}: `{field}`: {detail}", file.display()))
}

impl Config {
    pub fn load(file: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| fail!("{}: cannot read the agent config: {e}", file.display()))?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Config> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| Error::invalid(format!("{}: {}", file.display(), e.to_string().trim())))?;
        if raw.host.is_empty()
            || raw.host.len() > 64
            || !raw
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(field_err(
                file,
                "host",
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if raw.datastore.is_empty() {
            return Err(field_err(
                file,
                "datastore",
                "name at least one [[datastore]] with a device",
            ));
        }
        if !raw.run_dir.is_absolute() {
            return Err(field_err(file, "run_dir", "must be an absolute path"));
        }
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/ferry"));
        if !state_dir.is_absolute() {
            return Err(field_err(file, "state_dir", "must be an absolute path"));
        }
        let addr = |field: &str, v: &Option<String>| -> Result<Option<SocketAddr>> {
            v.as_ref()
                .map(|s| {
                    s.parse::<SocketAddr>()
                        .map_err(|e| field_err(file, field, format!("{s:?}: {e} (want IP:PORT)")))
                })
                .transpose()
        };
        let management_listen = addr("management_listen", &raw.management_listen)?;
        let nbd_listen = addr("nbd_listen", &raw.nbd_listen)?;
        let advertise = raw
            .advertise
            .as_ref()
            .map(|s| {
                s.parse::<IpAddr>()
                    .map_err(|e| field_err(file, "advertise", format!("{s:?}: {e} (want an IP)")))
            })
            .transpose()?;
        if advertise.is_some_and(|a| a.is_unspecified()) {
            return Err(field_err(
                file,
                "advertise",
                "must be an address peers can dial, not 0.0.0.0 or ::",
            ));
        }
        for (field, l) in [
            ("management_listen", management_listen),
            ("nbd_listen", nbd_listen),
        ] {
            if l.is_some_and(|a| a.ip().is_unspecified()) && advertise.is_none() {
                return Err(field_err(
                    file,
                    field,
                    "listens on every address: set `advertise` to the IP other hosts dial",
                ));
            }
        }
        let boot_dirs = match raw.boot_dirs {
            Some(dirs) => {
                if let Some(d) = dirs.iter().find(|d| !d.is_absolute()) {
                    return Err(field_err(
                        file,
                        "boot_dirs",
                        format!("{}: must be an absolute path", d.display()),
                    ));
                }
                dirs
            }
            None => DEFAULT_BOOT_DIRS.iter().map(PathBuf::from).collect(),
        };
        let secret = match (raw.secret, raw.secret_file) {
            (Some(_), Some(_)) => {
                return Err(field_err(
                    file,
                    "secret",
                    "give `secret` or `secret_file`, not both",
                ))
            }
            (Some(s), None) => Some(s),
            (None, Some(f)) => Some(
                std::fs::read_to_string(&f)
                    .map_err(|e| field_err(file, "secret_file", format!("{}: {e}", f.display())))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(s) = &secret {
            if s.len() < 16 {
                return Err(field_err(
                    file,
                    "secret",
                    "the cluster secret must be at least 16 characters",
                ));
            }
        }
        if (management_listen.is_some() || nbd_listen.is_some()) && secret.is_none() {
            return Err(field_err(
                file,
                "secret",
                "TCP listeners (management_listen, nbd_listen) need the cluster secret",
            ));
        }
        let write_hold = Duration::from_secs(raw.write_hold_secs.unwrap_or(match raw.profile {
            Profile::Production => 60,
            Profile::Test => 5,
        }));
        let accel = raw.accel.unwrap_or_else(|| "auto".into());
        vm_glue::qemu::choose_accel(&accel).map_err(|e| field_err(file, "accel", e))?;
        Ok(Config {
            accel,
            qemu: raw.qemu.unwrap_or_else(|| "qemu-system-x86_64".into()),
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| raw.run_dir.join("agent.sock")),
            host: raw.host,
            datastores: raw.datastore,
            run_dir: raw.run_dir,
            state_dir,
            management_listen,
            nbd_listen,
            secret,
            profile: raw.profile,
            write_hold,
            advertise,
            boot_dirs,
        })
    }

    /// The address peers dial for a listener bound at `bound`: the `advertise` IP when
    /// it listens on every address.
    pub fn published(&self, bound: SocketAddr) -> SocketAddr {
        match self.advertise {
            Some(ip) if bound.ip().is_unspecified() => SocketAddr::new(ip, bound.port()),
            _ => bound,
        }
    }

    /// Refuses a kernel, initrd or firmware path outside `boot_dirs` (after resolving
    /// symbolic links and `..`), so a VM definition cannot make QEMU read any host file.
    pub fn check_boot_file(&self, field: &str, path: &str) -> Result<()> {
        let real = std::fs::canonicalize(path)
            .map_err(|e| Error::invalid(format!("vm.toml: `{field}`: {path}: {e}")))?;
        let allowed = self
            .boot_dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(d)));
        if !allowed || !real.is_file() {
            return Err(Error::invalid(format!(
                "vm.toml: `{field}`: {path} is not a file under this host's boot_dirs ({}); \
                 put it there or add its directory to boot_dirs in the agent config",
                self.boot_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// The unix socket every export is served on.
    pub fn nbd_socket(&self) -> PathBuf {
        self.run_dir.join("nbd.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        Config::parse(Path::new("agent.toml"), s)
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(
            r#"
host = "a"
run_dir = "/run/ferry"
management_listen = "10.0.0.1:7700"
nbd_listen = "10.0.0.1:10809"
secret = "0123456789abcdef"
profile = "test"
[[datastore]]
device = "/dev/loop0"
"#,
        )
        .unwrap();
        assert_eq!(c.control_socket, Path::new("/run/ferry/agent.sock"));
        assert_eq!(c.write_hold, Duration::from_secs(5));
        assert_eq!(c.datastores.len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let base = "run_dir = \"/r\"\n[[datastore]]\ndevice = \"/d\"\n";
        let e = parse(&format!("host = \"a b\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("`host`"), "{e}");
        let e = parse(&format!("host = \"a\"\nnbd_listen = \"x\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("`nbd_listen`"), "{e}");
        let e = parse(&format!(
            "host = \"a\"\nnbd_listen = \"127.0.0.1:1\"\n{base}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("`secret`"), "{e}");
        let e = parse(&format!("host = \"a\"\nbogus = 1\n{base}")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = parse("host = \"a\"\nrun_dir = \"/r\"\n").unwrap_err();
        assert!(e.to_string().contains("`datastore`"), "{e}");
        let e = parse(&format!("host = \"a\"\nboot_dirs = [\"rel\"]\n{base}")).unwrap_err();
        assert!(e.to_string().contains("`boot_dirs`"), "{e}");
    }

    #[test]
    fn a_wildcard_listener_needs_an_address_to_advertise() {
        let base = "host = \"a\"\nsecret = \"0123456789abcdef\"\nrun_dir = \"/r\"\n\
                    [[datastore]]\ndevice = \"/d\"\n";
        let e = parse(&format!("nbd_listen = \"0.0.0.0:10809\"\n{base}")).unwrap_err();
        assert!(
            e.to_string().contains("`nbd_listen`") && e.to_string().contains("advertise"),
            "{e}"
        );
        let e = parse(&format!("management_listen = \"[::]:7700\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("`management_listen`"), "{e}");
        let e = parse(&format!("advertise = \"0.0.0.0\"\n{base}")).unwrap_err();
        assert!(e.to_string().contains("`advertise`"), "{e}");
        let c = parse(&format!(
            "nbd_listen = \"0.0.0.0:10809\"\nadvertise = \"10.0.0.7\"\n{base}"
        ))
        .unwrap();
        assert_eq!(
            c.published("0.0.0.0:10809".parse().unwrap()).to_string(),
            "10.0.0.7:10809"
        );
        assert_eq!(
            c.published("10.0.0.1:7700".parse().unwrap()).to_string(),
            "10.0.0.1:7700"
        );
    }

    #[test]
    fn boot_files_must_lie_under_boot_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("boot");
        std::fs::create_dir(&ok).unwrap();
        std::fs::write(ok.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), ok.join("link")).unwrap();
        let c = parse(&format!(
            "host = \"a\"\nrun_dir = \"/r\"\nboot_dirs = [\"{}\"]\n[[datastore]]\ndevice = \"/d\"\n",
            ok.display()
        ))
        .unwrap();
        let p = |f: &str| dir.path().join(f).display().to_string();
        c.check_boot_file("boot.kernel", &p("boot/vmlinuz"))
            .unwrap();
        for bad in [
            p("secret"),
            p("boot/../secret"),
            p("boot/link"),
            p("boot"),
            p("boot/none"),
        ] {
            let e = c.check_boot_file("boot.kernel", &bad).unwrap_err();
            assert!(e.to_string().contains("`boot.kernel`"), "{bad}: {e}");
        }
    }
}
