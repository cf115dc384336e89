#!/usr/bin/env bash
# Prove the GPU path and take its figures in one short run (a GPU machine may be lent for a few minutes only).
#
#   scripts/gpu_check.sh --out DIR [--wheels DIR]     on a machine with a CUDA GPU (GPU_CHECK_BUDGET_S, 480 s)
#   scripts/gpu_check.sh --out DIR --dry-run           the same orchestration on the CPU, tiny shapes (CI runs it)
#   make gpu-check OUT=DIR WHEELS=DIR
#
# One budget (GPU_CHECK_BUDGET_S, default 480 s: one 10-minute command with room to spare) and a time limit per
# step. Steps run in the order of what decides most, so that a cut at any moment leaves the most valuable figures
# already written, and none starts once less than 20 s is left. summary.json and summary.md are rewritten after
# every step; the rows, test outcomes and bench paths inside a step are written as each finishes (docs/gpu.md has
# the plan against the budget):
#   1. the environment (GPU, driver, torch, CUDA, the packages' versions) -> env.json; DeepSpeed's FusedAdam
#      starts building in the background (steps 2-5 do not need it: they train with torch's fused AdamW)
#   2. gpu-varlen: pytest -m gpu, the padding-free (FlashAttention varlen, custom op) and compiled-layer tests
#      against the padded eager step -> pytest-varlen.jsonl (a line per test as it finishes)
#   3. ablation-large: ELECTRA-Large on short documents (78% padding), the real pretrain path per row: padding-
#      free eager, padding-free + compile, padded, then padding-free + compile at equal real tokens (4x the
#      examples) -> ablation-large.jsonl, a row appended as each finishes
#   4. bench-large-unpad-compile: Large's bare loop against `pretrain`, both padding-free + compiled at the equal-
#      real-tokens micro-batch, the same optimizer (torch's fused AdamW) -> bench-large-unpad-compile.json,
#      rewritten as each path finishes: the engine's overhead (pretrain / bare) and Large's MFU
#   5. ablation-small: Small, one lever at a time: train.unpad, train.compile, ZeRO-2/1/0 -> ablation-small.jsonl
#   6. gpu-rest: the other GPU tests (NCCL + the gloo side group, a bf16 step with FusedAdam, NaN-free sampling,
#      exact resume with the device's RNG, export) -> pytest-rest.jsonl
#   7. a 100-step pretrain of Small from local shards, stopped at 50 and resumed -> pretrain-metrics.jsonl
#   8. bench of Small and Base (the largest micro-batch that fits) and padded Large (the micro-batch the device's
#      memory allows), bf16, ZeRO-2 (bare loop, engine, pretrain), then ZeRO-0 (bare loop, engine)
#   9. where a step's time goes, padded and padding-free (scripts/step_profile.py), and ELECTRA's cost per token
#      over MLM's (scripts/objective_cost.py) -> profile-*.json, objective_cost.log
# A step's time limit sends SIGTERM to its command alone (timeout --foreground): bench and pretrain stop after
# the step in progress and mark the row or path cut; GRACE s later (30; the dry run 120) the command's whole
# process group is killed.
# --out: an earlier run's files there are moved to OUT/previous-<time>/ first, so that no figure of it mixes in.
# --wheels DIR: every wheel there is installed (over the image's versions) into a fixed directory under the cache,
# so that a rerun reuses it and DeepSpeed's JIT-built ops; without it, the packages must already satisfy
# pyproject.toml's ranges. docs/gpu.md ("The GPU check") says how to build that directory.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT="" WHEELS="" DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT=${2:-}; shift 2 ;;
    --wheels) WHEELS=${2:-}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 --out DIR [--wheels DIR] [--dry-run]" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu_check: --out DIR is required" >&2; exit 2; }
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || { echo "gpu_check: --wheels $WHEELS: no such directory" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/electra-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/tmp"
export TMPDIR=$WORK/tmp  # bench's scratch (shards, runs) inside the work dir: removed with it, even when killed
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}  # the dry run sets its own (the CPU is slower)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Kept between runs on the same machine: JIT-built ops (FusedAdam) and the wheels' install. HOME may be unset
# (a bare container): /tmp then.
CACHE=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/electra-scale
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CACHE/torch_extensions}

