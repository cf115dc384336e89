#!/usr/bin/env bash
# Prove the GPU path and take its figures in one short run (a GPU machine may be lent for a few minutes only).
#
#   scripts/gpu_check.sh --out DIR [--wheels DIR]     on a machine with a CUDA GPU (at most ~6 minutes)
#   scripts/gpu_check.sh --out DIR --dry-run           the same orchestration on the CPU, tiny shapes (CI runs it)
#   make gpu-check OUT=DIR WHEELS=DIR
#
# It runs, each step with its own time limit, most valuable first, and stops starting new steps near the end
# of its budget (GPU_CHECK_BUDGET_S, default 360 s):
#   1. the environment (GPU, driver, torch, CUDA) -> env.json
#   2. pytest -m gpu (tests/test_gpu.py): NCCL + the gloo side group, a bf16 step with DeepSpeed's FusedAdam
#      (JIT-built), NaN-free sampling and CPU-identical random numbers, checkpoint resume with the device's
#      RNG giving identical losses, export, padding-free batches (FlashAttention varlen) and compiled layers
#      against the padded eager step -> pytest.xml, pytest.log
#   2b. the ablation of Large and Small on short documents (78% padding, as the demo's Wikipedia leads at seq
#      512): bench with the real pretrain path once per lever setting, all else equal: train.unpad, train.compile,
#      the DeepSpeed JSON (ZeRO-2 / ZeRO-1 / ZeRO-0) -> ablation-<shape>.json (summary.json: `ablation`)
#   3. electra-scale bench of the Large, Small and Base shapes, bf16, ZeRO-2 at the largest micro-batch that
#      fits (--find-micro-batch), then ZeRO-0 at that micro-batch -> bench-<shape>-<zero>.json
#   4. a 100-step pretrain of Small from local shards, stopped at 50 and resumed -> pretrain.log
#   5. where a step's time goes (scripts/step_profile.py) and ELECTRA's cost per token over MLM's
#      (scripts/objective_cost.py) -> profile-*.json, objective_cost.log
# and writes summary.json + summary.md. Missing packages (deepspeed, webdataset, boto3, ...) are installed
# from --wheels DIR into a private directory; docs/gpu.md ("The GPU check") says how to build that directory.
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
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-360}  # the dry run sets its own (the CPU is slower)

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}

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
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    log "$name: exit $rc in $(($(date +%s) - t0))s"
    echo "{\"step\": \"$name\", \"status\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$OUT/steps.jsonl"
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
    BUDGET=${GPU_CHECK_BUDGET_S:-1800} PYTEST_LIMIT=600 ABLATION_LIMIT=400
    SHAPES="large:configs/tiny.yaml small:configs/tiny.yaml"
    # shape:config:micro-batch; compile is left out on the CPU (inductor's C++ build takes minutes on 2 cores)
    ABLATE_SHAPES="large:configs/tiny.yaml:8 small:configs/tiny.yaml:8"
    LEVERS=(--ablate train.unpad=false,true --ablate train.deepspeed_config=ds_configs/zero0.json)
    FIND=32 STEPS=2 WARMUP=1 SAMPLES=2048 PRETRAIN="configs/tiny.yaml" PRECISION=fp32
    COST_CONFIG=configs/compare/mini.yaml DEVICE=cpu
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA GPU here; use --dry-run to check the orchestration on CPU" >&2; exit 2; }
    # tests/conftest.py puts DeepSpeed on the CPU unless told otherwise; here its accelerator is the GPU.
    export DS_ACCELERATOR=cuda
    SHAPES="large:configs/large.yaml small:configs/small.yaml base:configs/base.yaml"
    ABLATE_SHAPES="large:configs/large.yaml:64 small:configs/small.yaml:128"
    LEVERS=(--ablate train.unpad=false,true --ablate train.compile=true
        --ablate train.deepspeed_config=ds_configs/zero1.json,ds_configs/zero0.json)
    PYTEST_LIMIT=150 ABLATION_LIMIT=150
    FIND=512 STEPS=10 WARMUP=3 SAMPLES=65536 PRETRAIN="configs/small.yaml" PRECISION=bf16
    COST_CONFIG=configs/compare/gpu.yaml DEVICE=cuda
fi

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

