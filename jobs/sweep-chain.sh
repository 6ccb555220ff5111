#!/usr/bin/env bash
# A step-size sweep and its scoring as two chained Slurm jobs (jobs/README.md):
#   jobs/sweep-chain.sh LO HI [rpd-mpi simulate args...]
# submits jobs/sweep.sbatch as the array 0..HI-LO (task i: lr = 2^(LO + i), ledgers in
# results/sweep/<array job id>/) and jobs/sweep-collect.sbatch with
# --dependency=afterok:<array job id> (it starts only when every task succeeded, and is
# cancelled when one fails: --kill-on-invalid-dep=yes). Prints "sweep <id> collect <id>".
# Both jobs run in the current directory. Environment:
#   SBATCH_OPTS  more sbatch options for both jobs (split at spaces), e.g. "-p cpu -A proj"
#   CHAIN_WAIT   1: wait for the collect job (sbatch --wait) and exit with its status
#   RPD_CMD, RPD_VENV, RPD_MPI, NUMBA_CACHE_DIR as for jobs/sweep.sbatch (exported to the jobs)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: jobs/sweep-chain.sh LO HI [rpd-mpi args...]" >&2; exit 2; }
lo=$1 hi=$2
shift 2
[ "$hi" -ge "$lo" ] 2>/dev/null || { echo "sweep-chain.sh: need integers LO <= HI" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a opts <<<"${SBATCH_OPTS:-}"
sweep=$(LR_LO=$lo sbatch --parsable "${opts[@]}" --array="0-$((hi - lo))" \
    "$here/sweep.sbatch" "$@")
sweep=${sweep%%;*}
collect=(env SWEEP_JOB="$sweep" LR_LO="$lo" LR_HI="$hi" sbatch --parsable "${opts[@]}"
         --dependency="afterok:$sweep" --kill-on-invalid-dep=yes)
if [ "${CHAIN_WAIT:-0}" = 1 ]; then       # sbatch --wait prints the id, then waits
    printf 'sweep %s collect ' "$sweep"
    exec "${collect[@]}" --wait "$here/sweep-collect.sbatch" "$@"
fi
id=$("${collect[@]}" "$here/sweep-collect.sbatch" "$@")
echo "sweep $sweep collect ${id%%;*}"
