#!/usr/bin/env bash
# Prove the GPU path and take its figures in one short run (a GPU machine may be lent for a few minutes only).
#
#   scripts/gpu_check.sh --out DIR [--wheels DIR]     on a machine with a CUDA GPU (GPU_CHECK_BUDGET_S, 480 s)
#   scripts/gpu_check.sh --out DIR --dry-run           the same orchestration on the CPU, tiny shapes (CI runs it)
#   make gpu-check OUT=DIR WHEELS=DIR
#
# One budget (GPU_CHECK_BUDGET_S, default 480 s: one 10-minute command with room to spare) and a time limit per
# step (timeout -k: a step that ignores SIGTERM is killed 10 s later). Steps run in the order of what decides
# most, and none starts once less than 20 s is left. summary.json and summary.md are rewritten after every step,
# so a run killed at any moment keeps every figure it finished (docs/gpu.md has the plan against the budget):
#   1. the environment (GPU, driver, torch, CUDA) -> env.json; DeepSpeed's FusedAdam starts building in the
#      background (steps 2-4 do not need it: the ablation trains with torch's fused AdamW)
#   2. gpu-varlen: pytest -m gpu, the padding-free (FlashAttention varlen, custom op) and compiled-layer tests
#      against the padded eager step -> pytest-varlen.xml
#   3. the ablation of Small on short documents (78% padding, as the demo's Wikipedia leads at seq 512), the
#      real pretrain path once per lever setting, all else equal: train.unpad, train.compile, ZeRO-2/1/0 ->
#      ablation-small.jsonl, a row appended as each finishes (summary.json: `ablation`)
#   4. the Large pair, train.unpad=false/true -> ablation-large.jsonl
#   5. gpu-rest: the other GPU tests (NCCL + the gloo side group, a bf16 step with FusedAdam, NaN-free sampling,
#      exact resume with the device's RNG, export) -> pytest-rest.xml
#   6. a 100-step pretrain of Small from local shards, stopped at 50 and resumed -> pretrain-metrics.jsonl
#   7. bench of Large (micro-batch 128, known to fit), Small and Base (the largest micro-batch that fits), bf16,
#      ZeRO-2 (bare loop, engine, pretrain), then ZeRO-0 (bare loop, engine) -> bench-<shape>-<zero>.json
#   8. where a step's time goes, padded and padding-free (scripts/step_profile.py), and ELECTRA's cost per token
#      over MLM's (scripts/objective_cost.py) -> profile-*.json, objective_cost.log
# Missing packages (deepspeed, webdataset, boto3, ...) are installed from --wheels DIR into a private directory;
# docs/gpu.md ("The GPU check") says how to build that directory.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT="" WHEELS="" DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "usage: $0 --out DIR [--wheels DIR] [--dry-run]" >&2; exit 2 ;;
    esac
