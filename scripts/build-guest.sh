#!/usr/bin/env bash
# Builds the test guest offline from Debian packages: a Debian cloud kernel, and an
# initramfs with busybox (static), the virtio modules and ferry's workload program
# (statically linked). Prints the directory holding `vmlinuz` and `initramfs.img`.
#
#   scripts/build-guest.sh [OUT_DIR]      (default: $FERRY_GUEST_DIR or /var/cache/ferry/guest)
#
# The guest's /init reads the kernel command line: `ferry.seconds=N` (0: until stopped),
# `ferry.region_mib=M`, `ferry.dev=/dev/vda`, `ferry.ip=ADDR/PREFIX` (eth0's address),
# `ferry.echo_port=P` (a TCP echo server), `ferry.dirty_mib=D` (memory kept dirty); it
# loads the modules, runs the workload on the disk with its log on the console (ttyS0),
# and powers off when it ends.
# A rebuild happens only when the kernel package, busybox or the workload changed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${FERRY_GUEST_DIR:-/var/cache/ferry/guest}}
mkdir -p "$out"

need() { command -v "$1" >/dev/null || { echo "build-guest: $1 is missing (run scripts/setup.sh)" >&2; exit 1; }; }
need apt-get; need dpkg-deb; need gzip

# The workload, linked statically against glibc (no other target needed).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p ferry-guest \
  --bin workload --target x86_64-unknown-linux-gnu --target-dir target/guest
wl=target/guest/x86_64-unknown-linux-gnu/release/workload
if ldd "$wl" 2>&1 | grep -q "=>"; then
  echo "build-guest: $wl is not statically linked" >&2; exit 1
fi

kpkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
kpkg=$(kpkg)
if [ -z "$kpkg" ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  kpkg=$(kpkg)
fi
[ -n "$kpkg" ] || { echo "build-guest: no linux-image-cloud-amd64 in the apt sources (apt-get update?)" >&2; exit 1; }
stamp="$kpkg $(apt-cache policy "$kpkg" busybox-static | awk '/Candidate/ {print $2}' | tr '\n' ' ') $(sha256sum "$wl" scripts/build-guest.sh | cut -c1-16 | tr '\n' ' ')"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.img" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$kpkg" busybox-static >/dev/null 2>&1) \
  || { echo "build-guest: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
kver=${kpkg#linux-image-}
mods="$work/k/lib/modules/$kver"

# The modules the guest needs, after their dependencies (read from each module's
# `depends=` field; modules.dep is made by depmod at install, not shipped).
declare -A done_mod
order=()
add_mod() {
  local m=$1 f dep
  [ -n "${done_mod[$m]:-}" ] && return 0
  f=$(find "$mods" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [ -n "$f" ] || { echo "build-guest: module $m not found in $kpkg" >&2; exit 1; }
  for dep in $(grep -a -o 'depends=[a-z0-9_,-]*' "$f" | head -n1 | cut -d= -f2 | tr ',' ' '); do
    add_mod "$dep"
  done
  done_mod[$m]=$f
  order+=("$m")
}
for m in virtio_pci virtio_blk virtio_net virtio_console; do add_mod "$m"; done

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules,tmp}
cp "$work/bb/bin/busybox" "$root/bin/busybox"
cp "$wl" "$root/bin/workload"
: > "$root/modules"
for m in "${order[@]}"; do
  f=${done_mod[$m]}
  case $f in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
  echo "$m" >> "$root/modules"
done
cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /lib/modules/$m.ko 2>/dev/null || echo "init: insmod $m failed"; done
seconds=0; region=64; dev=/dev/vda; ip=; extra=
for a in $(cat /proc/cmdline); do
  case $a in
    ferry.seconds=*) seconds=${a#*=} ;;
    ferry.region_mib=*) region=${a#*=} ;;
    ferry.dev=*) dev=${a#*=} ;;
    ferry.ip=*) ip=${a#*=} ;;
    ferry.echo_port=*) extra="$extra --echo-port ${a#*=}" ;;
    ferry.dirty_mib=*) extra="$extra --dirty-mib ${a#*=}" ;;
  esac
done
if [ -n "$ip" ]; then
  for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
  ip link set lo up; ip link set eth0 up; ip addr add "$ip" dev eth0
  echo "FNET eth0 $ip"
fi
for i in $(seq 100); do [ -b "$dev" ] && break; sleep 0.1; done
echo "FBOOT uptime $(cut -d' ' -f1 /proc/uptime) disk $dev"
/bin/workload "$dev" --seconds "$seconds" --region-mib "$region" $extra
echo "FEXIT $?"
poweroff -f
EOF
chmod +x "$root/init"
# A newc cpio archive, written by busybox's cpio from the package itself.
(cd "$root" && find . | sort | "$work/bb/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initramfs.img.tmp"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initramfs.img.tmp" "$out/initramfs.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "$out"
