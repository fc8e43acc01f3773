#!/usr/bin/env bash
# The Debian packages berth's tests use, installed when missing (as root), or
# listed when they cannot be (not root): the tests that need them then skip,
# saying which part is missing (berth_tests::parts), and fail under CI=true.
#
#   scripts/setup/debian-packages.sh [--check]
#     --check   only list what is missing (exit 0 either way)
#
# Used by scripts/test.sh (and so by .ci/run). One line per package, with why.
set -euo pipefail

packages=(
  busybox-static   # the rootfs of the test images (no registry here) and the agent image's commands
  cmake g++        # llama.cpp's server (llama-cpp-python) built from source
  libc6-dev binutils  # release binaries and the static exec shim (crt-static)
  openssh-server   # sshd for agents over SSH (ssh_hosts, multi_host)
  iproute2         # network namespaces: the "hosts" of multi_host
  docker-compose   # the compose deployment test (Debian's 1.29.2)
  podman podman-compose runc catatonit fuse-overlayfs  # the podman runtime and compose tests
  systemd          # systemd-analyze verify for the unit files
  libvirt-dev pkg-config  # libvirt.so.0, which the agent loads at run time, and its test driver
  genisoimage      # cloud-init NoCloud seeds for the libvirt runtime
  qemu-utils       # qemu-img: overlays for VM disks
  python3-venv     # the venvs of the model set-up and the LLM peers
  procps ca-certificates
)

check_only=0
[[ ${1:-} == --check ]] && check_only=1

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
# qemu-utils may be a newer backport than Debian's: any installed qemu-img will do.
if command -v qemu-img >/dev/null; then
  missing=("${missing[@]/qemu-utils}")
fi
read -r -a missing <<<"${missing[*]}"
# python3-venv: the image's own CPython may carry venv without Debian's package.
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
  read -r -a missing <<<"${missing[*]/python3-venv}"
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ $check_only == 1 || $(id -u) -ne 0 ]]; then
  echo "debian-packages: missing: ${missing[*]}" >&2
  echo "debian-packages: as root: apt-get install --no-install-recommends ${missing[*]}" >&2
  echo "debian-packages: the tests that need them will skip and say so" >&2
  exit 0
fi
echo "debian-packages: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
