//! Where a moved VM's files go and what is tidied after: a free path for a disk's new
//! file, the check that a request names only disks the VM has, and the removal of the
//! VM's folders once they are empty.

use crate::error::{bail, Result};
use uuid::Uuid;
use vm_glue::spec::VmSpec;

use crate::host::membership::Member;
use crate::host::Agent;

/// A free path for `disk` of `vm` in `m` (never the source's own path).
pub(super) fn target_path(m: &Member, vm: &str, disk: &str, avoid: Option<&str>) -> String {
    let plain = format!("/{vm}/{disk}");
    if Some(plain.as_str()) != avoid && datastore::files::stat(&m.ds, &plain).is_err() {
        return plain;
    }
    loop {
        let p = format!("/{vm}/{disk}-{}", &Uuid::new_v4().simple().to_string()[..8]);
        if datastore::files::stat(&m.ds, &p).is_err() {
            return p;
        }
    }
}

/// Refuses disk names `spec` does not have.
pub(super) fn check_disk_names<'a>(
    name: &str,
    spec: &VmSpec,
    mut asked: impl Iterator<Item = &'a String>,
) -> Result<()> {
    if let Some(d) = asked.find(|d| !spec.disks.iter().any(|x| &x.name == *d)) {
        bail!(
            "VM {name} has no disk {d:?} (its disks: {})",
            spec.disks
                .iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Removes the VM's folder on datastores where it is now empty.
pub(super) async fn remove_empty_folders(agent: &Agent, name: &str) {
    for m in &agent.members {
        let _ = m.session.remove(&format!("/{name}")).await;
    }
}
