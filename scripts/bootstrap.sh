#!/usr/bin/env bash
# Idempotent set-up used by `make demo` and `make test`: a venv in .venv with torch (CPU build) installed
# FIRST, then the package with its test extras. Re-running is a no-op unless pyproject.toml or
# requirements/constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# CPU wheel by default; GPU users: TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"electra-scale needs Python >= 3.11, found {sys.version.split()[0]}; set PYTHON=python3.11")
PY

# DeepSpeed compiles its CPU ops on first use. Every CPU run loads the shared-memory collectives
# (deepspeed_shm_comm, a minute or two of g++ on 2 cores): build them here, once, not inside the first run.
build_cpu_ops() {
  local ext=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
  [ "${DS_ACCELERATOR:-cpu}" = cpu ] || return 0
  [ -f "$ext/deepspeed_shm_comm/deepspeed_shm_comm.so" ] && return 0
  echo "bootstrap: building DeepSpeed's CPU collectives into $ext" >&2
  DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$ext" "$VENV/bin/python" -c \
    "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)"
}

stamp_input=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)
stamp="$VENV/.electra-scale-$stamp_input"
if [ -f "$stamp" ]; then
  build_cpu_ops
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
# torch first, pinned: an unpinned torch pulled in by another package resolves to a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_SPEC" >&2
  if [ -n "${TORCH_INDEX:-}" ]; then
    "${PIP[@]}" install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    "${PIP[@]}" install --quiet "$TORCH_SPEC"
  fi
fi
echo "bootstrap: installing electra-scale and its test tools" >&2
"${PIP[@]}" install --quiet -c requirements/constraints.txt -e ".[test]"
rm -f "$VENV"/.electra-scale-*
touch "$stamp"
build_cpu_ops