done
[ -n "$OUT" ] || { echo "gpu_check: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
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
# JIT-built ops (FusedAdam) outside the work dir, which is deleted: a second run on the same machine reuses them.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/electra-scale/torch_extensions}

log() { echo "gpu_check [$(($(date +%s) - START))s] $*" | tee -a "$OUT/steps.log"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# step NAME LIMIT_S CMD...: run it with a time limit, unless the budget is spent; record its exit status.
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
    local t0=$(date +%s) rc=0
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    log "$name: exit $rc in $(($(date +%s) - t0))s"
    echo "{\"step\": \"$name\", \"status\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit\": $limit}" \
        >>"$OUT/steps.jsonl"
    "$PY" scripts/gpu_summary.py "$OUT" >/dev/null 2>&1 || true  # every finished figure, whatever comes next
}
: >"$OUT/steps.jsonl"
: >"$OUT/steps.log"

# ---------------------------------------------------------------------------------------------- packages
missing=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("deepspeed", "webdataset", "boto3", "tokenizers", "transformers", "yaml", "pytest")
               if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    if [ -z "$WHEELS" ]; then
        echo "gpu_check: missing Python packages: $missing; pass --wheels DIR (docs/gpu.md: The GPU check)" >&2
        exit 2
    fi
    log "installing from $WHEELS: $missing"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the CPU, even where a GPU is
    # The CPU is slower, and CI's may be shared: generous limits, so that only a real failure fails the run.
    BUDGET=${GPU_CHECK_BUDGET_S:-1800} TESTS_LIMIT=600 ABLATION_LIMIT=400 RUN_LIMIT=400 BENCH_LIMIT=400
    PROFILE_LIMIT=200 PRETRAIN_SIZE=(train.global_batch_size=8 train.micro_batch_size=8)
    SHAPES="large:configs/tiny.yaml small:configs/tiny.yaml"
    BENCH_SHAPES="large:configs/tiny.yaml:8 small:configs/tiny.yaml:find"
    # shape:config:micro-batch. Compile rows with dynamo's aot_eager backend (named in the rows): it traces the
    # compiled layers' forward and backward as inductor would, without inductor's C++ build (minutes on 2 cores).
    SMALL_ABLATION="small:configs/tiny.yaml:8" LARGE_ABLATION="large:configs/tiny.yaml:8"
    ABLATION_BASE=(train.compile_backend=aot_eager)
    FIND=32 STEPS=2 WARMUP=1 SAMPLES=2048 PRETRAIN="configs/tiny.yaml" PRECISION=fp32
    COST_CONFIG=configs/compare/mini.yaml DEVICE=cpu
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA GPU here; use --dry-run to check the orchestration on CPU" >&2; exit 2; }
    # tests/conftest.py puts DeepSpeed on the CPU unless told otherwise; here its accelerator is the GPU.
    export DS_ACCELERATOR=cuda
    SHAPES="large:configs/large.yaml small:configs/small.yaml base:configs/base.yaml"
    # Large at 128, the largest that fit under ZeRO-2 on 2026-11-29 (no search: each trial is a Large build).
    BENCH_SHAPES="large:configs/large.yaml:128 small:configs/small.yaml:find base:configs/base.yaml:find"
    SMALL_ABLATION="small:configs/small.yaml:128" LARGE_ABLATION="large:configs/large.yaml:64"
    ABLATION_BASE=()
    TESTS_LIMIT=120 ABLATION_LIMIT=150 RUN_LIMIT=90 BENCH_LIMIT=150 PROFILE_LIMIT=60 PRETRAIN_SIZE=()
    FIND=512 STEPS=10 WARMUP=3 SAMPLES=65536 PRETRAIN="configs/small.yaml" PRECISION=bf16
    COST_CONFIG=configs/compare/gpu.yaml DEVICE=cuda
fi
ALL_LEVERS=(--ablate train.unpad=false,true --ablate train.compile=true
    --ablate train.deepspeed_config=ds_configs/zero1.json,ds_configs/zero0.json)

# ---------------------------------------------------------------------------------------------- 1. environment
"$PY" - "$OUT/env.json" "$DRY" <<'PY'
import json, platform, subprocess, sys
import torch
info = {"dry_run": sys.argv[2] == "1", "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import deepspeed, transformers
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
log "environment: $(cat "$OUT/env.json" | tr -d '\n' | cut -c1-200)"

# DeepSpeed's FusedAdam (optim.bias_correction=false, the presets') JIT-builds in ~42 s on a fresh machine
# (2026-11-29): in the background now, while steps 2-4 use the GPU without it; step 5 waits for it.
if [ "$DRY" = 0 ]; then
    # The arch list made readable first, as choose_adam does (the image's "9.0a" broke the build on 2026-11-29),
    # so that the build and the runs' loads agree on its flags and the runs find it built.
    build="from electra_scale.engine.optim import deepspeed_arch_list as fix; fix(); \
from deepspeed.ops.op_builder import FusedAdamBuilder as B; B().load()"
    (timeout -k 10 240 "$PY" -c "$build" >"$OUT/fused_adam_build.log" 2>&1
        echo "exit $? at $(($(date +%s) - START))s" >>"$OUT/fused_adam_build.log") &
    BUILD_PID=$!
fi

# ---------------------------------------------------------------------------------------------- 2. varlen, compile
VARLEN_TESTS="padding_free or compiled"
step gpu-varlen "$TESTS_LIMIT" "$PY" -m pytest -q -m gpu tests/test_gpu.py -k "$VARLEN_TESTS" -p no:cacheprovider \
    --junitxml="$OUT/pytest-varlen.xml"

# ---------------------------------------------------------------------------------------------- 3-4. ablation
# Short documents, local synthetic shards; the base setting is padding-free, eager, ZeRO-2, and each --ablate row
# changes one lever from it. Only the ablation's rows (--skip every other path), each appended as it finishes.
# torch's fused AdamW (optim.bias_correction=true): every row has the same optimizer, and none waits for the build.
ablation() {  # ablation NAME SHAPE:CONFIG:MICRO LEVER-ARGS...
    local name=$1 entry=$2 shape config micro seq vocab data
    shift 2
    IFS=: read -r shape config micro <<<"$entry"
    read -r seq vocab < <("$PY" -c "from electra_scale.config import load_config as l; c = l('$config'); \
print(c.data.seq_len, c.model.vocab_size)")
    data="$WORK/short-$seq-$vocab"
    [ -f "$data/manifest.json" ] || step "short-shards-$shape" 60 "$PY" -c \
        "from electra_scale.tools.bench.data import synthetic_shards as s; s('$data', $vocab, $seq, 8192, pad_frac=0.78)"
    step "$name" "$ABLATION_LIMIT" "$PY" -m electra_scale bench --config "$config" "train.precision=$PRECISION" \
        data.num_workers=2 train.unpad=true optim.bias_correction=true "train.micro_batch_size=$micro" \
        ${ABLATION_BASE[@]+"${ABLATION_BASE[@]}"} --data "$data" --steps "$STEPS" --warmup "$WARMUP" \
        --skip data bare engine pretrain "$@" --rows-out "$OUT/$name.jsonl"
}
ablation ablation-small "$SMALL_ABLATION" "${ALL_LEVERS[@]}"
ablation ablation-large "$LARGE_ABLATION" --ablate train.unpad=false,true

# ---------------------------------------------------------------------------------------------- 5. other tests
[ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
step gpu-rest "$TESTS_LIMIT" "$PY" -m pytest -q -m gpu tests/test_gpu.py -k "not ($VARLEN_TESTS)" \
    -p no:cacheprovider --junitxml="$OUT/pytest-rest.xml"

# ---------------------------------------------------------------------------------------------- 6. stop, resume
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
"$PY" scripts/gpu_summary.py "$OUT" >/dev/null 2>&1

# ---------------------------------------------------------------------------------------------- 7. bench
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

# ---------------------------------------------------------------------------------------------- 8. profile, cost
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
