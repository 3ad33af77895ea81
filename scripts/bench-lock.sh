#!/usr/bin/env bash
# Benchmark of the datastore's locking, on a loop device, test profile:
#   scripts/bench-lock.sh [RUNS]
# - uncontended lock acquire + release (median of 200), and join time (median of RUNS);
# - kill -9 of a lock holder → another host holding the lock (median of RUNS).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet --bin ferry --bin lockbench
F=$PWD/target/release/ferry
B=$PWD/target/release/lockbench
work=$(mktemp -d)
loops=()
cleanup() {
  pkill -9 -f "ferry lock --datastore $work" 2>/dev/null || true
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
$F datastore create "$work/lun.img" --label bench --size 256M --profile test --max-hosts 8 >/dev/null
l1=$(losetup --find --show --direct-io=on "$work/lun.img"); loops+=("$l1")
l2=$(losetup --find --show --direct-io=on "$work/lun.img"); loops+=("$l2")
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

joins=(); acq=()
for i in $(seq "$runs"); do
  out=$($B "$l1" "bench$i" 200)
  joins+=("$(echo "$out" | sed 's/.*"join_ms": \([0-9.]*\).*/\1/')")
  acq+=("$(echo "$out" | sed 's/.*"acquire_release_median_ms": \([0-9.]*\).*/\1/')")
  echo "  run $i: $out" >&2
done

takeover=()
for i in $(seq "$runs"); do
  $F lock --datastore "$l1" --host "holder$i" --object vm -- sleep 1000 2>/dev/null &
  holder=$!
  sleep 3
  $F lock --datastore "$l2" --host "taker$i" --object vm --wait 60 -- sh -c "cat /proc/uptime > $work/got" 2>/dev/null &
  taker=$!
  sleep 3
  t0=$(cut -d' ' -f1 /proc/uptime)
  kill -9 "$holder"
  wait "$taker"
  t1=$(cut -d' ' -f1 "$work/got")
  takeover+=("$(echo "$t1 - $t0" | bc -l)")
  echo "  takeover run $i: $(echo "$t1 - $t0" | bc -l) s" >&2
  sleep 9   # let the holder's supervisor fence and exit
done

echo "| measure (test profile: io_timeout 1 s, host_dead 10 s) | median |"
echo "|---|---|"
printf '| uncontended acquire + release (median of 200, medians of %s runs) | %.2f ms |\n' "$runs" "$(printf '%s\n' "${acq[@]}" | median)"
printf '| join (includes the 2 × io_timeout wait) | %.0f ms |\n' "$(printf '%s\n' "${joins[@]}" | median)"
printf '| kill -9 of the holder → another host holds the lock | %.2f s |\n' "$(printf '%s\n' "${takeover[@]}" | median)"
