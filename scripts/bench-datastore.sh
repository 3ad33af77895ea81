#!/usr/bin/env bash
# Benchmark of datastore files against the raw loop device beneath a datastore,
# through the same harness (tests/src/bin/dsbench.rs), and a sparse qcow2 import against
# `qemu-img convert` to a raw file on the same file system:
#   scripts/bench-datastore.sh [RUNS] [DIR]
# Prints medians of RUNS (default 5) as JSON. DIR (default /var/tmp) holds the images.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
dir=${2:-/var/tmp}
cargo build --release --quiet -p ferry-tests --bin dsbench
exec target/release/dsbench "$dir" "$runs"
