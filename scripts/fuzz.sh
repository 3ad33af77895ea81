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
mkdir -p fuzz/artifacts
for target in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
  echo "== fuzz $target (${secs}s)"
  log=fuzz/artifacts/$target.log
  if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz target $target failed (full log: $log)" >&2
    exit 1
  fi
  grep -E '^Done [0-9]+ runs' "$log" || tail -n 3 "$log"
done
