#!/usr/bin/env bash
# Run one pipeline on this machine, one MPI rank per stage (jobs/README.md):
#   jobs/local.sh S [rpd-mpi train args...]
#   jobs/local.sh 4 --method pd --objective quadratic --microbatches 40 --out run.h5
# is `mpiexec -n S rpd-mpi train --stages S ARGS` (a --stages in ARGS comes later and wins).
# mpiexec and rpd-mpi come from $RPD_VENV/bin (default: this repo's .venv), else from PATH.
# More ranks than cores: adds `--wait polite` unless ARGS name --wait (it then also overrides
# a wait set in a --config file), so that waiting ranks sleep instead of spinning; with Open MPI
# also --oversubscribe. Open MPI always gets the run-as-root variables and OMPI_MCA_btl=^ofi
# (docs/DESIGN.md 9). The PyPI MPICH needs no flag.
set -euo pipefail
[[ ${1:-} =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 S [rpd-mpi train args...]" >&2; exit 2; }
S=$1
shift
VENV=${RPD_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}
[ -d "$VENV/bin" ] && PATH=$VENV/bin:$PATH
mpi=(mpiexec -n "$S")
train=(rpd-mpi train --stages "$S")
openmpi=$(mpiexec --version 2>&1 | grep -c "Open MPI\|OpenRTE" || true)
if [ "$openmpi" -gt 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export OMPI_MCA_btl=${OMPI_MCA_btl:-^ofi}
fi
if [ "$S" -gt "$(nproc)" ]; then
    [ "$openmpi" -gt 0 ] && mpi+=(--oversubscribe)
    [[ " $* " == *" --wait"* ]] || train+=(--wait polite)
fi
exec "${mpi[@]}" "${train[@]}" "$@"
