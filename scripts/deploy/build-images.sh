#!/usr/bin/env bash
# Builds berth's container images with the engine on this machine, pulling nothing.
#
# 1. cargo builds the five service binaries in one release build, dynamically linked: the
#    embedding service, the power sampler and the agent dlopen ONNX Runtime / NVML / libvirt,
#    which a static glibc binary cannot do reliably (see docs/operations.md), and one build of
#    the workspace is half the time of a static and a dynamic one
# 2. a build context is staged in a temp dir: the binaries, busybox (from Debian's busybox-static,
#    for the agent's host commands and, with --shell, for podman-compose's health checks), the glibc
#    libraries of this machine the binaries link, CA certificates, passwd/group, configs
# 3. one image per service from deploy/images/<service>.Containerfile, every one `FROM scratch`
#    (or FROM the locally built busybox image with --shell): nothing is pulled, ever.
#
# Usage: scripts/deploy/build-images.sh [--engine docker|podman] [--tag TAG] [--shell] [--no-cargo]
#                                       [--profile release|debug] [--monitoring] [--postgres]
#   --engine   docker (default, classic builder: DOCKER_BUILDKIT=0) or podman
#   --tag      image tag (default: the workspace version); `latest` is tagged too
#   --shell    put busybox (/bin/sh) in every image: podman-compose 1.0.x runs health checks
#              through /bin/sh -c. Default: only the agent has busybox. Default on with podman.
#   --no-cargo use the binaries already built in $CARGO_TARGET_DIR (CI caches)
#   --profile  release (default: what people deploy) or debug (the binaries of
#              `cargo build --workspace --bins`: scripts/test.sh's images, which saves the
#              suite a second, optimised build of the workspace)
#   --monitoring also localhost/berth-prometheus (deploy/compose.monitoring.yaml): Debian's
#              prometheus binary (the installed package's, else `apt-get download prometheus`)
#              with deploy/monitoring/'s scrape config and rules
#   --postgres also localhost/berth-postgres (deploy/compose.postgres.yaml): Debian's PostgreSQL 15
#              as installed here (apt-get install postgresql-15): its server and client binaries,
#              modules (not llvmjit: no JIT), share files, the time zones and the libraries ldd
#              names; deploy/images/postgres-entrypoint.sh creates the cluster on first start
# Env: CARGO_TARGET_DIR (default <repo>/target), BUSYBOX (path of a static busybox; default
#   /bin/busybox, else `apt-get download busybox-static`), BERTH_IMAGE_PREFIX (default localhost/berth-).
# Needs: cargo, docker or podman, busybox-static (or apt access to download it), ca-certificates;
#   postgresql-15 for --postgres.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
ENGINE=docker
TAG=""
SHELL_IN_ALL=""
CARGO=1
PROFILE=release
MONITORING=""
POSTGRES=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --engine) ENGINE=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --shell) SHELL_IN_ALL=1; shift ;;
    --no-cargo) CARGO=0; shift ;;
    --profile) PROFILE=$2; shift 2 ;;
    --monitoring) MONITORING=1; shift ;;
    --postgres) POSTGRES=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-images: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case $PROFILE in
  release) CARGO_PROFILE=(--release); PROFILE_DIR=release ;;
  debug) CARGO_PROFILE=(); PROFILE_DIR=debug ;;
  *) echo "build-images: --profile must be release or debug, not $PROFILE" >&2; exit 2 ;;
esac
case $ENGINE in
  docker) export DOCKER_BUILDKIT=0 ;;
  podman) SHELL_IN_ALL=${SHELL_IN_ALL:-1} ;;
  *) echo "build-images: --engine must be docker or podman, not $ENGINE" >&2; exit 2 ;;
esac
command -v "$ENGINE" >/dev/null || { echo "build-images: $ENGINE is not installed" >&2; exit 1; }
if [[ -z $TAG ]]; then
  TAG=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
fi
PREFIX=${BERTH_IMAGE_PREFIX:-localhost/berth-}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BINS=(berth-orchestrator berth-agent berth-llm-proxy berth-embedding berth-power-sampler)
log() { echo "build-images: $*" >&2; }
t0=$(date +%s)

if [[ $CARGO == 1 ]]; then
  log "cargo: $PROFILE binaries (${BINS[*]})"
  (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build "${CARGO_PROFILE[@]}" --locked -p berth-orchestrator \
    -p berth-container-agent -p berth-llm-proxy -p berth-embedding -p berth-power-sampler --bins)
fi
t1=$(date +%s)

