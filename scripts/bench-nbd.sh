#!/usr/bin/env bash
# fio's nbd engine over a unix socket against, alternating on one loop device (direct I/O):
#   agent    - `ferry agent` exporting a 1 GiB eager-thick datastore file of random data
#              (the real path: datastore file, locks, export gate)
#   nbdserve - ferry's NBD server alone, serving a raw 1 GiB loop device of random data
#   qemu     - qemu-nbd (cache=none, aio=io_uring) serving that same raw loop device
# (qemu-nbd cannot read a datastore file; both loop devices are over files on the same
# file system, with direct I/O.)
#   scripts/bench-nbd.sh [RUNS] [SECONDS]
# Prints medians per workload: 4 KiB randread/randwrite at QD1 and QD16, 1 MiB
# sequential read and write at QD4.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-5}
cargo build --release --quiet -p ferry-tests --bin nbdserve
cargo build --release --quiet -p ferry-cli
work=$(mktemp -d /var/tmp/bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -9 -f "supervise .*$work" 2>/dev/null || true
  sleep 0.3
  for cg in /sys/fs/cgroup/*/ferry/agent-bench-* /sys/fs/cgroup/ferry/agent-bench-*; do
    [ -d "$cg" ] || continue
    echo 1 > "$cg/cgroup.kill" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
  done
  [ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null || true
  [ -n "${rawdev:-}" ] && losetup -d "$rawdev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
F=target/release/ferry
truncate -s 1280M "$work/disk.raw"
loopdev=$(losetup --find --show --direct-io=on "$work/disk.raw")
$F datastore create "$loopdev" --label bench --profile test --max-hosts 8 --force >/dev/null
# The file holds random data, so reads read data, not zeros or holes.
dd if=/dev/urandom of="$work/fill.raw" bs=1M count=1024 status=none
FERRY_HOST=bench $F disk convert "$work/fill.raw" "$loopdev:/bench" --provisioning eager-thick >/dev/null
rawdev=$(losetup --find --show --direct-io=on "$work/fill.raw")
printf 'host = "bench"\nrun_dir = "%s/run"\nstate_dir = "%s/state"\n[[datastore]]\ndevice = "%s"\n' "$work" "$work" "$loopdev" > "$work/agent.toml"

serve() { # $1: ferry|qemu; sets uri (runs in this shell, so pids keeps the server)
  local sock="$work/$1.sock"
  rm -f "$sock"
  case $1 in
    agent)
      $F agent --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
      pids+=($!)
      for _ in $(seq 200); do [ -S "$work/run/agent.sock" ] && break; sleep 0.05; done
      $F export add bench:/bench --name disk --agent "$work/run/agent.sock" >/dev/null
      sock="$work/run/nbd.sock"
      ;;
    nbdserve)
      target/release/nbdserve "$rawdev" "$sock" disk >/dev/null 2>&1 &
      pids+=($!)
      ;;
    qemu)
      qemu-nbd -f raw --cache=none --aio=io_uring -x disk --socket="$sock" \
        --persistent --shared=16 "$rawdev" >/dev/null 2>&1 &
      pids+=($!)
      ;;
  esac
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  uri="nbd+unix:///disk?socket=$sock"
}
stop() {
  if [ "$1" = agent ]; then
    $F export rm disk --agent "$work/run/agent.sock" >/dev/null
    $F host leave --agent "$work/run/agent.sock" >/dev/null
  else
    kill "${pids[-1]}"
  fi
  wait "${pids[-1]}" 2>/dev/null || true
  unset 'pids[-1]'
}

jobs=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1M 4" "write 1M 4")
declare -A res
for r in $(seq "$runs"); do
  for server in agent nbdserve qemu; do
    serve $server
    for j in "${jobs[@]}"; do
      set -- $j
      out=$(fio --name=b --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" --iodepth="$3" \
        --size=1G --time_based --runtime="$secs" --randrepeat=0 --output-format=json 2>/dev/null)
      kind=read; case $1 in *write) kind=write;; esac
      # fio's nbd engine prints a line before the JSON.
      v=$(echo "$out" | python3 -c "import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index('{'):])['jobs'][0]['$kind']; print(j['iops'] if '$2'=='4k' else j['bw_bytes']/1e6)")
      res["$server $j"]+="$v "
      echo "run $r $server $j: $v" >&2
    done
    stop $server
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "| workload | ferry agent (datastore file) | ferry nbdserve (raw) | qemu-nbd (raw) | agent / qemu-nbd | nbdserve / qemu-nbd |"
echo "|---|---|---|---|---|---|"
for j in "${jobs[@]}"; do
  set -- $j
  unit=IOPS; [ "$2" = 1M ] && unit=MB/s
  a=$(echo "${res["agent $j"]}" | median)
  f=$(echo "${res["nbdserve $j"]}" | median); q=$(echo "${res["qemu $j"]}" | median)
  printf '| %s %s QD%s (%s) | %.0f | %.0f | %.0f | %.2f | %.2f |\n' "$1" "$2" "$3" "$unit" \
    "$a" "$f" "$q" "$(echo "$a / $q" | bc -l)" "$(echo "$f / $q" | bc -l)"
done