# ---------------------------------------------------------------------------------------------- the output dir
# A reused --out: the earlier run's files (rows appended to, bench JSON picked up by the summary) are moved
# aside first. The dry run plants such a run when its --out is empty, so that this path runs in CI too.
if [ "$DRY" = 1 ] && [ -z "$(ls -A "$OUT")" ]; then
    echo '{"lever": "train.unpad", "value": "false", "micro_batch_size": 999, "step_time_s": 1.0}' \
        >"$OUT/ablation-large.jsonl"
    echo '{"micro_batch_size": 999, "seq_len": 1, "peak_tflops": 1, "results": {}}' >"$OUT/bench-large-zero2.json"
fi
MOVED=""
earlier=$(ls -A "$OUT" | grep -v '^previous-' || true)
if [ -n "$earlier" ]; then
    MOVED=previous-$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$OUT/$MOVED"
    for f in $earlier; do mv "$OUT/$f" "$OUT/$MOVED/"; done
fi
: >"$OUT/steps.jsonl"
: >"$OUT/steps.log"
log() { echo "gpu_check [$(($(date +%s) - START))s] $*" | tee -a "$OUT/steps.log"; }
note() {  # note NAME STATUS TEXT: a line of the summary's step table that is no timed step
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "status": int(sys.argv[2]) \
if sys.argv[2].lstrip("-").isdigit() else sys.argv[2], "note": sys.argv[3]}))' "$@" >>"$OUT/steps.jsonl"
    log "$1: $3"
}
[ -z "$MOVED" ] || note out-dir 0 "an earlier run's $(echo "$earlier" | wc -l) files moved to $MOVED/"
left() { echo $((BUDGET - ($(date +%s) - START))); }
summary() { "$PY" scripts/gpu_summary.py "$OUT" >/dev/null 2>&1 || true; }

# step NAME LIMIT CMD...: run it with a time limit, unless the budget is spent; record its exit status. The limit's
# SIGTERM goes to the command alone (--foreground), as a preemption's would: bench and pretrain stop after their
# step in progress, mark it cut and write what they have. Then its whole process group goes (data loader workers,
# pytest's children): the command runs in a session of its own. STEP_TERM_FILE and STEP_TERM_TEXT (the dry run):
# SIGTERM 2 s after that file holds that text, the same signal the limit sends, at a moment the dry run chooses.
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$(left)" -lt 20 ]; then
        log "$name: not run (budget spent)"
        echo "{\"step\": \"$name\", \"status\": \"not run\"}" >>"$OUT/steps.jsonl"
        return 0
    fi
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    log "$name: start (limit ${limit}s)"
    local t0=$(date +%s) rc=0 pid watcher=""
    setsid timeout --foreground -k "$GRACE" "$limit" "$@" >"$OUT/$name.log" 2>&1 &
    pid=$!
    if [ -n "${STEP_TERM_FILE:-}" ]; then
        (while ! grep -qsF "$STEP_TERM_TEXT" "$STEP_TERM_FILE" && kill -0 "$pid" 2>/dev/null; do sleep 1; done
            sleep 2; kill -TERM "$pid" 2>/dev/null) &
        watcher=$!
    fi
    wait "$pid" || rc=$?
    kill -KILL -- "-$pid" 2>/dev/null  # whatever the command left behind
    # A FusedAdam build the step started and its limit killed (a test's, a run's) leaves torch's lock, on which
    # every later step would wait: gone, once the background build is over (none of ours runs then).
    if [ "$rc" != 0 ] && [ -n "${BUILD_REPORTED:-}" ]; then
        for lock in $(stale_locks); do rm -f "$lock" && log "$name: removed $lock (a killed build's)"; done
    fi
    [ -z "$watcher" ] || { kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null; }
    log "$name: exit $rc in $(($(date +%s) - t0))s"
    echo "{\"step\": \"$name\", \"status\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit\": $limit${STEP_EXPECTED:+, \
\"expected\": true}}" >>"$OUT/steps.jsonl"
    summary  # every finished figure, whatever comes next
}