CTX=$(mktemp -d /tmp/berth-image-context.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX"/{bin,etc,glibc,empty,tmp,config,certs}
chmod 1777 "$CTX/tmp"
chmod 0755 "$CTX/empty"
for b in "${BINS[@]}"; do
  src=$TARGET_DIR/$PROFILE_DIR/$b
  [[ -x $src ]] || { log "$src is missing (run without --no-cargo)"; exit 1; }
  cp "$src" "$CTX/bin/"
done
strip "$CTX"/bin/* 2>/dev/null || true

# The glibc the dynamic binaries were linked against, and what ONNX Runtime and NVML need
# (libstdc++, libgcc_s, libm, libdl, librt, libpthread): copied from this machine.
copy_lib() {
  local path=$1 real
  real=$(readlink -f "$path")
  mkdir -p "$CTX/glibc$(dirname "$path")"
  cp "$real" "$CTX/glibc$path"
}
libs=$( { for b in "${BINS[@]}"; do ldd "$CTX/bin/$b"; done; } | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | sort -u)
for name in libstdc++.so.6 libgcc_s.so.1 libm.so.6 libdl.so.2 librt.so.1 libpthread.so.0; do
  # awk reads to the end: exiting early would kill ldconfig with SIGPIPE, which pipefail turns
  # into a silent exit of this script whenever ldconfig had not written everything yet.
  p=$(ldconfig -p | awk -v n="$name" '$1 == n && /x86-64/ && !found {print $NF; found = 1}')
  [[ -n $p ]] || { log "library $name not found on this machine (install libstdc++6)"; exit 1; }
  libs+=$'\n'$p
done
# Debian's prometheus (a Go binary linking only libc): the installed one, else the package's.
if [[ -n $MONITORING ]]; then
  mkdir -p "$CTX/prometheus" "$CTX/monitoring"
  if [[ -x /usr/bin/prometheus ]]; then
    cp /usr/bin/prometheus "$CTX/prometheus/prometheus"
  else
    log "no /usr/bin/prometheus: downloading Debian's prometheus"
    (cd "$CTX" && apt-get download prometheus >/dev/null && dpkg-deb -x prometheus_*.deb pm \
      && mv pm/usr/bin/prometheus prometheus/prometheus && rm -rf pm prometheus_*.deb)
  fi
  cp "$REPO"/deploy/monitoring/prometheus.yml "$REPO"/deploy/monitoring/rules.yml "$CTX/monitoring/"
  libs+=$'\n'$(ldd "$CTX/prometheus/prometheus" | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}')
fi
for lib in $(echo "$libs" | sort -u); do copy_lib "$lib"; done
# The loader where the binaries look for it.
[[ -e $CTX/glibc/lib64/ld-linux-x86-64.so.2 ]] || copy_lib /lib64/ld-linux-x86-64.so.2
# Debian's PostgreSQL 15 at the paths it was built for (it finds its modules and share files
# relative to its binaries, the time zones at /usr/share/zoneinfo). Its libraries (ICU alone is
# 30 MB) go into postgres/root, not glibc/, which every image copies.
if [[ -n $POSTGRES ]]; then
  PG=/usr/lib/postgresql/15
  [[ -x $PG/bin/postgres && -d /usr/share/postgresql/15 ]] \
    || { log "$PG/bin/postgres is missing (apt-get install postgresql-15)"; exit 1; }
  PGROOT=$CTX/postgres/root
  mkdir -p "$PGROOT$PG/bin" "$PGROOT$PG/lib" "$PGROOT/usr/share/postgresql" "$PGROOT/usr/local/bin" "$PGROOT/etc"
  # psql, pg_dump and pg_restore for `docker-compose exec postgres …` (backups, a look inside).
  for b in postgres initdb pg_isready pg_ctl psql pg_dump pg_dumpall pg_restore; do
    cp "$PG/bin/$b" "$PGROOT$PG/bin/"
  done
  # Every module but llvmjit, whose libLLVM is 100 MB; the server runs with jit=off.
  find "$PG/lib" -maxdepth 1 -name '*.so' ! -name 'llvmjit*' -exec cp {} "$PGROOT$PG/lib/" \;
  cp -a /usr/share/postgresql/15 "$PGROOT/usr/share/postgresql/"
  rm -rf "$PGROOT/usr/share/postgresql/15/man"
  cp -a /usr/share/zoneinfo "$PGROOT/usr/share/"
  rm -f "$PGROOT/usr/share/zoneinfo/localtime"
  strip "$PGROOT$PG"/bin/* "$PGROOT$PG"/lib/*.so 2>/dev/null || true
  install -m 0755 "$REPO/deploy/images/postgres-entrypoint.sh" "$PGROOT/usr/local/bin/berth-postgres-entrypoint"
  pglibs=$( { for f in "$PGROOT$PG"/bin/* "$PGROOT$PG"/lib/*.so; do ldd "$f"; done; } \
    | awk '/=> \//{print $3} /^\t\/.*ld-linux/{print $1}' | sort -u)
  for lib in $pglibs; do
    [[ -e $CTX/glibc$lib ]] && continue
    mkdir -p "$PGROOT$(dirname "$lib")"
    cp "$(readlink -f "$lib")" "$PGROOT$lib"
  done
fi

# busybox: a static binary from Debian's busybox-static.
BUSYBOX=${BUSYBOX:-/bin/busybox}
if ! [[ -x $BUSYBOX ]] || ldd "$BUSYBOX" 2>&1 | grep -q '=>'; then
  log "no static busybox at $BUSYBOX: downloading Debian's busybox-static"
  (cd "$CTX" && apt-get download busybox-static >/dev/null && dpkg-deb -x busybox-static_*.deb bb && rm busybox-static_*.deb)
  BUSYBOX=$CTX/bb/bin/busybox
fi
cp "$BUSYBOX" "$CTX/busybox"
rm -rf "$CTX/bb"

cat > "$CTX/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
berth:x:10001:10001:berth:/var/lib/berth:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
PASSWD
cat > "$CTX/etc/group" <<'GROUP'
root:x:0:
berth:x:10001:
nogroup:x:65534:
GROUP
echo "hosts: files dns" > "$CTX/etc/nsswitch.conf"
if [[ -n $POSTGRES ]]; then
  # initdb and the server look their user up by uid: the others' passwd and postgres (10002).
  { cat "$CTX/etc/passwd"; echo 'postgres:x:10002:10002:PostgreSQL:/var/lib/postgresql:/sbin/nologin'; } > "$PGROOT/etc/passwd"
  { cat "$CTX/etc/group"; echo 'postgres:x:10002:'; } > "$PGROOT/etc/group"
fi
cp "$REPO"/deploy/config/*.toml "$REPO"/deploy/config/*.yaml "$CTX/config/"
cp "$REPO/examples/power/llm-inference.csv" "$CTX/config/"
CA=/etc/ssl/certs/ca-certificates.crt
[[ -s $CA ]] || { log "$CA is missing (install ca-certificates)"; exit 1; }
cp "$CA" "$CTX/certs/ca-certificates.crt"

BASE=scratch
if [[ -n $SHELL_IN_ALL ]]; then
  BASE=${PREFIX}busybox:$TAG
fi
ENGINE_ARGS=()
# podman's default OCI format drops HEALTHCHECK; the docker format keeps it.
[[ $ENGINE == podman ]] && ENGINE_ARGS+=(--format docker)
build() {
  local name=$1; shift
  log "image ${PREFIX}$name:$TAG"
  "$ENGINE" build --pull=false -q "${ENGINE_ARGS[@]}" -f "$REPO/deploy/images/$name.Containerfile" \
    -t "${PREFIX}$name:$TAG" -t "${PREFIX}$name:latest" --label "org.opencontainers.image.version=$TAG" --label io.berth.image=true \
    "$@" "$CTX" 2> >(grep -v -e 'legacy builder is deprecated' -e 'BuildKit is currently disabled' \
                         -e 'environment-variable\.$' -e '^$' >&2) >/dev/null
}
build busybox
for svc in orchestrator agent power-sampler embedding llm-proxy; do
  build "$svc" --build-arg "BASE=$BASE" --build-arg "BUSYBOX_IMAGE=${PREFIX}busybox:$TAG"
done
if [[ -n $POSTGRES ]]; then
  build postgres --build-arg "BUSYBOX_IMAGE=${PREFIX}busybox:$TAG"
fi
if [[ -n $MONITORING ]]; then
  build prometheus --build-arg "BUSYBOX_IMAGE=${PREFIX}busybox:$TAG"
fi
# Earlier builds of these tags, now untagged (only ours: by label).
"$ENGINE" image prune -f --filter label=io.berth.image=true >/dev/null 2>&1 || true
t2=$(date +%s)
"$ENGINE" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep "^${PREFIX}.*:$TAG " >&2 || true
log "done: cargo $((t1 - t0)) s, images $((t2 - t1)) s (tag $TAG, engine $ENGINE)"
