#!/usr/bin/env bash
# Starts podman's Docker-compatible API service on a socket of its own, with
# its own storage, for the agent's podman tests:
#
#   scripts/images/podman-service.sh [DIR]    (default /tmp/berth-podman)
#   BERTH_TEST_ENGINE=podman BERTH_TEST_ENGINE_SOCKET=DIR/podman.sock \
#     cargo test -p berth-tests --test agent_containers
#
# Settings found necessary in a sandbox without systemd (Debian 12, podman
# 4.3.1, cgroup v1/hybrid): cgroupfs manager, file events logger, runc (crun
# 1.8 refuses hybrid cgroups), default ulimits no higher than the service's
# own hard limits (podman's defaults need CAP_SYS_RESOURCE), and conmon run
# in the container's bundle directory (conmon-in-bundle.sh: else podman never
# finds conmon's OOM marker and State.OOMKilled stays false).
set -euo pipefail
dir="${1:-/tmp/berth-podman}"
mkdir -p "$dir"
command -v podman >/dev/null || { echo "podman is not installed (apt-get install podman runc)" >&2; exit 1; }
# podman lowers its own nproc to 32768 at most; the container's may not exceed it.
nofile="$(ulimit -Hn | sed 's/unlimited/1048576/')"
nproc="$(ulimit -Hu | sed 's/unlimited/32768/')"
((nproc > 32768)) && nproc=32768
previous_conf="$(cat "$dir/containers.conf" 2>/dev/null || true)"
cat >"$dir/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
conmon_path = ["$(cd "$(dirname "$0")" && pwd)/conmon-in-bundle.sh"]
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
if [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
  echo "podman-service: already running: $dir/podman.sock" >&2
  if [[ "$previous_conf" != "$(cat "$dir/containers.conf")" ]]; then
    echo "podman-service: it runs with an older $dir/containers.conf; restart it (kill $(cat "$dir/pid"))" >&2
  fi
  echo "$dir/podman.sock"
  exit 0
fi
CONTAINERS_CONF="$dir/containers.conf" nohup podman --root "$dir/root" --runroot "$dir/run" \
  system service --time=0 "unix://$dir/podman.sock" >"$dir/service.log" 2>&1 &
echo $! >"$dir/pid"
for _ in $(seq 50); do
  [[ -S "$dir/podman.sock" ]] && { echo "$dir/podman.sock"; exit 0; }
  sleep 0.1
done
echo "podman service did not come up; see $dir/service.log" >&2
exit 1
