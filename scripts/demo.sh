#!/usr/bin/env bash
# ferry's demo. For now (Step 1) it shows the disk layer: a sparse image converted
# between formats and provisionings, checked against qemu-img. Later steps grow it into
# the live relocation demo. Sets the machine up first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
F=target/release/ferry
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "A 1 GiB thin raw disk with 64 MiB of scattered data (written by qemu-io)"
show $F disk create "$work/src.raw" --size 1G
qemu-io -f raw -c 'write -P 0xa1 0 16M' -c 'write -P 0xb2 300M 16M' \
  -c 'write -P 0xc3 700M 32M' "$work/src.raw" >/dev/null
show $F disk info "$work/src.raw"
show $F disk map "$work/src.raw"

step "Convert to qcow2, thin: only the data is copied"
show $F disk convert "$work/src.raw" "$work/thin.qcow2" --format qcow2
show qemu-img check "$work/thin.qcow2"

step "Convert that to raw, eager-thick: fully allocated and zeroed"
show $F disk convert "$work/thin.qcow2" "$work/eager.raw" --provisioning eager-thick
show $F disk info "$work/eager.raw"

step "Same guest-visible content in all three"
show $F disk hash "$work/src.raw"
show $F disk hash "$work/thin.qcow2"
show $F disk hash "$work/eager.raw"
show $F disk compare "$work/src.raw" "$work/eager.raw"
show qemu-img compare "$work/thin.qcow2" "$work/eager.raw"

step "A damaged image gets a one-line error naming it (exit status 2)"
cp "$work/thin.qcow2" "$work/damaged.qcow2"
truncate -s 100K "$work/damaged.qcow2"
set +e
$F disk info "$work/damaged.qcow2"
echo "exit status: $?"
set -e
printf '\nDemo finished.\n'