# ---------------------------------------------------------------------------------------------- 2. pytest -m gpu
step pytest "$PYTEST_LIMIT" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/pytest.xml"

# ---------------------------------------------------------------------------------------------- 2b. ablation
# Short documents, local synthetic shards; the base setting is padding-free, eager, ZeRO-2, and each --ablate
# row changes one lever from it (LEVERS).
for entry in $ABLATE_SHAPES; do
    IFS=: read -r shape config micro <<<"$entry"
    read -r seq vocab < <("$PY" -c "from electra_scale.config import load_config as l; c = l('$config'); \
print(c.data.seq_len, c.model.vocab_size)")
    data="$WORK/short-$seq-$vocab"
    [ -f "$data/manifest.json" ] || step "short-shards-$shape" 60 "$PY" -c \
        "from electra_scale.tools.bench.data import synthetic_shards as s; s('$data', $vocab, $seq, 8192, pad_frac=0.78)"
    step "ablation-$shape" "$ABLATION_LIMIT" "$PY" -m electra_scale bench --config "$config" "train.precision=$PRECISION" \
        data.num_workers=2 train.unpad=true "train.micro_batch_size=$micro" --data "$data" --steps "$STEPS" \
        --warmup "$WARMUP" --skip data "${LEVERS[@]}" --json-out "$OUT/ablation-$shape.json"
done

# ---------------------------------------------------------------------------------------------- 3. bench
for entry in $SHAPES; do
    shape=${entry%%:*} config=${entry#*:}
    read -r seq vocab < <("$PY" -c "from electra_scale.config import load_config as l; c = l('$config'); \
print(c.data.seq_len, c.model.vocab_size)")
    # Local shards (no S3 server on a lent GPU machine): synthetic ids, written straight as blocks.
    data="$WORK/shards-$seq-$vocab"
    [ -f "$data/manifest.json" ] || step "shards-$shape" 60 "$PY" -c \
        "from electra_scale.tools.bench.data import synthetic_shards; synthetic_shards('$data', $vocab, $seq, $SAMPLES)"
    bench=(-m electra_scale bench --config "$config" "train.precision=$PRECISION" data.num_workers=2)
    opts=(--data "$data" --steps "$STEPS" --warmup "$WARMUP")
    step "bench-$shape-zero2" 150 "$PY" "${bench[@]}" train.deepspeed_config=ds_configs/zero2.json "${opts[@]}" \
        --find-micro-batch "$FIND" --json-out "$OUT/bench-$shape-zero2.json" --skip data
    micro=$("$PY" -c "import json; print(json.load(open('$OUT/bench-$shape-zero2.json'))['micro_batch_size'])" \
        2>/dev/null || echo "")
    step "bench-$shape-zero0" 90 "$PY" "${bench[@]}" train.deepspeed_config=ds_configs/zero0.json \
        ${micro:+train.micro_batch_size=$micro} "${opts[@]}" --json-out "$OUT/bench-$shape-zero0.json" --skip data pretrain
    if [ "$shape" = small ]; then
        # ---------------------------------------------------------------------------------- 4. pretrain 100
        run="$WORK/pretrain-small"
        args=(-m electra_scale pretrain --config "$PRETRAIN" "data.shards=$data" "run.output_dir=$run"
            "model.vocab_size=$vocab" "train.precision=$PRECISION" train.max_steps=100 train.log_every=10
            checkpoint.every_steps=50 optim.warmup_steps=10 data.num_workers=2)
        step pretrain-to-50 120 "$PY" "${args[@]}" train.stop_at_step=50
        step pretrain-resume 120 "$PY" "${args[@]}"
        cp "$run/metrics.jsonl" "$OUT/pretrain-metrics.jsonl" 2>/dev/null
    fi
done

# ---------------------------------------------------------------------------------------------- 5. profile, cost
for entry in $SHAPES; do
    shape=${entry%%:*} config=${entry#*:}
    step "profile-$shape" 60 "$PY" scripts/step_profile.py --config "$config" --json-out "$OUT/profile-$shape.json"
done
step objective_cost 60 "$PY" scripts/objective_cost.py --rounds 5 --config "$COST_CONFIG" --device "$DEVICE"

"$PY" scripts/gpu_summary.py "$OUT"
log "done; summary: $OUT/summary.md"
