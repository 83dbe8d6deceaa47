"""captum_explaind: exact path-kernel (ExPLAIND) attribution as a Captum plugin.

A model trained by gradient descent is rewritten exactly as a sum over its training steps,
parameters and training samples. Record the run with :class:`TrajectoryRecorder`, then explain
predictions with :class:`ExactPathKernel` and the attribution views.
"""

from ._compat import install_torchvision_import_hook as _install_torchvision_import_hook

# Normally already active from interpreter start (the .pth file this package installs); lazy,
# imports nothing, and only acts if a later `import torchvision` fails (see _compat).
_install_torchvision_import_hook()

__version__ = "0.1.0"

# E402 on purpose: the package's own imports below pull in torch (and, through it, possibly
# torchvision), so they must come after the hook activation above.
from .attr import (  # noqa: E402
    ParameterInfluence,
    PredictionSimilarity,
    StepInfluence,
    TrainingDataInfluence,
)
from .epk import (  # noqa: E402
    DataDecomposition,
    EPKOptions,
    ExactPathKernel,
    Reconstruction,
    ScoreResult,
    SimilarityResult,
    SweepStats,
)
from .errors import (  # noqa: E402
    ConvergenceWarning,
    ExplaindError,
    ExplaindWarning,
    InvalidInputError,
    MissingOptimizerStateError,
    ModelMismatchWarning,
    NonFiniteError,
    ResidualWarning,
    SelectorError,
    TrajectoryCorruptError,
    TrajectoryError,
    TrajectoryMismatchError,
    TrajectoryWriteError,
    UnsupportedOptimizerError,
)
from .recording import Trajectory, TrajectoryRecorder  # noqa: E402

__all__ = [
    "TrajectoryRecorder",
    "Trajectory",
    "ExactPathKernel",
    "EPKOptions",
    "Reconstruction",
    "ScoreResult",
    "DataDecomposition",
    "SimilarityResult",
    "SweepStats",
    "ParameterInfluence",
    "StepInfluence",
    "TrainingDataInfluence",
    "PredictionSimilarity",
    "ExplaindError",
    "TrajectoryError",
    "TrajectoryCorruptError",
    "TrajectoryWriteError",
    "TrajectoryMismatchError",
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
