//! `vm-glue` owns what talks to QEMU (DESIGN §2): the VM's definition ([`spec`]) and
//! its crash-safe two-slot file `vm.toml` ([`definition`]), QEMU's command line and
//! accelerator choice ([`qemu`]), and the QMP client ([`qmp`]). It knows nothing of
//! hosts, agents or relocation: the `agent` crate builds on it.
#![forbid(unsafe_code)]

pub mod definition;
pub mod qemu;
pub mod qmp;
pub mod spec;
