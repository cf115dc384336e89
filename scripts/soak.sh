#!/usr/bin/env bash
# The soak (docs/faults.md, "Soak"): the tiny preset trained from shards in SeaweedFS through injected S3 faults,
# killed with SIGKILL at seeded moments and restarted on changing world sizes, then checked for lost or repeated
# examples, partial checkpoints and retention. The work is scripts/soak.py; `scripts/soak.sh --help` for flags.
# Exit 0: every check passed; 1: one failed (the table says which); 2: bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
exec "${VENV:-.venv}/bin/python" scripts/soak.py "$@"
