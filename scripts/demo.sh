#!/usr/bin/env bash
# ferry's demo: the disk layer (a sparse image converted between formats and
# provisionings, checked against qemu-img), the datastore's locking (two hosts, a lock, a
# host killed and fenced, the lock taken over), files in the datastore (a qcow2 imported
# thin, opened by one host and refused to the other, exported back identical, checked),
# host agents with NBD exports and a lock handoff, the test VM under QEMU, Storage vMotion
# (that VM moved live to another datastore, every acknowledged write checked), and the
# main job: the running VM moved to another host and another datastore at once.
# Sets the machine up first (scripts/setup.sh). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
F=target/release/ferry
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "A 1 GiB thin raw disk with 64 MiB of scattered data (written by qemu-io)"
show $F disk create "$work/src.raw" --size 1G
qemu-io -f raw -c 'write -P 0xa1 0 16M' -c 'write -P 0xb2 300M 16M' \
  -c 'write -P 0xc3 700M 32M' "$work/src.raw" >/dev/null
show $F disk info "$work/src.raw"
show $F disk map "$work/src.raw"

step "Convert to qcow2, thin: only the data is copied"
show $F disk convert "$work/src.raw" "$work/thin.qcow2" --format qcow2
show qemu-img check "$work/thin.qcow2"

step "Convert that to raw, eager-thick: fully allocated and zeroed"
show $F disk convert "$work/thin.qcow2" "$work/eager.raw" --provisioning eager-thick
show $F disk info "$work/eager.raw"

step "Same guest-visible content in all three"
show $F disk hash "$work/src.raw"
show $F disk hash "$work/thin.qcow2"
show $F disk hash "$work/eager.raw"
show $F disk compare "$work/src.raw" "$work/eager.raw"
show qemu-img compare "$work/thin.qcow2" "$work/eager.raw"

