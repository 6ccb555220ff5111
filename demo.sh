#!/usr/bin/env bash
# The README's main job: install rpd_mpi into .venv, then run PipeDream (PD), LocalSGD and
# Randomized PipeDream (RPD) on 4 MPI ranks (one per pipeline stage; oversubscribed on a
# small machine), write one HDF5 ledger per run to results/demo/ and print a comparison.
# Every F and B is held for --op-cost 0.002 s (emulated compute that leaves the core free),
# so wall time, utilization and measured delays mean something on 2 cores.
#   ./demo.sh            extra arguments go to every `rpd-mpi train` (e.g. --op-cost 0)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[mpich]' >/dev/null
out=results/demo
mkdir -p "$out"
common=(--objective logistic --stages 4 --dim 64 --examples 400 --batch-size 10
        --microbatches 160 --eval-every 4 --seed 1 --op-cost 0.002 "$@")
run() {    # its own ledgers: --force; progress lines go to stderr as each run goes
    echo "demo: mpiexec -n 4 rpd-mpi train $*" >&2
    jobs/local.sh 4 "${common[@]}" --json --force "$@" >/dev/null
}
run --method pd --lr 0.25 --out "$out/pd.h5"
run --method pd --order dynamic --lr 0.25 --out "$out/pd-dynamic.h5"
run --method localsgd --trajectories 4 --local-steps 5 --lr 1.0 --out "$out/localsgd.h5"
run --method rpd --delta 14 --lr 0.25 --out "$out/rpd.h5"
.venv/bin/rpd-mpi report "$out/pd.h5" "$out/pd-dynamic.h5" "$out/localsgd.h5" "$out/rpd.h5"
