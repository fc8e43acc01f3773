#!/usr/bin/env bash
# Installs berth's host services: binaries, systemd units, default configs, the berth user.
# Safe to run twice: binaries and units are replaced (atomically), configs and env files you
# may have edited are never overwritten (a changed default is written beside them as *.new).
#
# Usage: deploy/install.sh [--root DIR] [--bin-dir DIR] [--services "agent power-sampler …"]
#                          [--build] [--enable] [--start]
#   --root DIR     install under DIR instead of / (DESTDIR; for packaging and tests). Nothing
#                  outside DIR is touched: no user is created, systemctl is not called.
#   --bin-dir DIR  where the built binaries are (default: $CARGO_TARGET_DIR/release or target/release)
#   --services     which host services (default: agent power-sampler embedding llm-proxy;
#                  orchestrator is available too)
#   --build        run `cargo build --release --locked` for those binaries first
#   --enable       systemctl enable the units (only with --root /)
#   --start        systemctl restart the units (only with --root /; implies daemon-reload)
# Layout: /usr/local/bin/berth-*, /usr/local/bin/berth (CLI, when built), /etc/berth/*.toml,
#   /etc/berth/*.env (0600), /etc/systemd/system/berth-*.service, /usr/lib/sysusers.d/berth.conf,
#   /usr/lib/tmpfiles.d/berth.conf, /usr/local/share/doc/berth/operations.md
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
ROOT=/
BIN_DIR=""
SERVICES="agent power-sampler embedding llm-proxy"
BUILD=0 ENABLE=0 START=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --root) ROOT=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --services) SERVICES=$2; shift 2 ;;
    --build) BUILD=1; shift ;;
    --enable) ENABLE=1; shift ;;
    --start) START=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
ROOT=${ROOT%/}
[[ -z $ROOT ]] || mkdir -p "$ROOT"
[[ -z $ROOT || -d $ROOT ]] || { echo "install: --root $ROOT is not a directory" >&2; exit 2; }
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$REPO/target}/release}
log() { echo "install: $*" >&2; }

binary_of() { case $1 in agent) echo berth-agent ;; *) echo "berth-$1" ;; esac; }
package_of() { case $1 in agent) echo berth-container-agent ;; *) echo "berth-$1" ;; esac; }
for svc in $SERVICES; do
  case $svc in agent|power-sampler|embedding|llm-proxy|orchestrator) ;;
    *) log "unknown service $svc (agent, power-sampler, embedding, llm-proxy, orchestrator)"; exit 2 ;;
  esac
done

if [[ $BUILD == 1 ]]; then
  pkgs=(-p berth-cli)
  for svc in $SERVICES; do pkgs+=(-p "$(package_of "$svc")"); done
  (cd "$REPO" && cargo build --release --locked "${pkgs[@]}" --bins)
fi

# install_file MODE SRC DEST: replaces DEST atomically (a running binary keeps its old inode).
install_file() {
  local mode=$1 src=$2 dest=$ROOT$3
  mkdir -p "$(dirname "$dest")"
  if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
    chmod "$mode" "$dest"; return 0
  fi
  install -m "$mode" "$src" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
  log "installed $3"
}
# install_config MODE SRC DEST: never overwrites an existing (maybe edited) file.
install_config() {
  local mode=$1 src=$2 dest=$ROOT$3
  mkdir -p "$(dirname "$dest")"
  if [[ ! -e $dest ]]; then
    install -m "$mode" "$src" "$dest"; log "installed $3"
  elif ! cmp -s "$src" "$dest"; then
    install -m "$mode" "$src" "$dest.new"; log "kept your $3; the new default is $3.new"
  fi
}

for svc in $SERVICES; do
  bin=$(binary_of "$svc")
  [[ -x $BIN_DIR/$bin ]] || { log "$BIN_DIR/$bin is not built: run with --build, or cargo build --release -p $(package_of "$svc")"; exit 1; }
done

for svc in $SERVICES; do
  bin=$(binary_of "$svc")
  install_file 0755 "$BIN_DIR/$bin" "/usr/local/bin/$bin"
  install_file 0644 "$REPO/deploy/systemd/berth-$svc.service" "/etc/systemd/system/berth-$svc.service"
  install_config 0644 "$REPO/deploy/config/$svc.toml" "/etc/berth/$svc.toml"
done
[[ -x $BIN_DIR/berth ]] && install_file 0755 "$BIN_DIR/berth" /usr/local/bin/berth

tmp_env=$(mktemp); trap 'rm -f "$tmp_env"' EXIT
if [[ " $SERVICES " == *" llm-proxy "* ]]; then
  install_config 0644 "$REPO/deploy/config/litellm_config.yaml" /etc/berth/litellm_config.yaml
  cat > "$tmp_env" <<'ENV'
# Secrets of berth-llm-proxy (mode 0600, read by systemd as root). Set the master key.
#LITELLM_MASTER_KEY=sk-change-me
OLLAMA_API_BASE=http://127.0.0.1:11434
ENV
  install_config 0600 "$tmp_env" /etc/berth/llm-proxy.env
fi
if [[ " $SERVICES " == *" agent "* ]]; then
  printf '# Secrets of berth-agent (mode 0600): BERTH_AGENT__TOKEN=… for a TCP listener.\n' > "$tmp_env"
  install_config 0600 "$tmp_env" /etc/berth/agent.env
fi
install_file 0644 "$REPO/deploy/systemd/berth.sysusers" /usr/lib/sysusers.d/berth.conf
install_file 0644 "$REPO/deploy/systemd/berth.tmpfiles" /usr/lib/tmpfiles.d/berth.conf
install_file 0644 "$REPO/docs/operations.md" /usr/local/share/doc/berth/operations.md

if [[ -n $ROOT ]]; then
  log "installed under $ROOT: no user created, systemctl not called"
  exit 0
fi

# The berth user: systemd-sysusers where it exists, else useradd.
if ! getent passwd berth >/dev/null; then
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers /usr/lib/sysusers.d/berth.conf
  else
    useradd --system --home-dir /var/lib/berth --no-create-home --shell /usr/sbin/nologin berth
  fi
  log "created user berth"
fi
install -d -o berth -g berth -m 0750 /var/lib/berth
command -v systemd-tmpfiles >/dev/null && systemd-tmpfiles --create /usr/lib/tmpfiles.d/berth.conf 2>/dev/null || true

if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  units=(); for svc in $SERVICES; do units+=("berth-$svc.service"); done
  [[ $ENABLE == 1 ]] && systemctl enable "${units[@]}"
  [[ $START == 1 ]] && systemctl restart "${units[@]}"
  log "units: ${units[*]} (systemctl status ${units[0]})"
else
  log "systemd is not running here: units installed, not reloaded"
fi
