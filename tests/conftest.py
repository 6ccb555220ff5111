"""Fixtures shared by the serial tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

FAKE_CUPY = Path(__file__).resolve().parent / "fakecupy"


def _drop_cupy() -> None:
    for name in [m for m in sys.modules if m == "cupy" or m.startswith("cupy.")]:
        del sys.modules[name]


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The strict numpy mock of cupy (tests/fakecupy) as `cupy`, for one test only: this
    machine has no GPU, so the GPU-path tests run against it."""
    _drop_cupy()
    monkeypatch.syspath_prepend(str(FAKE_CUPY))
    mod = importlib.import_module("cupy")
    assert mod.MOCK
    yield mod
    _drop_cupy()
