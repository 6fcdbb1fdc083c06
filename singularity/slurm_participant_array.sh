#!/bin/bash
# grazbids participant level on SLURM with Apptainer: one participant of participants.tsv per
# array task (MultiProc inside the task). Submit with one task per participant row:
#
#   export BIDS_DIR=/data/ds OUT_DIR=/data/ds/derivatives/grazbids SIF=/containers/grazbids-0.1.0.sif
#   n=$(( $(wc -l < "$BIDS_DIR/participants.tsv") - 1 ))
#   sbatch --array=1-"$n"%20 singularity/slurm_participant_array.sh [extra grazbids options]
#
# Environment (sbatch exports the submitting shell's environment by default):
#   BIDS_DIR, OUT_DIR, SIF   required: dataset, output folder, the grazbids .sif image
#   WORK_ROOT          parent of the per-participant work folders (default: $TMPDIR or /tmp on
#                      the node; use a shared scratch folder to keep them for re-runs)
#   TEMPLATEFLOW_DIR   optional site TemplateFlow folder (templates other than the embedded
#                      MNI152NLin2009aSym); bound read-only at /templateflow
#   APPTAINER          the command (default apptainer; e.g. singularity)
#   VALIDATE=1         run the BIDS validator in every task (default: skipped; validate once
#                      before submitting: $APPTAINER exec --cleanenv -B "$BIDS_DIR:/bids:ro"
#                      "$SIF" bids-validator-deno /bids)
# Extra arguments are passed to grazbids.
#SBATCH --job-name=grazbids-participant
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=02:00:00
#SBATCH --output=grazbids-participant_%A_%a.out
set -euo pipefail

: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the output folder}"
: "${SIF:?set SIF to the grazbids .sif image}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=1-<number of participants>}"
APPTAINER=${APPTAINER:-apptainer}
WORK_ROOT=${WORK_ROOT:-${TMPDIR:-/tmp}}
CPUS=${SLURM_CPUS_PER_TASK:-1}

# row SLURM_ARRAY_TASK_ID of participants.tsv (after the header), column participant_id
subject=$(awk -F'\t' -v row="$((SLURM_ARRAY_TASK_ID + 1))" '
    NR == 1 { for (i = 1; i <= NF; i++) if ($i == "participant_id") col = i; next }
    NR == row && col { gsub(/\r/, "", $col); print $col }' "$BIDS_DIR/participants.tsv")
if [ -z "$subject" ]; then
    echo "no participant in row $SLURM_ARRAY_TASK_ID of $BIDS_DIR/participants.tsv" >&2
    exit 66
fi
subject=${subject#sub-}

work="$WORK_ROOT/grazbids_work/sub-$subject"
mkdir -p "$OUT_DIR" "$work"

binds=(-B "$BIDS_DIR:/bids:ro" -B "$OUT_DIR:/out" -B "$work:/work")
if [ -n "${TEMPLATEFLOW_DIR:-}" ]; then
    binds+=(-B "$TEMPLATEFLOW_DIR:/templateflow:ro")
    export APPTAINERENV_TEMPLATEFLOW_HOME=/templateflow SINGULARITYENV_TEMPLATEFLOW_HOME=/templateflow
fi
validation=(--skip-bids-validation)
if [ "${VALIDATE:-0}" = 1 ]; then validation=(); fi
# memory for the MultiProc scheduler: what SLURM granted (MB), in GB
mem_args=()
if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then
    mem_args=(--mem-gb "$(awk -v mb="$SLURM_MEM_PER_NODE" 'BEGIN { printf "%.1f", mb / 1024 }')")
fi

echo "sub-$subject: task $SLURM_ARRAY_TASK_ID on $(hostname), $CPUS CPUs, work folder $work"
exec "$APPTAINER" run --cleanenv "${binds[@]}" "$SIF" \
    /bids /out participant --participant-label "$subject" -w /work \
    --nprocs "$CPUS" --omp-nthreads "$CPUS" "${mem_args[@]}" "${validation[@]}" "$@"