# ---------------------------------------------------------------------------------------------- packages
# With --wheels, every wheel there is installed, over whatever the image has (an older transformers would
# otherwise run silently), into a directory fixed by the wheels' names and sizes: a rerun on the same machine
# reuses it, and DeepSpeed's op sources keep their absolute paths, so its JIT-built FusedAdam is not rebuilt.
if [ -n "$WHEELS" ]; then
    key=$( (cd "$WHEELS" && ls -l -- *.whl 2>/dev/null | awk '{print $5, $NF}') | sha256sum | cut -c1-12)
    SITE=$CACHE/site-$key
    if [ ! -f "$SITE/.complete" ]; then
        log "installing every wheel in $WHEELS into $SITE"
        rm -rf "$SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 2
        touch "$SITE/.complete"
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
# The versions the run will import, against pyproject.toml's ranges: a runtime package missing or out of range
# stops the check here (exit 2); pytest need only be there (its version is no figure's).
"$PY" - "$WORK/packages.json" <<'PY' || exit 2
import importlib.metadata as md, json, re, sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = {}
for text in [*project["dependencies"], *(r for group in project.get("optional-dependencies", {}).values() for r in group)]:
    r = Requirement(text)
    reqs.setdefault(re.sub(r"[-_.]+", "-", r.name.lower()), r)
found, bad = {}, []
for name in ("torch", "deepspeed", "transformers", "tokenizers", "webdataset", "boto3", "pyyaml", "pytest"):
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        found[name] = None
    r = reqs.get(name) if name != "pytest" else None
    if found[name] is None or (r is not None and not r.specifier.contains(found[name], prereleases=True)):
        bad.append(f"{name} {found[name] or 'missing'} (pyproject: {r.specifier if r else 'any'})")
json.dump(found, open(sys.argv[1], "w"))
if bad:
    sys.exit("gpu_check: " + "; ".join(bad) + ": pass --wheels DIR with the right versions (docs/gpu.md: The GPU check)")
PY

