#!/usr/bin/env bash
# Runs all of berth's tests, after setting up what they need:
#   1. Debian packages (scripts/setup/debian-packages.sh: installed as root;
#      otherwise listed, and the tests that need them skip saying so), and
#      libvirtd with its qemu driver for the real-VM test
#      (scripts/setup/libvirtd.sh, as root)
#   2. the embedding model and ONNX Runtime (scripts/setup-embedding-model.sh)
#   3. the real LLM peers and clients (scripts/llm/setup-peers.sh: llama.cpp's
#      server, SmolLM2, the openai client, the real grpcurl)
#   4. the workspace's binaries (one debug build), and the container images
#      from them, once per run (docker, and podman where it is installed)
#   5. every test of the workspace, then the agent's container suite again
#      against podman
# and ends with a summary: what was skipped and why (the skip ledger of
# berth_tests::parts), the time taken, and `N passed, N failed, N skipped, N benchmarks not run`.
#
# CI=true (or BERTH_REQUIRE_PEERS=1) turns a missing part into a failure;
# BERTH_ALLOW_MISSING=part,part names the parts a run knowingly goes without.
# Arguments go to every `cargo test`. Safe to run again: set-ups that are done
# are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
log() { echo "test.sh: $*" >&2; }

scripts/setup/debian-packages.sh
scripts/setup/libvirtd.sh
scripts/setup-embedding-model.sh --quiet >/dev/null
scripts/llm/setup-peers.sh --litellm --quiet >/dev/null
setup_done=$(date +%s)

mkdir -p target
export BERTH_SKIP_LEDGER=$PWD/target/berth-skips.tsv
output=$PWD/target/test-output.log
: >"$BERTH_SKIP_LEDGER"
: >"$output"

cargo build --workspace --bins

# The images of the compose tests, from this checkout's debug binaries, once per run.
podman_conf=$(mktemp /tmp/berth-test-containers.XXXXXX.conf)
trap 'rm -f "$podman_conf"' EXIT
printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n' >"$podman_conf"
if docker info >/dev/null 2>&1; then
  # From the binaries just built: a release build of the workspace would
  # double the suite's compile time (12 of 26 minutes on 2 cores). berth-postgres is made of
  # the installed postgresql-15; without it the postgres profile's test skips (fails on CI).
  scripts/deploy/build-images.sh --profile debug --no-cargo --monitoring \
    $([[ -x /usr/lib/postgresql/15/bin/postgres ]] && echo --postgres)
  if command -v podman >/dev/null; then
    CONTAINERS_CONF=$podman_conf scripts/deploy/build-images.sh --engine podman --profile debug --no-cargo
  fi
else
  log "the Docker Engine does not answer: no images built (the compose tests will say so)"
fi

status=0
skipped_suites=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee -a "$output" || status=$?

# The agent's container suite again, against podman behind its Docker-compatible
# socket (the workspace run above used the Docker Engine).
if ! command -v podman >/dev/null; then
  printf 'agent_containers (podman run)\tpodman\tpodman is not installed\n' >>"$BERTH_SKIP_LEDGER"
  skipped_suites=1
  if [[ ${CI:-} == true || ${BERTH_REQUIRE_PEERS:-} == 1 ]]; then status=1; fi
elif socket=$(scripts/images/podman-service.sh /tmp/berth-podman-tests); then
  BERTH_TEST_ENGINE=podman BERTH_TEST_ENGINE_SOCKET="$socket" \
    cargo test -p berth-tests --test agent_containers "$@" 2>&1 | tee -a "$output" || status=$?
  kill "$(cat /tmp/berth-podman-tests/pid)" 2>/dev/null || true
else
  log "podman's API service did not start (see /tmp/berth-podman-tests/service.log)"
  status=1
fi

# Summary: libtest counts a skipped test as passed; the ledger knows better.
read -r passed failed ignored < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i
    }
  } END { print p + 0, f + 0, g + 0 }' "$output")
skipped=$(wc -l <"$BERTH_SKIP_LEDGER")
echo
echo "== summary =="
if [[ $skipped -gt 0 ]]; then
  echo "skipped (test, part, why; $BERTH_SKIP_LEDGER):"
  sed 's/^/  /' "$BERTH_SKIP_LEDGER"
fi
if [[ $failed -gt 0 ]]; then
  echo "failed:"
  grep -E '^test .* FAILED$' "$output" | sed 's/^/  /' | sort -u || true
fi
finished=$(date +%s)
echo "set-up $((setup_done - started)) s, build and tests $((finished - setup_done)) s"
# An ignored test is a benchmark (`#[ignore = "a benchmark: …"]`), run on
# demand with --ignored: not a part gone missing, so not counted as skipped.
echo "$((passed - skipped + skipped_suites)) passed, $failed failed, $skipped skipped, $ignored benchmarks not run (--ignored)"
exit $status
