#!/bin/bash
# The tiny preset on 2 CPU tasks: what the tests submit to a one-machine SLURM cluster.
#   sbatch slurm/pretrain_tiny_cpu.sh data.shards=... run.output_dir=...
#SBATCH --job-name=electra-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=electra-tiny-%j.out
CONFIG=configs/tiny.yaml
source "${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_pretrain "$@"