# Outcomes per test as they finish (scripts/gpu_pytest_log.py), not only junit's XML at the session's end.
gpu_tests() {  # gpu_tests NAME -k EXPR
    local name=$1
    shift
    step "gpu-$name" "$TESTS_LIMIT" env GPU_CHECK_TESTS_OUT="$OUT/pytest-$name.jsonl" \
        PYTHONPATH="$ROOT/scripts:$PYTHONPATH" "$PY" -m pytest -q -m gpu tests/test_gpu.py "$@" \
        -p no:cacheprovider -p gpu_pytest_log
}

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU, even where a GPU is
    # The CPU is slower, and CI's may be shared: generous limits, so that only a real failure fails the run.
    BUDGET=${GPU_CHECK_BUDGET_S:-1800} GRACE=120 TESTS_LIMIT=600 ABLATION_LIMIT=400 LARGE_LIMIT=400
    LARGE_BENCH_LIMIT=400
    RUN_LIMIT=400
    BENCH_LIMIT=400 PROFILE_LIMIT=200 PRETRAIN_SIZE=(train.global_batch_size=8 train.micro_batch_size=8)
    LARGE=configs/tiny.yaml SMALL=configs/tiny.yaml
    SHAPES="large:configs/tiny.yaml small:configs/tiny.yaml"
    BENCH_SHAPES="small:configs/tiny.yaml:find large:configs/tiny.yaml:8"
    # What an 80 GB H100 would get, computed as on the GPU (the log says it); the dry run's own are tiny.
    read -r h100_padded h100_rows h100_equal < <("$PY" -c "from electra_scale.tools.bench.device import \
large_micro_batches as f; print(*f(80 * 10**9))")
    log "Large micro-batches on an 80 GB H100: padded bench $h100_padded, rows $h100_rows, equal real tokens $h100_equal"
    LARGE_MICRO=8 LARGE_ROW_MICRO=4 LARGE_EQUAL=16 SMALL_MICRO=8
    # Compile rows with dynamo's aot_eager backend (named in the rows): it traces the compiled layers' forward and
    # backward as inductor would, without inductor's C++ build (minutes on 2 cores).
    ABLATION_BASE=(train.compile_backend=aot_eager)
    FIND=32 STEPS=2 WARMUP=1 SAMPLES=2048 PRETRAIN="configs/tiny.yaml" PRECISION=fp32
    COST_CONFIG=configs/compare/mini.yaml DEVICE=cpu
    # Paths only a real run meets, walked here: a row that diverges (its row, and the next row runs), a row cut by
    # SIGTERM (marked cut; no row after it starts), and a failed background build (below).
    DIVERGE=(--ablate "optim.lr=1e30 optim.warmup_steps=1")
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA GPU here; use --dry-run to check the orchestration on CPU" >&2; exit 2; }
    # tests/conftest.py puts DeepSpeed on the CPU unless told otherwise; here its accelerator is the GPU.
    export DS_ACCELERATOR=cuda
    LARGE=configs/large.yaml SMALL=configs/small.yaml
    SHAPES="large:configs/large.yaml small:configs/small.yaml base:configs/base.yaml"
    BENCH_SHAPES="small:configs/small.yaml:find base:configs/base.yaml:find"
    # Large's micro-batches from the device's memory (bench/device.py): 128 fit an H200 on 2026-11-29, where an
    # 80 GB H100 runs out; no search (each trial is a Large build).
    read -r LARGE_MICRO LARGE_ROW_MICRO LARGE_EQUAL < <("$PY" -c "import torch; from electra_scale.tools.bench.\
device import large_micro_batches as f; print(*f(torch.cuda.get_device_properties(0).total_memory))")
    # Should that fail, an 80 GB H100's (a failed step then says why, not an empty override).
    LARGE_MICRO=${LARGE_MICRO:-64} LARGE_ROW_MICRO=${LARGE_ROW_MICRO:-64} LARGE_EQUAL=${LARGE_EQUAL:-256}
    BENCH_SHAPES="$BENCH_SHAPES large:configs/large.yaml:$LARGE_MICRO"
    SMALL_MICRO=128
    ABLATION_BASE=()
    # Large's ablation covers a cold inductor compile of both encoders' widths (generator, discriminator).
    GRACE=30 TESTS_LIMIT=120 ABLATION_LIMIT=120 LARGE_LIMIT=240 LARGE_BENCH_LIMIT=150 RUN_LIMIT=90 BENCH_LIMIT=150
    PROFILE_LIMIT=60
    PRETRAIN_SIZE=()
    FIND=512 STEPS=10 WARMUP=3 SAMPLES=65536 PRETRAIN="configs/small.yaml" PRECISION=bf16
    COST_CONFIG=configs/compare/gpu.yaml DEVICE=cuda DIVERGE=()
fi

