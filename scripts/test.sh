#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs every check: formatting, clippy with
# warnings denied, all tests (they use loop devices, so run as root), and a short fuzz run.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
echo "== fmt";    cargo fmt --all -- --check
echo "== clippy"; cargo clippy --release --workspace --all-targets --quiet -- -D warnings
echo "== build";  cargo build --release --workspace --bins --quiet   # the tests run these binaries
echo "== tests";  cargo test --release --workspace --no-fail-fast
scripts/fuzz.sh 30
