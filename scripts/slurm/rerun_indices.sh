#!/bin/bash
# Array indices (rows of participants.tsv) of the participants that failed or are missing in group_qc.tsv, comma
# separated, for:  scripts/slurm/submit.sh "$(scripts/slurm/rerun_indices.sh)"
#
#   BIDS_DIR=... OUT_DIR=... scripts/slurm/rerun_indices.sh
#
# Prints nothing when every participant is ok. Very long lists: split them (SLURM limits the length of --array).
set -euo pipefail

: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
: "${OUT_DIR:?set OUT_DIR to the derivatives folder}"
awk -F'\t' 'FNR == NR { if (FNR == 1) { for (i = 1; i <= NF; i++) if ($i == "status") s = i; next }
                        if ($s == "failed" || $s == "missing") want[$1]; next }
            FNR > 1 { id = $1; if (id !~ /^sub-/) id = "sub-" id; if (id in want) printf "%s%d", (n++ ? "," : ""), FNR - 1 }
            END { print "" }' "$OUT_DIR/group_qc.tsv" "$BIDS_DIR/participants.tsv"
