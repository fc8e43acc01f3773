#!/usr/bin/env bash
# Starts libvirt's system daemon with its qemu driver for the VM tests, when
# it is installed and not answering yet (scripts/setup/debian-packages.sh
# installs it). Needs root; without it, says so and exits 0 (the VM tests
# then skip, or fail under CI=true).
#
#   scripts/setup/libvirtd.sh
#
# - /dev/kvm gets what udev would give it (root:kvm 0660, Debian's
#   qemu-system-common rule): without udev it stays root-only and qemu,
#   which libvirt runs as libvirt-qemu, cannot open it.
# - libvirt's `default` network is started (it needs dnsmasq).
# - Under systemd the units are started; elsewhere (containers, sandboxes
#   whose PID 1 is not systemd) virtlogd and libvirtd run as daemons.
set -euo pipefail
log() { echo "libvirtd: $*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  log "not root: not starting libvirtd (the VM tests need qemu:///system)"
  exit 0
fi
if ! command -v libvirtd >/dev/null; then
  log "libvirtd is not installed (Debian: libvirt-daemon-system)"
  exit 0
fi

if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || log "cannot give /dev/kvm to group kvm"
fi

answers() { virsh -c qemu:///system -q version >/dev/null 2>&1; }
# libvirt's NAT network `default` (virbr0, dnsmasq for DHCP): the real-VM
# test's guest asks it for an address, which the agent reports.
default_network() {
  local info
  info=$(virsh -c qemu:///system -q net-info default 2>/dev/null || true)
  [[ $info =~ Active:\ +yes ]] && return 0
  command -v dnsmasq >/dev/null || { log "no dnsmasq (Debian: dnsmasq-base): libvirt's default network cannot start"; return 0; }
  virsh -c qemu:///system -q net-start default >/dev/null || log "libvirt's default network did not start"
}
if ! answers; then
  if [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]]; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  for _ in $(seq 1 100); do
    answers && break
    sleep 0.1
  done
  answers || { log "libvirtd did not answer on qemu:///system within 10 s"; exit 1; }
fi
default_network
