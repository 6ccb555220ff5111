"""Objectives split into pipeline stages; today the block-linear toys of DESIGN.md section 3.

Importing does no work.
"""

from rpd_mpi.objectives.linear import BlockLinearModel, StageModule, build_model

__all__ = ["BlockLinearModel", "StageModule", "build_model"]
