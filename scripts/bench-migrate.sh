#!/usr/bin/env bash
# A ferry host relocation against a plain QEMU migration of the same guest between the
# same two network namespaces (tests/src/bin/migbench.rs), then the same over links
# shaped to 1 Gbit/s with tc tbf:
#   scripts/bench-migrate.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet -p ferry-cli -p ferry-tests --bin ferry --bin migbench
target/release/migbench "$runs"
echo
target/release/migbench "$runs" 1gbit
