#!/usr/bin/env bash
# Runs each fuzz target for N seconds (default 60). Needs a nightly toolchain and
# cargo-fuzz (scripts/setup.sh installs it when nightly is present); says so and
# returns success when they are missing, since fuzzing is a bonus on top of the
# property tests that cover the same parsers on stable.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
if ! rustup toolchain list 2>/dev/null | grep -q nightly || ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== fuzz: skipped (needs a nightly toolchain and cargo-fuzz)"
  exit 0
fi
for target in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
  echo "== fuzz $target (${secs}s)"
  cargo +nightly fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
