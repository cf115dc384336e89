#!/usr/bin/env bash
# Flake hunt: test files run again and again while stress-ng keeps the cores busy, so that a count, timeout or
# sleep that assumes an idle machine shows itself. One line per run; exit 1 if any run failed.
#
#   scripts/flake_hunt.sh [--runs N] [--load K] [TEST_FILE ...]
#
# Defaults: 10 runs, stress-ng --cpu 2, and the fault, resilience and SLURM tests (three test files at a time).
# Each run's pytest output is kept in $FLAKE_LOGS (default /tmp/flake-hunt). Needs stress-ng (a Debian package)
# and, for the SLURM tests, the services that `make test` installs.
set -uo pipefail
cd "$(dirname "$0")/.."

runs=10
load=2
files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --load) load=$2; shift 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
[ ${#files[@]} -gt 0 ] || files=(tests/test_faults.py tests/test_resilience.py tests/test_slurm.py tests/test_slurm_requeue.py)
command -v stress-ng > /dev/null || { echo "flake_hunt: stress-ng is not installed (apt-get install -y stress-ng)" >&2; exit 2; }

logs=${FLAKE_LOGS:-/tmp/flake-hunt}
mkdir -p "$logs"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
[ "$load" -gt 0 ] && { stress-ng --cpu "$load" --timeout 0 --quiet & stress=$!; trap 'kill $stress' EXIT; }

failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider -n "${#files[@]}" --dist loadfile "${files[@]}" > "$logs/run_$i.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  echo "run $i/$runs: rc=$rc, $(tail -1 "$logs/run_$i.log") ($(( $(date +%s) - start )) s, stress-ng --cpu $load)"
done
exit $failed
