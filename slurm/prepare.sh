#!/bin/bash
# `electra-scale prepare` as a SLURM job array: task K of N prepares its slice K of the inputs on the CPUs it was
# given (prepare's --workers defaults to --cpus-per-task) and writes its shards and a part manifest; then
# slurm/prepare_finalize.sh merges the parts into the one manifest that pretrain reads. docs/data.md, "On a
# cluster", has the whole flow (the vocabulary step, the dependencies, re-running a failed task):
#   ARGS=(--input s3://bucket/raw --output s3://bucket/owt-512 --tokenizer vocab.txt --seq-len 512)
#   array=$(sbatch --parsable --array=0-63 slurm/prepare.sh "${ARGS[@]}")
#   sbatch --dependency=afterok:$array slurm/prepare_finalize.sh "${ARGS[@]}"
#   sbatch --array=17 slurm/prepare.sh "${ARGS[@]}" --num-tasks 64    # re-runs task 17 of 64 alone
# (--num-tasks N makes the array index absolute: without it, an array of one would be task 0 of 1).
# Without --array it is one prepare on one node (also the vocabulary step: --tokenizer train:V --tokenizer-only).
#SBATCH --job-name=electra-prepare
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=electra-prepare-%A_%a.out
source "${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_prepare "$@"
