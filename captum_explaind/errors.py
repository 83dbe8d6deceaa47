"""Exceptions raised by captum_explaind.

Each names the problem precisely so that a bad input never turns into a silent wrong number.
"""

from __future__ import annotations

__all__ = [
    "ExplaindError",
    "TrajectoryError",
    "TrajectoryMismatchError",
    "TrajectoryCorruptError",
    "TrajectoryWriteError",
    "UnsupportedOptimizerError",
    "MissingOptimizerStateError",
]


class ExplaindError(Exception):
    """Base class of all errors raised by this library."""


class TrajectoryError(ExplaindError, ValueError):
    """A recorded trajectory cannot be used as asked (missing steps, NaN parameters, ...)."""


class TrajectoryCorruptError(TrajectoryError):
    """A trajectory directory is truncated, corrupted or not a trajectory at all."""


class TrajectoryWriteError(TrajectoryError):
    """A recording failed to write a step; it records nothing more (the run is aborted there)."""


class TrajectoryMismatchError(TrajectoryError):
    """A model does not match the trajectory it is paired with (name, shape or dtype)."""


class UnsupportedOptimizerError(ExplaindError, NotImplementedError):
    """The recorded optimizer has no exact per-sample form (data view only)."""


class MissingOptimizerStateError(TrajectoryError):
    """The trajectory lacks optimizer state that the requested view needs."""
