#!/bin/bash
# grazbids group level (training) on one GPU with Apptainer. Submit after the participant
# array has finished:
#
#   export BIDS_DIR=/data/ds OUT_DIR=/data/ds/derivatives/grazbids SIF=/containers/grazbids-0.1.0-cuda.sif
#   export TARGET_COLUMN=group
#   array=$(sbatch --parsable --array=1-"$n" singularity/slurm_participant_array.sh)
#   sbatch --dependency=afterok:"$array" singularity/slurm_group_gpu.sh --mode plain masked grazplus
#
# Needs the CUDA build of the image (docs/containers.md). --nv makes the host's NVIDIA driver
# visible in the container; --device cuda stops with a hint (exit 1) when no GPU is usable,
# instead of silently training on the CPU (use --device auto for that).
#
# Environment: BIDS_DIR, OUT_DIR, SIF, TARGET_COLUMN (required); WORK_DIR (default
# $TMPDIR/grazbids_work_group on the node); TEMPLATEFLOW_DIR, APPTAINER as in
# slurm_participant_array.sh. Extra arguments are passed to grazbids.
#SBATCH --job-name=grazbids-group
#SBATCH --partition=gpu
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=grazbids-group_%j.out
set -euo pipefail

: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the output folder (with the participant outputs)}"
: "${SIF:?set SIF to the grazbids .sif image (CUDA build)}"
: "${TARGET_COLUMN:?set TARGET_COLUMN to the participants.tsv column to classify}"
APPTAINER=${APPTAINER:-apptainer}
WORK_DIR=${WORK_DIR:-${TMPDIR:-/tmp}/grazbids_work_group}
CPUS=${SLURM_CPUS_PER_TASK:-1}
mkdir -p "$WORK_DIR"

binds=(-B "$BIDS_DIR:/bids:ro" -B "$OUT_DIR:/out" -B "$WORK_DIR:/work")
if [ -n "${TEMPLATEFLOW_DIR:-}" ]; then
    binds+=(-B "$TEMPLATEFLOW_DIR:/templateflow:ro")
    export APPTAINERENV_TEMPLATEFLOW_HOME=/templateflow SINGULARITYENV_TEMPLATEFLOW_HOME=/templateflow
fi
mem_args=()
if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
    mem_args=(--mem-gb "$(awk -v mb="$SLURM_MEM_PER_NODE" 'BEGIN { printf "%.1f", mb / 1024 }')")
fi

echo "group level on $(hostname), GPUs: ${CUDA_VISIBLE_DEVICES:-none visible}, $CPUS CPUs"
exec "$APPTAINER" run --nv --cleanenv "${binds[@]}" "$SIF" \
    /bids /out group --target-column "$TARGET_COLUMN" --device cuda -w /work \
    --nprocs "$CPUS" --omp-nthreads "$CPUS" "${mem_args[@]}" --skip-bids-validation "$@"
