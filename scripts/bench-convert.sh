#!/usr/bin/env bash
# Benchmark: `ferry disk convert` against `qemu-img convert -t none -T none` on the same
# machine, in one run, alternating, median of N runs each (default 5).
#   scripts/bench-convert.sh [RUNS]        (BENCH_DIR sets the scratch folder)
# Cases: a 4 GiB fully written raw -> raw eager-thick; a 4 GiB raw holding 1 GiB of
# scattered data -> raw thin; the same -> qcow2 (thin). Needs root (drops caches).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
dir=${BENCH_DIR:-/var/tmp/ferry-bench}
F=$PWD/target/release/ferry
[ -x "$F" ] || scripts/setup.sh >/dev/null
mkdir -p "$dir"
trap 'rm -f "$dir"/out.*' EXIT

if [ ! -f "$dir/full.raw" ]; then
  echo "preparing $dir/full.raw (4 GiB of random data)" >&2
  dd if=/dev/urandom of="$dir/full.raw" bs=16M count=256 status=none
fi
if [ ! -f "$dir/scattered.raw" ]; then
  echo "preparing $dir/scattered.raw (4 GiB, 1 GiB of random data in 1 MiB pieces)" >&2
  python3 - "$dir/scattered.raw" <<'PY'
import os, random, sys
path = sys.argv[1]
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
os.ftruncate(fd, 4 << 30)
rng = random.Random(42)
for slot in rng.sample(range(4096), 1024):
    os.pwrite(fd, os.urandom(1 << 20), slot << 20)
os.fsync(fd)
os.close(fd)
PY
fi

now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
alloc() { echo $(( $(stat -c '%b' "$1") * 512 )); }
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# case name | source | ferry args | qemu-img args
cases=(
  "4 GiB full raw -> raw eager-thick|full.raw|--format raw --provisioning eager-thick|-O raw"
  "4 GiB raw, 1 GiB scattered -> raw thin|scattered.raw|--format raw --provisioning thin|-O raw"
  "4 GiB raw, 1 GiB scattered -> qcow2 thin|scattered.raw|--format qcow2 --provisioning thin|-O qcow2"
)

echo "| case | ferry median (s) | qemu-img median (s) | qemu-img / ferry | ferry target allocated | qemu-img target allocated | source allocated |"
echo "|---|---|---|---|---|---|---|"
for c in "${cases[@]}"; do
  IFS='|' read -r name src fargs qargs <<<"$c"
  ft=(); qt=()
  for i in $(seq "$runs"); do
    # Alternate who goes first. Each tool deletes its own previous output, then waits for
    # the file system's discards of it to settle, so neither pays for the other's files.
    for tool in $( [ $((i % 2)) = 1 ] && echo "ferry qemu" || echo "qemu ferry"); do
      rm -f "$dir/out.$tool"; drop; sleep 2
      t0=$(now)
      if [ "$tool" = ferry ]; then
        $F disk convert "$dir/$src" "$dir/out.ferry" $fargs --json >/dev/null
      else
        qemu-img convert -t none -T none -f raw $qargs "$dir/$src" "$dir/out.qemu"
      fi
      t1=$(now)
      if [ "$tool" = ferry ]; then ft+=("$(echo "$t1 - $t0" | bc -l)"); else qt+=("$(echo "$t1 - $t0" | bc -l)"); fi
    done
  done
  fm=$(printf '%s\n' "${ft[@]}" | median); qm=$(printf '%s\n' "${qt[@]}" | median)
  $F disk compare "$dir/$src" "$dir/out.ferry" >/dev/null
  printf '| %s | %.2f | %.2f | %.2f | %s | %s | %s |\n' "$name" "$fm" "$qm" \
    "$(echo "$qm / $fm" | bc -l)" "$(alloc "$dir/out.ferry")" "$(alloc "$dir/out.qemu")" "$(alloc "$dir/$src")"
  echo "  runs ferry: ${ft[*]}" >&2
  echo "  runs qemu-img: ${qt[*]}" >&2
done
