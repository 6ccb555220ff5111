#!/usr/bin/env bash
# The prepared GPU check of issue 6 (docs/GPU.md): gradient check on cupy, --device cuda runs,
# bandwidth per transport. Writes $OUT/gpu-check.md (+ .json) when $OUT is set, else
# docs/gpu-check.md. PYTHON picks the interpreter that has cupy (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:+$OUT/gpu-check.md}
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${out:-docs/gpu-check.md}" "$@"