step "A damaged image gets a one-line error naming it (exit status 2)"
cp "$work/thin.qcow2" "$work/damaged.qcow2"
truncate -s 100K "$work/damaged.qcow2"
set +e
$F disk info "$work/damaged.qcow2"
echo "exit status: $?"
set -e
step "A datastore shared by two hosts, each through its own loop device"
loops=()
lock_pids=()
agent_pids=()
cleanup_ds() {
  for p in "${lock_pids[@]}" "${agent_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -9 -f "supervise .*$work" 2>/dev/null || true
  sleep 0.2
  for cg in /sys/fs/cgroup/*/ferry/agent-demo-* /sys/fs/cgroup/ferry/agent-demo-*; do
    [ -d "$cg" ] || continue
    echo 1 > "$cg/cgroup.kill" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
  done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
}
trap 'cleanup_ds; rm -rf "$work"' EXIT
show $F datastore create "$work/lun.img" --label demo --size 256M --profile test --max-hosts 8
l1=$(losetup --find --show --direct-io=on "$work/lun.img"); loops+=("$l1")
l2=$(losetup --find --show --direct-io=on --sector-size 4096 "$work/lun.img"); loops+=("$l2")
echo "host alpha reaches it as $l1, host beta as $l2 (4 KiB sectors)"

step "alpha holds the lock on vm1 while its command runs"
$F lock --datastore "$l1" --host alpha --object vm1 --address 10.0.0.1:7000 -- \
  sh -c 'while true; do echo "alpha: working under lock version $FERRY_LOCK_VERSION"; sleep 2; done' &
lock_pids+=($!)
alpha=$!
sleep 3
show $F datastore info "$l2"
show $F datastore locks "$l2"
set +e
show $F lock --datastore "$l2" --host beta --object vm1 -- true
echo "exit status: $?"
set -e

step "alpha's host dies (kill -9): its supervisor fences it, then beta takes the lock"
$F lock --datastore "$l2" --host beta --object vm1 --wait 30 -- \
  sh -c 'echo "beta: got vm1 (lock version $FERRY_LOCK_VERSION)"' &
beta=$!
sleep 3
t0=$(cut -d' ' -f1 /proc/uptime)
kill -9 "$alpha"
echo "killed alpha's ferry lock at uptime $t0 s; waiting (host_dead is 10 s)"
wait "$beta"
t1=$(cut -d' ' -f1 /proc/uptime)
echo "beta held vm1 $(echo "$t1 - $t0" | bc) s after the kill; alpha's command was killed by its supervisor first"
show $F datastore locks "$l1"

step "Files in the datastore: the qcow2 imported thin by a third host, gamma, in a folder"
show $F datastore mkdir "$l1:/vm1" --host gamma
show $F disk convert "$work/thin.qcow2" "$l1:/vm1/disk0" --provisioning thin --host gamma
show $F datastore ls "$l2:/vm1"
show $F disk map "$l2:/vm1/disk0"

step "While gamma holds disk0 open, beta cannot delete it (the error names the holder)"
$F lock --datastore "$l1" --host gamma --object "file:$($F datastore ls --json "$l1:/vm1/disk0" | sed -n 's/.*"uuid": "\(.*\)".*/\1/p')" -- sleep 6 &
lock_pids+=($!)
sleep 3
set +e
show $F datastore rm "$l2:/vm1/disk0" --host beta
echo "exit status: $?"
set -e
wait "${lock_pids[-1]}"

step "Exported back to qcow2 by beta: identical to the original; the datastore checks clean"
show $F disk convert "$l2:/vm1/disk0" "$work/back.qcow2" --format qcow2
show qemu-img compare "$work/thin.qcow2" "$work/back.qcow2"
show $F datastore check "$l2"

step "A host agent on each host; alpha serves disk0 over NBD with its lock"
# Two more datastores: demo2 only alpha sees (storage move), demo3 only beta sees (host + storage move).
# The agents talk over TCP (control API and NBD) with a cluster secret.
$F datastore create "$work/lun2.img" --label demo2 --size 256M --profile test --max-hosts 8 >/dev/null
$F datastore create "$work/lun3.img" --label demo3 --size 256M --profile test --max-hosts 8 >/dev/null
l3=$(losetup --find --show --direct-io=on "$work/lun2.img"); loops+=("$l3")
l4=$(losetup --find --show --direct-io=on "$work/lun3.img"); loops+=("$l4")
G=$(scripts/build-guest.sh)   # the test guest: the agents may boot VMs from here only
port=17400
for h in alpha beta; do
  dev=$l1; own=$l3; [ $h = beta ] && { dev=$l2; own=$l4; }
  printf 'host = "demo-%s"\nrun_dir = "%s"\nprofile = "test"\nmanagement_listen = "127.0.0.1:%s"\nnbd_listen = "127.0.0.1:%s"\nsecret = "demo-cluster-secret-0123"\nboot_dirs = ["%s"]\nstate_dir = "%s"\n[[datastore]]\ndevice = "%s"\n[[datastore]]\ndevice = "%s"\n' \
    "$h" "$work/run-$h" "$port" "$((port + 1))" "$G" "$work/state-$h" "$dev" "$own" > "$work/$h.toml"
  port=$((port + 2))
  FERRY_LOG=warn $F agent --config "$work/$h.toml" & agent_pids+=($!)
done
for h in alpha beta; do
  for _ in $(seq 100); do [ -S "$work/run-$h/agent.sock" ] && break; sleep 0.1; done
done
A="--agent $work/run-alpha/agent.sock"; B="--agent $work/run-beta/agent.sock"
show $F host ls $A
show $F datastore ls $B
show $F export add demo:/vm1/disk0 $A
show qemu-img compare -f raw -F qcow2 "nbd+unix:///disk0?socket=$work/run-alpha/nbd.sock" "$work/thin.qcow2"
set +e
show $F export add demo:/vm1/disk0 $B
echo "exit status: $?"
set -e

step "beta exports it inactive (reads, no lock); alpha hands the lock over; beta activates"
show $F export add demo:/vm1/disk0 --inactive $B
show $F export deactivate disk0 --handoff-to demo-beta $A
show $F export activate disk0 $B
show qemu-io -f raw -c "write -P 0x42 0 64k" -c "read -P 0x42 0 64k" "nbd+unix:///disk0?socket=$work/run-beta/nbd.sock"

step "The test VM, defined in the datastore, runs on alpha; beta cannot start it"
show $F vm create demo-vm --datastore demo --memory 256M --disk 128M,thin \
  --kernel "$G/vmlinuz" --initrd "$G/initramfs.img" \
  --append "console=ttyS0 quiet panic=-1 ferry.seconds=0 ferry.region_mib=64" --nic mac=52:54:00:00:00:01 $A
show $F vm start demo-vm $A
set +e
show $F vm start demo-vm $B
echo "exit status: $?"
set -e
sleep 15
show $F vm ls $B
echo "$ $F vm console demo-vm (first lines and the last acknowledged writes)"
$F vm console demo-vm $A | grep -E "FBOOT|FSTART"
$F vm console demo-vm $A | grep "^FW" | tail -n 3
echo "... $($F vm console demo-vm $A | grep -c '^FW') writes acknowledged (flushed) and logged so far"

step "Storage vMotion — demo-vm moves live from datastore demo to demo2, thin to eager-thick"
pid_before=$($F vm ls --json $A | grep -o '"pid": *[0-9]*' | head -1)
show $F relocate-vm demo-vm --datastore demo2 --disk-format eager-thick $A
show $F vm ls $A
echo "QEMU before: $pid_before; after: $($F vm ls --json $A | grep -o '"pid": *[0-9]*' | head -1) (the same process: the guest never noticed)"
sleep 5

step "The main job: demo-vm moves live to host beta AND to datastore demo3 at once"
echo "alpha does not see demo3 and beta does not see demo2: the disk is copied over NBD (TCP)"
echo "into a file beta creates, while the guest keeps writing; then its memory follows."
echo "$ $F relocate-vm demo-vm --host demo-beta --datastore demo3 --json $A"
$F relocate-vm demo-vm --host demo-beta --datastore demo3 --json $A > "$work/move.json"
show $F vm ls $B
sleep 5
show $F vm stop demo-vm --force $B
step "The verifier: every write the guest saw acknowledged — before, during and after both moves — is on its disk in demo3"
show $F export add demo3:/demo-vm/disk0 --name moved --read-only $B
set +e
$F guest-check --log "$work/run-alpha/vms/demo-vm/console.log" --log "$work/run-beta/vms/demo-vm/console.log" \
  --nbd "$work/run-beta/nbd.sock" --export moved | tee "$work/check.txt"
verdict=${PIPESTATUS[0]}
set -e
show $F export rm moved $B
show $F vm rm demo-vm $B
python3 - "$work/move.json" "$work/check.txt" "$verdict" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
r = t["result"]
check = open(sys.argv[2]).read().strip().splitlines()
print("\nSummary of the main job (relocate-vm --host demo-beta --datastore demo3):")
print(f"  total time           {r['duration_s']:.2f} s (disk copy {r.get('mirror_s', 0):.2f} s, memory {r['migration_s']:.2f} s)")
print(f"  disk bytes copied    {r['copied_bytes'] / 2**20:.1f} MiB (+{sum(d['mirrored_bytes'] for d in r['disks']) / 2**20:.1f} MiB of guest writes mirrored)")
print(f"  memory bytes sent    {r['ram_transferred_bytes'] / 2**20:.1f} MiB")
print(f"  guest-visible pause  {r['pause_ms']:.0f} ms (source STOP to destination RESUME)")
print(f"  verifier             {'PASSED' if sys.argv[3] == '0' else 'FAILED'}: {check[-1] if check else ''}")
PY
[ "$verdict" = 0 ]

step "Both hosts leave cleanly"
show $F export rm disk0 $A
show $F export rm disk0 $B
show $F host leave $A
show $F host leave $B
wait "${agent_pids[@]}"
agent_pids=()

printf '\nDemo finished.\n'
