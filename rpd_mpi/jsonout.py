"""Strict JSON for every `--json` output: NaN and +-inf become null (RFC 8259 has no
non-finite numbers, and JSON.parse rejects Python's NaN/Infinity), numpy scalars and arrays
become plain values. A summary's `status` says why a value is missing (e.g. "diverged")."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """`value` with numpy types unwrapped and non-finite floats replaced by None."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps that never writes NaN/Infinity (raises instead of emitting invalid JSON)."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)
