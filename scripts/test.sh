#!/usr/bin/env bash
# Runs all of berth's tests. Sets up, when missing, what they need: the
# embedding model and ONNX Runtime (scripts/setup-embedding-model.sh) and the
# real LLM peers (scripts/llm/setup-peers.sh: llama.cpp's server, SmolLM2, the
# openai client). Then builds the binaries the end-to-end tests start and runs
# the workspace's tests. Safe to run again: setups are skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/setup-embedding-model.sh ]; then
  scripts/setup-embedding-model.sh
fi
scripts/llm/setup-peers.sh

cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
