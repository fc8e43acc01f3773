#!/usr/bin/env bash
# Builds a busybox rootfs tar from Debian's busybox-static, for importing as a
# container image on hosts with no registry (tests, air-gapped hosts).
#
#   scripts/images/busybox-rootfs.sh [CACHE_DIR]   → prints the tar's path
#
# The tar is cached in CACHE_DIR (default: ${XDG_CACHE_HOME:-$HOME/.cache}/berth/images)
# and rebuilt only when missing. Import it with the agent's ImportImage
# (rootfs, command ["/bin/sh"]) or `docker import -c 'CMD ["/bin/sh"]' TAR busybox:berth`.
set -euo pipefail

cache="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/images}"
tar_path="$cache/busybox-rootfs.tar"
if [[ -s "$tar_path" ]]; then
  echo "$tar_path"
  exit 0
fi
mkdir -p "$cache"
work="$(mktemp -d)"
chmod 0755 "$work" # apt-get download runs as _apt when it can
trap 'rm -rf "$work"' EXIT

# apt-get download writes into the current directory and needs no root.
(cd "$work" && apt-get download -qq busybox-static >/dev/null)
dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"

root="$work/rootfs"
mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root}
cp "$work/pkg/bin/busybox" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
# usr/bin and sbin resolve to bin, so /usr/bin/env and /sbin/ip work as scripts expect.
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s bin "$root/sbin"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

# Write to a temporary name first so a concurrent reader never sees half a tar.
tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$tar_path.tmp.$$" .
mv "$tar_path.tmp.$$" "$tar_path"
echo "$tar_path"
