#!/bin/sh
# podman's conmon, started in the container's bundle directory (its -b
# argument) rather than in podman's working directory.
#
# Why: conmon 2.1.6 (Debian 12) writes its OOM marker, a file named "oom",
# into its working directory unless podman passes --persist-dir, and podman
# 4.3.1 (Debian 12) passes none and looks for the marker in the bundle
# directory. Without this, a container its memory limit killed exits 137
# with State.OOMKilled = false (seen under cgroup v1 and v2 alike: conmon does
# see the kill, through memory.oom_control's eventfd). With it, OOMKilled is
# true. scripts/images/podman-service.sh names it as containers.conf's
# conmon_path; a podman host can do the same.
prev=""
for arg in "$@"; do
  case $prev in
    -b | --bundle)
      cd "$arg" || exit 1
      break
      ;;
  esac
  prev=$arg
done
for conmon in /usr/bin/conmon /usr/libexec/podman/conmon /usr/local/bin/conmon; do
  [ -x "$conmon" ] && exec "$conmon" "$@"
done
echo "conmon-in-bundle: no conmon found" >&2
exit 127
