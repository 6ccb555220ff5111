"""The package type-checks: `python -m mypy` with pyproject.toml's [tool.mypy] exits 0.

Also checks, on small snippets, that the objective protocols (`rpd_mpi.objectives.protocol`)
accept both objective families and reject a model or stage that breaks the contract.

mypy keeps its incremental cache in the checkout's .mypy_cache/ (git-ignored); a run with a
warm cache takes seconds, a cold one tens of seconds. Skipped when mypy is not installed in
the interpreter's environment (it comes with the `test` extra).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed in this environment "
                                       "(pip install -e '.[test]')")


def _mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=590)


@pytest.mark.timeout(600)
def test_package_type_checks() -> None:
    res = _mypy()
    assert res.returncode == 0, f"mypy found errors:\n{res.stdout}{res.stderr}"


SNIPPET = '''
from __future__ import annotations

from rpd_mpi.objectives import BlockLinearModel, Model, Stage, TrackedModel, build_model
from rpd_mpi.objectives.charlm import CharLM, build_charlm


def models(linear: BlockLinearModel, charlm: CharLM) -> list[Model]:
    tracked: TrackedModel = linear
    stages: list[Stage] = [linear.make_stage(0), charlm.make_stage(0, group=1)]
    del stages
    return [tracked, charlm, build_model("quadratic", 2, dim=4, examples=8, batch_size=2,
                                         seed=0), build_charlm(3)]
'''

BROKEN = '''
from __future__ import annotations

import numpy as np

from rpd_mpi.objectives import Model, Stage, TrackedModel
from rpd_mpi.objectives.charlm import CharLM, CharStage


class NoGradient:
    """A model without full_gradient."""

    name, stages, slices, dim, examples = "x", 1, [slice(0, 1)], 1, 1
    batch_size, num_batches, seed, f_star, L = 1, 1, 0, None, None

    def init_weights(self) -> np.ndarray:
        return np.zeros(1)

    def make_stage(self, s: int, group: int = 0) -> Stage:
        raise NotImplementedError

    def full_objective(self, w: np.ndarray) -> float:
        return 0.0

    def activation_shape(self, s: int) -> tuple[int, ...]:
        return (1,)


def bad(charlm: CharLM, base: CharStage) -> None:
    model: Model = NoGradient()
    stage: Stage = base
    tracked: TrackedModel = charlm
'''


@pytest.mark.timeout(600)
def test_protocols_accept_both_families_and_reject_broken_ones(tmp_path: Path) -> None:
    good, broken = tmp_path / "good.py", tmp_path / "broken.py"
    good.write_text(textwrap.dedent(SNIPPET))
    broken.write_text(textwrap.dedent(BROKEN))
    res = _mypy(str(good))
    assert res.returncode == 0, f"mypy rejected the conforming snippet:\n{res.stdout}"
    res = _mypy(str(broken))
    assert res.returncode == 1, f"mypy accepted the broken snippet:\n{res.stdout}{res.stderr}"
    out = res.stdout
    assert out.count(": error:") == 3, out
    for protocol, missing in (("Model", "full_gradient"), ("Stage", "forward"),
                              ("TrackedModel", "objective_tracker")):
        assert f'variable has type "{protocol}"' in out and missing in out, out
