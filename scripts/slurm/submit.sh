#!/bin/bash
# Queue the participant array over $BIDS_DIR/participants.tsv, then the group step after it (afterany).
#
#   BIDS_DIR=... OUT_DIR=... scripts/slurm/submit.sh [INDICES] [-- SBATCH OPTIONS FOR BOTH JOBS]
#
# INDICES: array indices (rows of participants.tsv) to run, e.g. "17,203,4711" from rerun_indices.sh; default all
# rows. The concurrency limit is %${MAX_CONCURRENT:-200}. With BIDS_DATABASE_DIR set, pybids' index of BIDS_DIR is
# built there first (here, once; skipped when it exists) and every task reads it. Prints "<array id> <group id>".
set -euo pipefail

: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the derivatives folder}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
indices=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then indices=$1; shift; fi
[ "${1:-}" = "--" ] && shift
if [ -z "$indices" ]; then
    n=$(( $(wc -l < "$BIDS_DIR/participants.tsv") - 1 ))
    [ "$n" -ge 1 ] || { echo "no participants in $BIDS_DIR/participants.tsv" >&2; exit 2; }
    indices="1-$n"
fi
mkdir -p "$OUT_DIR"
if [ -n "${BIDS_DATABASE_DIR:-}" ] && [ ! -f "$BIDS_DATABASE_DIR/layout_index.sqlite" ]; then
    read -r -a cmd <<< "${ATLASGS_CMD:-atlasgs-bids}"
    "${cmd[@]}" index "$BIDS_DIR" "$BIDS_DATABASE_DIR" >&2
fi
array=$(sbatch --parsable "$@" --array="${indices}%${MAX_CONCURRENT:-200}" "$here/atlasgs_array.sbatch")
array=${array%%;*}
group=$(sbatch --parsable "$@" --dependency="afterany:$array" "$here/atlasgs_group.sbatch")
echo "$array ${group%%;*}"
