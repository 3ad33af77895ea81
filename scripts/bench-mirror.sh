#!/usr/bin/env bash
# The mirror engine against `qemu-img convert` on the same files, its convergence under a
# guest write load, its pivot time and the guest's write latency through it:
#   scripts/bench-mirror.sh [RUNS] [DIR]
# (medians of RUNS alternating runs; DIR defaults to /var/tmp; see tests/src/bin/mirrorbench.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
dir=${2:-/var/tmp}
cargo build --release --quiet -p ferry-tests --bin mirrorbench
work=$(mktemp -d "$dir/bench-mirror.XXXXXX")
trap 'rm -rf "$work"' EXIT
target/release/mirrorbench "$work" "$runs"
