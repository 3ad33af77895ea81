#!/usr/bin/env bash
# Host + storage at once (relocate-vm --host --datastore) against its yardsticks measured
# in the same run — the disk moved alone (mirror to ready + pivot) plus a plain QEMU
# migration, and the pause of a host-only relocation — with a 4 GiB thin disk holding
# 1 GiB of data and 256 MiB of guest memory (tests/src/bin/migbench.rs, mode `both`);
# unshaped, then over links shaped to 1 Gbit/s with tc tbf:
#   scripts/bench-relocate.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cargo build --release --quiet -p ferry-cli -p ferry-tests --bin ferry --bin migbench
target/release/migbench "$runs" - both
echo
target/release/migbench "$runs" 1gbit both
