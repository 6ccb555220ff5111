"""Schedules as data (docs/DESIGN.md 2): the layer every engine reads.

    timeline   the `Timeline` grid of (op, microbatch) per slot and stage
    rules      each family's dependency rules, written once; the 1F1B choice
    generate   generators (PD 1F1B, LocalSGD, GPipe, naive), slot budgets, the validator
    text       the text grid: render, parse (a round trip), the marked cell of an error
    programs   per-stage programs for the MPI ranks' static order
    delays     global delays and local staleness of a timeline's updates; steady state

Imports only `rpd_mpi.records` and numpy: no engine, no MPI, no HDF5.
"""

from rpd_mpi.schedule.generate import generate, timeline_for, validate
from rpd_mpi.schedule.timeline import METHODS, ScheduleError, Timeline

__all__ = ["METHODS", "ScheduleError", "Timeline", "generate", "timeline_for", "validate"]
