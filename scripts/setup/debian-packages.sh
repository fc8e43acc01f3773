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
  chromium         # headless, opens `berth report`'s HTML as a browser does (tests/tests/report.rs)
  libvirt-dev pkg-config  # libvirt.so.0, which the agent loads at run time, and its test driver
  genisoimage      # cloud-init NoCloud seeds for the libvirt runtime
  qemu-utils       # qemu-img: overlays for VM disks
  libvirt-daemon-system libvirt-daemon-driver-qemu  # libvirtd and its qemu driver: the real-VM test
  libvirt-clients  # virsh: scripts/setup/libvirtd.sh asks whether the daemon answers
  dnsmasq-base     # DHCP of libvirt's `default` network: the real-VM test's guest gets an IP
  linux-image-amd64  # the kernel the test VM boots (scripts/vm/build-test-image.sh)
  syslinux syslinux-common mtools  # the test VM's boot disk: FAT + syslinux, made without root or mounts
  cpio             # the test VM's initramfs
  qemu-guest-agent # qemu-ga in the test VM's guest-agent image: the exec fallback without the shim
  python3-venv     # the venvs of the model set-up and the LLM peers
  prometheus       # promtool checks deploy/monitoring/'s rules and config; the monitoring image's binary
  slurmctld slurmd slurm-client munge slurmrestd slurm-wlm-jwt-plugin  # a real single-node SLURM: the slurm runtime's tests
  slurmdbd mariadb-server  # SLURM's job accounting (sacct's energy): the test cluster's slurmdbd on a MariaDB of its own
  postgresql-15    # the orchestrator's PostgreSQL store: its tests start a server of their own (initdb in a temp dir)
  procps ca-certificates
)

check_only=0
[[ ${1:-} == --check ]] && check_only=1

# qemu-system-x86 (the real-VM test) must be the version of the installed
# qemu-utils: Debian 12's 7.2 would remove a backported qemu-utils (10.0 on
# some machine kinds: it Breaks qemu-system-common << 8.0), so that version
# comes from bookworm-backports, added to apt's sources when missing.
qemu_utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
qemu_from=()
if [[ $qemu_utils == *bpo* ]]; then
  qemu_from=(-t bookworm-backports "qemu-system-x86=$qemu_utils")
fi
qemu_missing=0
if [[ $(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null) != "install ok installed "* ]]; then
  qemu_missing=1
elif [[ -n $qemu_utils && $(dpkg-query -W -f='${Version}' qemu-system-x86) != "$qemu_utils" ]]; then
  qemu_missing=1
fi

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

if [[ ${#missing[@]} -eq 0 && $qemu_missing == 0 ]]; then
  exit 0
fi
if [[ $check_only == 1 || $(id -u) -ne 0 ]]; then
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "debian-packages: missing: ${missing[*]}" >&2
    echo "debian-packages: as root: apt-get install --no-install-recommends ${missing[*]}" >&2
  fi
  if [[ $qemu_missing == 1 ]]; then
    echo "debian-packages: missing: qemu-system-x86 ${qemu_utils:+at the version of qemu-utils, $qemu_utils}" >&2
    echo "debian-packages: as root: apt-get install --no-install-recommends ${qemu_from[*]:-qemu-system-x86}" >&2
  fi
  echo "debian-packages: the tests that need them will skip and say so" >&2
  exit 0
fi
if [[ $qemu_missing == 1 && ${#qemu_from[@]} -gt 0 ]] &&
  ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "debian-packages: adding bookworm-backports to apt's sources (for qemu-system-x86 $qemu_utils)" >&2
  cat >/etc/apt/sources.list.d/berth-bookworm-backports.sources <<'SOURCES'
# Added by berth's scripts/setup/debian-packages.sh: qemu-system-x86 at the
# version of the backported qemu-utils. Backports are never installed unless
# asked for (apt priority 100).
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi
apt-get update -qq
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "debian-packages: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [[ $qemu_missing == 1 ]]; then
  echo "debian-packages: installing ${qemu_from[*]:-qemu-system-x86}" >&2
  # Its own transaction: -t bookworm-backports then prefers backports only
  # for qemu's own dependencies (qemu-system-common/-data, seabios).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${qemu_from[@]:-qemu-system-x86}" >/dev/null
fi
