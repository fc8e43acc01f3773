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
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?

# The agent's container suite again, against podman behind its Docker-compatible
# socket (the workspace run above used the Docker Engine).
if ! command -v podman >/dev/null; then
  echo "test.sh: SKIP the podman run of agent_containers: podman is not installed (apt-get install podman runc)"
elif socket=$(scripts/images/podman-service.sh /tmp/berth-podman-tests); then
  BERTH_TEST_ENGINE=podman BERTH_TEST_ENGINE_SOCKET="$socket" \
    cargo test -p berth-tests --test agent_containers "$@" || status=$?
  kill "$(cat /tmp/berth-podman-tests/pid)" 2>/dev/null || true
else
  echo "test.sh: SKIP the podman run of agent_containers: podman's API service did not start (see /tmp/berth-podman-tests/service.log)"
fi
exit $status
