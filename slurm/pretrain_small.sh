#!/bin/bash
# ELECTRA-Small on one node with 4 GPUs (4 tasks x micro-batch 32 = the paper's 128).
#   sbatch slurm/pretrain_small.sh data.shards=s3://bucket/owt-128 run.output_dir=s3://bucket/runs/small
#SBATCH --job-name=electra-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=electra-small-%j.out
CONFIG=configs/small.yaml
source "${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_pretrain "$@"
