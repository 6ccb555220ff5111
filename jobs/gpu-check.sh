#!/usr/bin/env bash
# The prepared GPU check (issues 6 and 15; docs/GPU.md): gradient check on cupy, copy
# rates, --device cuda runs, bandwidth per transport. Writes $OUT/gpu-check.md (+ .json)
# when $OUT is set, else docs/gpu-check.md; extra arguments go to benchmarks/gpu_check.py.
#
#   bash jobs/gpu-check.sh --prepare      # on a machine WITH a package index (this one):
#                                         # downloads the mpich wheel into jobs/wheels/
#   bash jobs/gpu-check.sh [ARGS]         # on the GPU machine, as it is (no index)
#   bash jobs/gpu-check.sh --setup-only   # set up MPI, print library and launcher, stop
#
# The GPU machine has python3 with cupy, numpy, numba, h5py and mpi4py, but mpi4py finds
# no MPI library there. This script installs the mpich wheel from jobs/wheels/ (git-ignored:
# the device tool copies it only when the session names it, carry=["jobs/wheels"]) with
# `pip install --no-index --prefix`, points mpi4py at its lib/libmpi.so.12 (MPI4PY_LIBMPI,
# LD_LIBRARY_PATH) and its mpiexec (MPIEXEC, PATH), and prints which MPI library the ranks
# load. Without a wheel, or with GPU_CHECK_MPI=system, it uses the machine's own MPI.
#
# Environment: PYTHON (default python3: the one with cupy), OUT, GPU_WHEELS (default
# jobs/wheels), GPU_PREFIX (default ${TMPDIR:-/tmp}/rpd-gpu-prefix), GPU_CHECK_MPI
# (auto | wheel | system; auto = the wheel when there is one). For --prepare: MPICH_VERSION
# (default: the mpich installed for $PYTHON), GPU_WHEELS_PYTHON_VERSION (default 3.12, the
# GPU machine's), GPU_WHEELS_PLATFORM (default manylinux_2_28_x86_64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
wheels=${GPU_WHEELS:-jobs/wheels}

say() { echo "gpu-check: $*"; }

install_wheel() {  # wheel prefix: pip --no-index, or (no pip) unpack its data files
    if "$python" -m pip --version >/dev/null 2>&1; then
        "$python" -m pip install --disable-pip-version-check --no-index --no-deps \
            --ignore-installed --no-warn-script-location --quiet \
            --find-links "$(dirname "$1")" --prefix "$2" "$1"
        return
    fi
    say "no pip for $python: unpacking the wheel's bin/ and lib/ into $2"
    "$python" - "$1" "$2" <<'PY'
import os, sys, zipfile
wheel, prefix = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        parts = info.filename.split("/")
        if info.is_dir() or len(parts) < 4 or not parts[0].endswith(".data") \
                or parts[1] != "data":
            continue
        dest = os.path.join(prefix, *parts[2:])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
        os.chmod(dest, (info.external_attr >> 16) & 0o777 or 0o644)
PY
}

if [[ "${1:-}" == "--prepare" ]]; then
    version=${MPICH_VERSION:-$("$python" -c \
        'import importlib.metadata as m; print(m.version("mpich"))' 2>/dev/null || true)}
    if [[ -z "$version" ]]; then
        say "no mpich installed for $python; set PYTHON=.venv/bin/python or MPICH_VERSION" >&2
        exit 2
    fi
    mkdir -p "$wheels"
    "$python" -m pip download --disable-pip-version-check --only-binary=:all: --no-deps \
        --python-version "${GPU_WHEELS_PYTHON_VERSION:-3.12}" \
        --platform "${GPU_WHEELS_PLATFORM:-manylinux_2_28_x86_64}" \
        --dest "$wheels" "mpich==$version"
    say "wheels in $wheels: $(cd "$wheels" && ls -- *.whl | tr '\n' ' ')"
    say "pass carry=[\"$wheels\"] to the device tool with: bash jobs/gpu-check.sh"
    exit 0
fi

setup_only=0
if [[ "${1:-}" == "--setup-only" ]]; then
    setup_only=1
    shift
fi

mode=${GPU_CHECK_MPI:-auto}
wheel=$(ls -- "$wheels"/mpich-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
if [[ "$mode" == auto ]]; then
    mode=$([[ -n "$wheel" ]] && echo wheel || echo system)
fi
case "$mode" in
    wheel)
        if [[ -z "$wheel" ]]; then
            say "GPU_CHECK_MPI=wheel but no mpich wheel in $wheels (run --prepare)" >&2
            exit 2
        fi
        prefix=${GPU_PREFIX:-${TMPDIR:-/tmp}/rpd-gpu-prefix}
        mkdir -p "$prefix"
        if [[ ! -e "$prefix/lib/libmpi.so.12" || ! -x "$prefix/bin/mpiexec" ]]; then
            say "installing $(basename "$wheel") into $prefix (no index)"
            install_wheel "$wheel" "$prefix"
        fi
        prefix=$(cd "$prefix" && pwd)
        export GPU_PREFIX=$prefix
        export MPI4PY_LIBMPI=$prefix/lib/libmpi.so.12
        export LD_LIBRARY_PATH=$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        export PATH=$prefix/bin:$PATH
        export MPIEXEC=$prefix/bin/mpiexec
        ;;
    system)
        say "using this machine's MPI (no mpich wheel in $wheels, or GPU_CHECK_MPI=system)"
        ;;
    *)
        say "GPU_CHECK_MPI must be auto, wheel or system (got $mode)" >&2
        exit 2
        ;;
esac

if lib=$("$python" -c 'import mpi4py
mpi4py.rc.initialize = mpi4py.rc.finalize = False    # the library, without MPI_Init
from mpi4py import MPI
print(MPI.Get_library_version().replace(chr(0), "").strip().splitlines()[0])' 2>&1); then
    say "MPI library: $lib (${MPI4PY_LIBMPI:-found by mpi4py itself})"
else
    say "mpi4py cannot load an MPI library; the MPI sections will say so:" >&2
    echo "$lib" | tail -n 3 >&2
fi
say "mpiexec: ${MPIEXEC:-$(command -v mpiexec || echo "none on PATH (gpu_check.py also \
looks beside $python)")}"
if (( setup_only )); then
    exit 0
fi
out=${OUT:+$OUT/gpu-check.md}
exec "$python" benchmarks/gpu_check.py --out "${out:-docs/gpu-check.md}" "$@"
