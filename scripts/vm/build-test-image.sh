#!/usr/bin/env bash
# Builds the tiny bootable image berth's VM tests boot, from what is installed
# here (no download, no registry, no root needed):
#   - Debian's kernel (linux-image-amd64: /boot/vmlinuz-*),
#   - an initramfs with busybox (busybox-static), the virtio modules of that
#     kernel and an /init that prints `berth-guest-up …` on the serial console,
#     asks DHCP for an address when the VM has a network card (eth0), runs
#     the cloud-init seed's user-data when it is a script (`#!`, as
#     cloud-init does), prints
#     `berth-guest-tick N` every 2 s (a console that keeps writing, for log
#     tests), then waits (it runs berth-exec-shim on the virtio-serial port
#     `dev.berth.shim` when --shim is given and the port exists, its stderr,
#     the journal of the execs it runs, on the console; with
#     --guest-agent, Debian's qemu-ga (qemu-guest-agent) with the shared
#     libraries it needs, on the port `org.qemu.guest_agent.0`: the exec
#     fallback for images without the shim),
#   - on a FAT disk booted by syslinux (syslinux, mtools), converted to qcow2.
#
#   scripts/vm/build-test-image.sh OUT_DIR [--shim PATH] [--guest-agent] [--kernel PATH]
# Writes OUT_DIR/base.qcow2 (and OUT_DIR/work/); prints the image's path.
set -euo pipefail

out=${1:?usage: build-test-image.sh OUT_DIR [--shim PATH] [--kernel PATH]}
shift
shim=""
guest_agent=""
kernel=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --shim) shim=${2:?--shim needs a path}; shift 2 ;;
    --kernel) kernel=${2:?--kernel needs a path}; shift 2 ;;
    --guest-agent) guest_agent=/usr/sbin/qemu-ga; shift ;;
    *) echo "build-test-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

die() { echo "build-test-image: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is missing (Debian: apt-get install $2)"; }
need busybox busybox-static
need cpio cpio
need mformat mtools
need mcopy mtools
need syslinux syslinux
need qemu-img qemu-utils

if [[ -z $kernel ]]; then
  kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n $kernel ]] || die "no kernel in /boot (Debian: apt-get install linux-image-amd64)"
fi
[[ -r $kernel ]] || die "cannot read the kernel $kernel"
version=${kernel##*/vmlinuz-}
# The guest has no C library: what runs there must be static (ldd says
# "not a dynamic executable", or "statically linked" for a static-pie).
is_static() {
  local said
  said=$(ldd "$1" 2>&1 || true)
  grep -qE 'not a dynamic executable|statically linked' <<<"$said"
}
busybox=$(command -v busybox)
is_static "$busybox" || die "$busybox is dynamically linked (Debian: apt-get install busybox-static)"


work=$out/work
rm -rf "$work"
mkdir -p "$work/root/bin" "$work/root/lib/modules" "$work/root/sbin"
cp "$busybox" "$work/root/bin/busybox"
# virtio_pci, virtio_console (the shim's port) and virtio_net, with what they need, in
# the order modprobe would load them (modules.dep lists a module's
# dependencies last-loaded first). Modules in Debian's kernel (uncompressed in
# 6.1, .ko.xz elsewhere).
dep_file=/lib/modules/$version/modules.dep
[[ -r $dep_file ]] || die "no $dep_file (Debian: the kernel's package, linux-image-$version)"
order=()
for wanted in kernel/drivers/virtio/virtio_pci.ko kernel/drivers/char/virtio_console.ko \
  kernel/drivers/net/virtio_net.ko kernel/drivers/block/virtio_blk.ko kernel/fs/isofs/isofs.ko; do
  line=$(grep -E "^$wanted(\.xz)?:" "$dep_file" || true)
  [[ -n $line ]] || die "$wanted is not in $dep_file"
  read -r -a deps <<<"${line#*:}"
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do order+=("${deps[i]}"); done
  order+=("${line%%:*}")
done
: >"$work/root/lib/modules/order"
for module in "${order[@]}"; do
  base=$(basename "${module%.xz}")
  [[ -f $work/root/lib/modules/$base ]] && continue
  case $module in
    *.xz) xz -dc "/lib/modules/$version/$module" >"$work/root/lib/modules/$base" ;;
    *) cp "/lib/modules/$version/$module" "$work/root/lib/modules/$base" ;;
  esac
  echo "$base" >>"$work/root/lib/modules/order"
done
if [[ -n $shim ]]; then
  is_static "$shim" || die "$shim is dynamically linked: build it with RUSTFLAGS='-C target-feature=+crt-static'"
  cp "$shim" "$work/root/sbin/berth-exec-shim"
