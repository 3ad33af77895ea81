//! The QEMU command line for a VM on this host: machine type and CPU model from the
//! definition, acceleration (KVM where usable, else TCG), disks from this agent's NBD
//! exports over its unix socket with `reconnect-delay`, the serial console appended to a
//! log in the run directory, QMP on a unix socket, user-mode NICs with the MACs of the
//! definition.

use std::path::Path;

use crate::spec::VmSpec;

/// How the VM's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Picks the accelerator for `setting` (`auto`, `kvm`, `tcg`) and says why.
pub fn choose_accel(setting: &str) -> Result<(Accel, String), String> {
    match setting {
        "kvm" => Ok((Accel::Kvm, "kvm: set in the agent config".into())),
        "tcg" => Ok((Accel::Tcg, "tcg: set in the agent config".into())),
        "auto" => {
            if Path::new("/sys/module/kvm_pvm").exists() {
                return Ok((
                    Accel::Tcg,
                    "tcg: this host is a nested PVM guest (/sys/module/kvm_pvm), where KVM hangs stock guests"
                        .into(),
                ));
            }
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                Ok(_) => Ok((Accel::Kvm, "kvm: /dev/kvm is usable".into())),
                Err(e) => Ok((Accel::Tcg, format!("tcg: /dev/kvm is not usable ({e})"))),
            }
        }
        other => Err(format!("accel {other:?}: want auto, kvm or tcg")),
    }
}

/// Paths and names the command line refers to.
#[derive(Debug, Clone)]
pub struct Wiring<'a> {
    pub nbd_socket: &'a Path,
    pub qmp_socket: &'a Path,
    pub console_log: &'a Path,
    /// The export name of each disk, in the definition's order.
    pub exports: Vec<String>,
    pub accel: Accel,
    /// Start paused (`-S`).
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`; implies paused).
    pub incoming: bool,
}

/// The arguments after `qemu-system-x86_64`.
pub fn args(spec: &VmSpec, w: &Wiring<'_>) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", spec.name),
        "-uuid".into(),
        spec.uuid.clone(),
        "-machine".into(),
        format!("{},accel={}", spec.machine, w.accel.as_str()),
        "-cpu".into(),
        spec.cpu.clone(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", w.qmp_socket.display()),
        "-chardev".into(),
        format!(
            "file,id=console0,path={},append=on",
            w.console_log.display()
        ),
        "-serial".into(),
        "chardev:console0".into(),
    ];
    if w.paused || w.incoming {
        a.push("-S".into());
    }
    if w.incoming {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    if let Some(k) = &spec.boot.kernel {
        a.extend(["-kernel".into(), k.clone()]);
        if let Some(i) = &spec.boot.initrd {
            a.extend(["-initrd".into(), i.clone()]);
        }
        if let Some(x) = &spec.boot.append {
            a.extend(["-append".into(), x.clone()]);
        }
    }
    if let Some(f) = &spec.boot.firmware {
        a.extend(["-bios".into(), f.clone()]);
    }
    for (d, export) in spec.disks.iter().zip(&w.exports) {
        a.extend([
            "-blockdev".into(),
            format!(
                "driver=nbd,server.type=unix,server.path={},export={export},node-name={},reconnect-delay=30",
                w.nbd_socket.display(),
                d.name
            ),
            "-device".into(),
            format!("virtio-blk-pci,drive={0},id={0}", d.name),
        ]);
    }
    for (i, n) in spec.nics.iter().enumerate() {
        let netdev = match &n.bridge {
            // QEMU opens the tap; the agent puts it on the bridge once QEMU runs, and
            // it goes away with QEMU.
            Some(_) => format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                tap_name(&spec.name, i)
            ),
            None => format!("user,id=net{i}"),
        };
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=net{i},mac={}", n.mac),
        ]);
    }
    a
}

/// The tap device of NIC `i` of VM `vm` (at most 15 characters).
pub fn tap_name(vm: &str, i: usize) -> String {
    let h = crc32c::crc32c(vm.as_bytes());
    format!("fy{h:08x}n{i}")
}
