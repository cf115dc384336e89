#!/bin/bash
# The finalize step of slurm/prepare.sh's array: merges the tasks' part manifests into OUTPUT/manifest.json in
# one write, or refuses in one line naming the tasks still missing. Give it the tasks' arguments (they are
# checked against the parts) and start it after the array:
#   sbatch --dependency=afterok:$array slurm/prepare_finalize.sh "${ARGS[@]}"
#SBATCH --job-name=electra-prepare-finalize
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=electra-prepare-finalize-%j.out
source "${ELECTRA_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
run_prepare --finalize "$@"
