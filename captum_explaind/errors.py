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
    "InvalidInputError",
    "NonFiniteError",
    "SelectorError",
    "ExplaindWarning",
    "ConvergenceWarning",
    "ModelMismatchWarning",
    "ResidualWarning",
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


# ---------------------------------------------------------------------- analysis-side guards
class InvalidInputError(ExplaindError, ValueError):
    """Inputs (or training data) that the model cannot be called with: wrong feature dimension,
    shape or dtype. The model's own error is chained (``__cause__``) and quoted."""


class NonFiniteError(ExplaindError, ValueError):
    """A test input, a model output or the path integrand is NaN or infinite: no exact
    decomposition exists, and refinement would spend its whole budget on it."""


class SelectorError(ExplaindError, KeyError):
    """A ``layers=``/``parameters=`` selector that names no parameter or module of the model."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class ExplaindWarning(UserWarning):
    """Base class of the warnings of this library (a number is returned, but check it)."""


class ConvergenceWarning(ExplaindWarning, RuntimeWarning):
    """Refinement stopped (``max_depth``/``max_evaluations``) above tolerance for some (step,
    input) pairs; the error left is in the convergence delta."""


class ModelMismatchWarning(ExplaindWarning):
    """The live model's parameters or buffers differ from the recording's last step θ_N (trained
    after the recording ended, or another instance)."""


class ResidualWarning(ExplaindWarning):
    """The data view's residual is large relative to the prediction's change: the replayed
    training gradients do not explain the recorded updates (wrong training set or loss)."""
