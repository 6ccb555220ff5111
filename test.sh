#!/usr/bin/env bash
# The project's test command (README). Needs only python3 (3.10+):
#   ./test.sh              serial tests, then tests/mpi under mpiexec -n 2 and -n 4
#   ./test.sh -k ledger    extra arguments go to every pytest phase
# Creates .venv and installs '.[test,mpich]' when needed (again only when pyproject.toml
# changes); the mpich extra is the PyPI MPI runtime (mpiexec in .venv/bin).
# Run as root, tests/test_slurm.py also apt-get installs slurm-wlm and munge (once; they stay
# installed) and runs munged, slurmctld and slurmd from a temporary folder for the length of
# that module (tests/slurm_node.sh; stopped at its teardown). RPD_SKIP_SLURM=1 ./test.sh skips it.
# Rank 0 of each MPI phase prints here; ranks > 0 log to .test-logs/mpi-n<N>-rank<r>.log.
# The last line comes from tests/summarize.py: "N passed, N failed, N skipped"; the exit
# status is nonzero if any test failed, any phase failed, or a phase left no JUnit XML.
set -uo pipefail
trap 'exit 130' INT
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
LOGS=$ROOT/.test-logs
VENV=$ROOT/.venv
PY=$VENV/bin/python
SERIAL_TEST_TIMEOUT=300  # seconds per serial test
MPI_TEST_TIMEOUT=120     # seconds per MPI test; the thread method fires inside MPI calls too
MPI_PHASE_TIMEOUT=900    # outer bound on one whole mpiexec phase

install() {
    [ -x "$PY" ] || python3 -m venv "$VENV" || return 1
    local stamp=$VENV/.test-sh-installed want
    want=$(cksum <pyproject.toml)
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
    "$PY" -m pip install -q -e '.[test,mpich]' || return 1
    echo "$want" >"$stamp"
}

run_serial() {
    echo "=== serial: pytest tests (without tests/mpi)"
    "$PY" -m pytest tests --ignore=tests/mpi -m "not mpi" --timeout="$SERIAL_TEST_TIMEOUT" \
        -p no:cacheprovider --junitxml="$LOGS/junit-serial.xml" "$@"
}

run_mpi() {
    local n=$1 mpiexec=$VENV/bin/mpiexec
    shift
    [ -x "$mpiexec" ] || mpiexec=mpiexec
    echo "=== mpi-n$n: mpiexec -n $n pytest tests/mpi (ranks > 0: .test-logs/mpi-n$n-rank*.log)"
    rm -f "$LOGS"/mpi-n"$n"-rank*.log
    timeout -k 10 "$MPI_PHASE_TIMEOUT" "$mpiexec" -n "$n" \
        "$PY" -m mpi4py -m pytest tests/mpi --with-mpi \
        --timeout="$MPI_TEST_TIMEOUT" --timeout-method=thread -p no:cacheprovider \
        --basetemp="$LOGS/tmp/mpi-n$n" --junitxml="$LOGS/junit-mpi-n$n.xml" "$@"
}

install || { echo "test.sh: could not set up $VENV" >&2; exit 2; }
mkdir -p "$LOGS"
rm -f "$LOGS"/junit-*.xml
run_serial "$@"
serial=$?
run_mpi 2 "$@"
n2=$?
run_mpi 4 "$@"
n4=$?
echo "=== summary (JUnit XML and logs in .test-logs/)"
exec "$PY" tests/summarize.py \
    --phase serial "$serial" "$LOGS/junit-serial.xml" \
    --phase mpi-n2 "$n2" "$LOGS/junit-mpi-n2.xml" \
    --phase mpi-n4 "$n4" "$LOGS/junit-mpi-n4.xml"
