#!/usr/bin/env bash
# Installs what ferry needs on a Debian machine and builds it (release profile).
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v fio >/dev/null || missing+=(fio)
command -v nbdinfo >/dev/null || missing+=(libnbd-bin)
command -v losetup >/dev/null || missing+=(mount)
command -v bc >/dev/null || missing+=(bc)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)   # the fencing tests' frozen file system
command -v fsfreeze >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ] || ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
  echo "setup: installing ${missing[*]} qemu-utils"
  as_root apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  # After qemu-system-x86, so apt picks the qemu-utils that matches it.
  if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-utils
  fi
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install a Rust toolchain (1.89 or newer) with rustup" >&2
  exit 1
fi

# cargo-fuzz drives the fuzz targets; it needs a nightly toolchain, used only if present.
if rustup toolchain list 2>/dev/null | grep -q nightly && ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet || echo "setup: cargo-fuzz unavailable; fuzzing will be skipped"
fi

cargo build --release --bin ferry --quiet
echo "setup: ready ($(qemu-img --version | head -1); ferry at target/release/ferry)"
