"""Objectives split into pipeline stages: the block-linear toys of docs/DESIGN.md 3 and the
character LM (`charlm`), both satisfying the `Model`/`Stage` protocols of `protocol`.

Importing does no work.
"""

from rpd_mpi.objectives.linear import BlockLinearModel, StageModule, build_model
from rpd_mpi.objectives.protocol import Model, Stage, TrackedModel, Tracker

__all__ = ["BlockLinearModel", "Model", "Stage", "StageModule", "TrackedModel", "Tracker",
           "build_model"]