# ---------------------------------------------------------------------------------------------- 1. environment
"$PY" - "$OUT/env.json" "$DRY" "$WORK/packages.json" <<'PY'
import json, platform, subprocess, sys
import torch
info = {"dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
if torch.cuda.is_available():
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
packages = json.load(open(sys.argv[3]))
info.update(deepspeed=packages.get("deepspeed"), transformers=packages.get("transformers"), packages=packages)
try:
    import deepspeed, transformers  # noqa: F401  (the versions imported: the wheels' when --wheels)
    info.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
except ImportError as err:
    info["import_error"] = str(err)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    info["nvidia_smi"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
PY
log "environment: $(tr -d '\n' <"$OUT/env.json" | cut -c1-200)"
[ "$DRY" = 1 ] || log "Large micro-batches from the device's memory: padded bench $LARGE_MICRO, rows $LARGE_ROW_MICRO, \
equal real tokens $LARGE_EQUAL"

# DeepSpeed's FusedAdam (optim.bias_correction=false, the presets') JIT-builds in ~42 s on a fresh machine
# (2026-11-29): in the background now, while steps 2-5 use the GPU without it; step 6 waits for it. torch's
# FileBaton leaves fused_adam/lock behind when the build is killed (its limit), and every later load then waits on
# it forever: a stale lock (no build of ours running) is removed before the build and after a failed one.
EXT=$TORCH_EXTENSIONS_DIR
if [ "$DRY" = 1 ]; then
    # The dry run's build fails as a killed one does: it takes the lock as torch's FileBaton does (a file created
    # with O_EXCL; no torch import, which a loaded CPU may not finish in time) and is killed at its limit. In a
    # private extensions dir: the shared one may hold another process's live build.
    EXT=$WORK/torch_extensions
    build="import os, time; os.makedirs('$EXT/fused_adam', exist_ok=True); \
os.close(os.open('$EXT/fused_adam/lock', os.O_CREAT | os.O_EXCL)); time.sleep(600)"
    BUILD_LIMIT=5
else
    # The arch list made readable first, as choose_adam does (the image's "9.0a" broke the build on 2026-11-29),
    # so that the build and the runs' loads agree on its flags and the runs find it built.
    build="from electra_scale.engine.optim import deepspeed_arch_list as fix; fix(); \
from deepspeed.ops.op_builder import FusedAdamBuilder as B; B().load()"
    BUILD_LIMIT=240
fi
stale_locks() { find "$EXT" -path '*fused_adam*' -name lock 2>/dev/null; }
for lock in $(stale_locks); do rm -f "$lock" && note fused-adam-lock 0 "removed a stale $lock (a killed build's)"; done
(t0=$(date +%s); rc=0
    timeout -k 10 "$BUILD_LIMIT" env TORCH_EXTENSIONS_DIR="$EXT" "$PY" -c "$build" >"$OUT/fused_adam_build.log" 2>&1 || rc=$?
    echo "$rc $(($(date +%s) - t0))" >"$WORK/build.status") &
BUILD_PID=$!
build_done() {  # the build's status as a step line; a failed build's lock removed, so no later load hangs on it
    wait "$BUILD_PID" 2>/dev/null
    local rc seconds removed=""
    read -r rc seconds <"$WORK/build.status"
    if [ "$rc" != 0 ]; then
        for lock in $(stale_locks); do rm -f "$lock" && removed=" (its lock removed: $lock)"; done
    fi
    echo "{\"step\": \"fused-adam-build\", \"status\": $rc, \"seconds\": $seconds, \"limit\": $BUILD_LIMIT, \
\"note\": \"in the background$removed\"$([ "$DRY" = 1 ] && echo ', "expected": true')}" >>"$OUT/steps.jsonl"
    log "fused-adam-build: exit $rc in ${seconds}s$removed"
    BUILD_REPORTED=1
}

# ---------------------------------------------------------------------------------------------- 2. varlen, compile
VARLEN_TESTS="padding_free or compiled"
gpu_tests varlen -k "$VARLEN_TESTS"

# ---------------------------------------------------------------------------------------------- 3-5. ablation, Large
# Short documents (78% padding, as the demo's Wikipedia leads at seq 512), local synthetic shards; the base setting
# is padding-free, eager, ZeRO-2, and each --ablate row changes the levers it names. Each row appended as it
# finishes. torch's fused AdamW (optim.bias_correction=true): every row and path has the same optimizer, and none
# waits for the build.
short_shards() {  # short_shards CONFIG: SHORT=the directory of its short-document shards, written once (a step)
    local config=$1 seq vocab
    read -r seq vocab < <("$PY" -c "from electra_scale.config import load_config as l; c = l('$config'); \
print(c.data.seq_len, c.model.vocab_size)")
    SHORT="$WORK/short-$seq-$vocab"
    [ -f "$SHORT/manifest.json" ] || step "short-shards-$seq-$vocab" 60 "$PY" -c \
        "from electra_scale.tools.bench.data import synthetic_shards as s; s('$SHORT', $vocab, $seq, 8192, pad_frac=0.78)"
}
ablation() {  # ablation NAME CONFIG MICRO LIMIT ROW-ARGS...
    local name=$1 config=$2 micro=$3 limit=$4
    shift 4
    short_shards "$config"
    step "$name" "$limit" "$PY" -m electra_scale bench --config "$config" "train.precision=$PRECISION" \
        data.num_workers=2 train.unpad=true optim.bias_correction=true "train.micro_batch_size=$micro" \
        ${ABLATION_BASE[@]+"${ABLATION_BASE[@]}"} --data "$SHORT" --steps "$STEPS" --warmup "$WARMUP" \
        --skip data bare engine pretrain "$@" --rows-out "$OUT/$name.jsonl"
}
ablation ablation-large "$LARGE" "$LARGE_ROW_MICRO" "$LARGE_LIMIT" --ablate train.unpad=true \
    --ablate train.compile=true --ablate train.unpad=false \
    --ablate "train.compile=true train.micro_batch_size=$LARGE_EQUAL"

# Large's bare loop against pretrain, padding-free + compiled at equal real tokens: the engine's overhead and the
# headline MFU. One bare build, kept warm for pretrain's windows to interleave with; the JSON rewritten as each
# path finishes.
short_shards "$LARGE"
step bench-large-unpad-compile "$LARGE_BENCH_LIMIT" "$PY" -m electra_scale bench --config "$LARGE" \
    "train.precision=$PRECISION" data.num_workers=2 train.unpad=true train.compile=true optim.bias_correction=true \
    "train.micro_batch_size=$LARGE_EQUAL" ${ABLATION_BASE[@]+"${ABLATION_BASE[@]}"} --data "$SHORT" \
    --steps "$STEPS" --warmup "$WARMUP" --skip data engine --json-out "$OUT/bench-large-unpad-compile.json"

ablation ablation-small "$SMALL" "$SMALL_MICRO" "$ABLATION_LIMIT" --ablate train.unpad=false,true \
    --ablate train.compile=true --ablate train.deepspeed_config=ds_configs/zero1.json,ds_configs/zero0.json \
    ${DIVERGE[@]+"${DIVERGE[@]}"}
if [ "$DRY" = 1 ]; then
    # A row cut by SIGTERM: the step's limit is simulated by the same signal, sent once the first row has
    # started; that row is marked cut and the second never starts.
    STEP_TERM_FILE=$OUT/ablation-cut.jsonl STEP_TERM_TEXT='"status": "started"' STEP_EXPECTED=1
    ablation ablation-cut "$SMALL" "$SMALL_MICRO" "$ABLATION_LIMIT" --ablate train.unpad=true,false --steps 400
    STEP_TERM_FILE="" STEP_TERM_TEXT="" STEP_EXPECTED=""
fi

# ---------------------------------------------------------------------------------------------- 6. other tests
build_done
gpu_tests rest -k "not ($VARLEN_TESTS)"

# ---------------------------------------------------------------------------------------------- 7. stop, resume
# Local shards (no S3 server on a lent GPU machine): synthetic ids, written straight as blocks.
shards() {  # shards CONFIG: the directory of its synthetic shards, written once (as a step)
    local config=$1 seq vocab
    read -r seq vocab < <("$PY" -c "from electra_scale.config import load_config as l; c = l('$config'); \
print(c.data.seq_len, c.model.vocab_size)")
    SHARDS="$WORK/shards-$seq-$vocab" VOCAB=$vocab
    [ -f "$SHARDS/manifest.json" ] || step "shards-$seq-$vocab" 60 "$PY" -c \
        "from electra_scale.tools.bench.data import synthetic_shards; synthetic_shards('$SHARDS', $vocab, $seq, $SAMPLES)"
}
shards "$PRETRAIN"
run="$WORK/pretrain-small"
args=(-m electra_scale pretrain --config "$PRETRAIN" "data.shards=$SHARDS" "run.output_dir=$run"
    "model.vocab_size=$VOCAB" "train.precision=$PRECISION" train.max_steps=100 train.log_every=10
    checkpoint.every_steps=50 optim.warmup_steps=10 data.num_workers=2 ${PRETRAIN_SIZE[@]+"${PRETRAIN_SIZE[@]}"})
step pretrain-to-50 "$RUN_LIMIT" "$PY" "${args[@]}" train.stop_at_step=50
cp "$run/metrics.jsonl" "$OUT/pretrain-metrics.jsonl" 2>/dev/null
step pretrain-resume "$RUN_LIMIT" "$PY" "${args[@]}"
cp "$run/metrics.jsonl" "$OUT/pretrain-metrics.jsonl" 2>/dev/null
summary

# ---------------------------------------------------------------------------------------------- 8. bench
# shape:config:micro-batch, "find" for the largest that fits (--find-micro-batch doubles up to $FIND).
for entry in $BENCH_SHAPES; do
    IFS=: read -r shape config micro <<<"$entry"
    shards "$config"
    bench=(-m electra_scale bench --config "$config" "train.precision=$PRECISION" data.num_workers=2)
    opts=(--data "$SHARDS" --steps "$STEPS" --warmup "$WARMUP")
    if [ "$micro" = find ]; then size=(--find-micro-batch "$FIND"); else size=("train.micro_batch_size=$micro"); fi
    step "bench-$shape-zero2" "$BENCH_LIMIT" "$PY" "${bench[@]}" train.deepspeed_config=ds_configs/zero2.json \
        "${size[@]}" "${opts[@]}" --json-out "$OUT/bench-$shape-zero2.json" --skip data
    micro=$("$PY" -c "import json; print(json.load(open('$OUT/bench-$shape-zero2.json'))['micro_batch_size'])" \
        2>/dev/null || echo "")
    step "bench-$shape-zero0" "$BENCH_LIMIT" "$PY" "${bench[@]}" train.deepspeed_config=ds_configs/zero0.json \
        ${micro:+train.micro_batch_size=$micro} "${opts[@]}" --json-out "$OUT/bench-$shape-zero0.json" --skip data pretrain
done

# ---------------------------------------------------------------------------------------------- 9. profile, cost
for entry in $SHAPES; do
    shape=${entry%%:*} config=${entry#*:}
    step "profile-$shape" "$PROFILE_LIMIT" "$PY" scripts/step_profile.py --config "$config" \
        --json-out "$OUT/profile-$shape.json"
    step "profile-$shape-unpad" "$PROFILE_LIMIT" "$PY" scripts/step_profile.py --config "$config" train.unpad=true \
        "train.precision=$PRECISION" --json-out "$OUT/profile-$shape-unpad.json"
done
step objective_cost "$PROFILE_LIMIT" "$PY" scripts/objective_cost.py --rounds 5 --config "$COST_CONFIG" \
    --device "$DEVICE"

rc=0
"$PY" scripts/gpu_summary.py "$OUT" || rc=$?  # 1 when a step failed (a step not run for the budget is no failure)
log "done; summary: $OUT/summary.md"
exit $rc
