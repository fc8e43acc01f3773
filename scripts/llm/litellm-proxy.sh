#!/usr/bin/env bash
# Runs the LiteLLM proxy (the peer of berth's llm-proxy benchmark) in the foreground,
# from the venv `scripts/llm/setup-peers.sh --litellm` creates, offline:
# LITELLM_LOCAL_MODEL_COST_MAP=True keeps it from fetching its cost map.
# The config must set general_settings.master_key (LiteLLM refuses to start without one).
#
# Usage: scripts/llm/litellm-proxy.sh CONFIG.yaml PORT
# Exits 3 when LiteLLM is not installed.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 CONFIG.yaml PORT" >&2
  exit 2
fi
VENV=${BERTH_LLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/llm-venv}
LITELLM=$VENV-litellm/bin/litellm
if [[ ! -x $LITELLM ]]; then
  echo "litellm-proxy: $LITELLM not found; run scripts/llm/setup-peers.sh --litellm" >&2
  exit 3
fi
# exec: the caller's child is LiteLLM itself, so its pid is the one to measure.
LITELLM_LOCAL_MODEL_COST_MAP=True exec "$LITELLM" --config "$1" --host 127.0.0.1 --port "$2"
