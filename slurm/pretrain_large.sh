#!/bin/bash
# ELECTRA-Large on 8 nodes x 8 GPUs: 64 tasks x micro-batch 32 = the paper's global batch of 2048.
#   sbatch slurm/pretrain_large.sh data.shards=s3://bucket/owt-512 run.output_dir=s3://bucket/runs/large
# Other sizes: sbatch --nodes=16 slurm/pretrain_large.sh ... (gradient accumulation adapts to the world size).
#SBATCH --job-name=electra-large
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=electra-large-%j.out
CONFIG=configs/large.yaml
source "${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_pretrain "$@"