fi
if [[ -n $guest_agent ]]; then
  [[ -x $guest_agent ]] || die "no $guest_agent (Debian: apt-get install qemu-guest-agent)"
  cp "$guest_agent" "$work/root/sbin/qemu-ga"
  # The guest has no C library of its own: qemu-ga's shared libraries (and
  # the loader) go where ldd found them.
  while read -r lib; do
    mkdir -p "$work/root$(dirname "$lib")"
    cp -L "$lib" "$work/root$lib"
  done < <(ldd "$guest_agent" | grep -oE '/[^ ]+')
fi
# udhcpc's hook: gives the leased address to the interface.
mkdir -p "$work/root/etc"
cat >"$work/root/etc/udhcpc.script" <<'DHCP'
#!/bin/busybox sh
case $1 in
  bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    echo "berth-guest: $interface has $ip"
    ;;
esac
DHCP
chmod 755 "$work/root/etc/udhcpc.script"
cat >"$work/root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>/dev/console
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Built in on some kernels, modules on Debian's: loaded in modules.dep order.
while read -r module; do
  insmod "/lib/modules/$module" || echo "berth-guest: insmod $module failed"
done </lib/modules/order
hostname berth-guest
echo "berth-guest-up kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  udhcpc -i eth0 -s /etc/udhcpc.script -b -q -t 10 >/dev/null 2>&1 &
fi
(n=0; while :; do n=$((n + 1)); echo "berth-guest-tick $n"; sleep 2; done) &
# What cloud-init does with a user-data script (`#!` first): run it once at
# boot. The NoCloud seed is an ISO 9660 disk labelled cidata; its output goes
# to the console, so the VM's logs show it.
mkdir -p /run/seed
for disk in /dev/vd?; do
  mount -t iso9660 -o ro "$disk" /run/seed 2>/dev/null || continue
  if [ "$(head -c 2 /run/seed/user-data 2>/dev/null)" = "#!" ]; then
    cp /run/seed/user-data /run/user-data && chmod 755 /run/user-data
    echo "berth-guest: running user-data from $disk"
    (/run/user-data 2>&1 | sed 's/^/berth-guest: user-data: /') &
  fi
  umount /run/seed
  break
done
# A virtio-serial port by its name (no udev here for the symlinks).
port_named() {
  for name in /sys/class/virtio-ports/*/name; do
    [ -f "$name" ] && [ "$(cat "$name")" = "$1" ] && echo "/dev/$(basename "$(dirname "$name")")"
  done
}
qga_port=$(port_named org.qemu.guest_agent.0)
if [ -n "$qga_port" ] && [ -x /sbin/qemu-ga ]; then
  echo "berth-guest: qemu-ga on $qga_port"
  (while :; do /sbin/qemu-ga -m virtio-serial -p "$qga_port" -t /run; sleep 1; done) &
fi
port=$(port_named dev.berth.shim)
if [ -n "$port" ] && [ -x /sbin/berth-exec-shim ]; then
  # Its stderr is the console (as this script's): its exec journal goes to the VM's Logs.
  echo "berth-guest: berth-exec-shim on $port"
  while :; do /sbin/berth-exec-shim --serial "$port"; sleep 1; done
elif [ -x /sbin/berth-exec-shim ]; then
  echo "berth-guest: no virtio-serial port dev.berth.shim (ports: $(ls /sys/class/virtio-ports 2>&1))"
fi
while :; do sleep 3600; done
INIT
chmod 755 "$work/root/init"
(cd "$work/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$work/initrd"

cat >"$work/syslinux.cfg" <<CFG
DEFAULT berth
PROMPT 0
TIMEOUT 0
LABEL berth
  KERNEL /vmlinuz
  INITRD /initrd
  APPEND console=ttyS0 quiet
CFG
# A FAT "superfloppy" disk: syslinux's boot sector at sector 0, which
# SeaBIOS boots like any disk. 64 cylinders of 64 heads x 32 sectors: 64 MiB.
rm -f "$work/disk.raw"
mformat -i "$work/disk.raw" -C -t 64 -h 64 -s 32 -v BERTH ::
mcopy -i "$work/disk.raw" "$kernel" ::vmlinuz
mcopy -i "$work/disk.raw" "$work/initrd" ::initrd
mcopy -i "$work/disk.raw" "$work/syslinux.cfg" ::syslinux.cfg
syslinux --install "$work/disk.raw"
qemu-img convert -q -f raw -O qcow2 "$work/disk.raw" "$out/base.qcow2"
rm -f "$work/disk.raw"
echo "$out/base.qcow2"
