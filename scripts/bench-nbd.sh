#!/usr/bin/env bash
# fio's nbd engine against ferry's NBD server vs qemu-nbd (cache=none, aio=io_uring),
# both serving the same raw loop device (direct I/O) over a unix socket, alternating:
#   scripts/bench-nbd.sh [RUNS] [SECONDS]
# Prints medians per workload: 4 KiB randread/randwrite at QD1 and QD16, 1 MiB
# sequential read and write at QD4.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-5}
cargo build --release --quiet -p ferry-tests --bin nbdserve
work=$(mktemp -d /var/tmp/bench-nbd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  [ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s 1G "$work/disk.raw"
# Fill it, so reads read data, not holes.
dd if=/dev/urandom of="$work/disk.raw" bs=1M count=1024 conv=notrunc status=none
loopdev=$(losetup --find --show --direct-io=on "$work/disk.raw")

serve() { # $1: ferry|qemu; sets uri (runs in this shell, so pids keeps the server)
  local sock="$work/$1.sock"
  rm -f "$sock"
  if [ "$1" = ferry ]; then
    target/release/nbdserve "$loopdev" "$sock" disk >/dev/null 2>&1 &
  else
    qemu-nbd -f raw --cache=none --aio=io_uring -x disk --socket="$sock" --persistent --shared=16 "$loopdev" >/dev/null 2>&1 &
  fi
  pids+=($!)
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  uri="nbd+unix:///disk?socket=$sock"
}
stop() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

jobs=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1M 4" "write 1M 4")
declare -A res
for r in $(seq "$runs"); do
  for server in ferry qemu; do
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
    stop
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "| workload | ferry | qemu-nbd | ferry / qemu-nbd |"
echo "|---|---|---|---|"
for j in "${jobs[@]}"; do
  set -- $j
  unit=IOPS; [ "$2" = 1M ] && unit=MB/s
  f=$(echo "${res["ferry $j"]}" | median); q=$(echo "${res["qemu $j"]}" | median)
  printf '| %s %s QD%s (%s) | %.0f | %.0f | %.2f |\n' "$1" "$2" "$3" "$unit" "$f" "$q" "$(echo "$f / $q" | bc -l)"
done
