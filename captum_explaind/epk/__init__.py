"""The Exact Path Kernel core: batches, options, quadrature, optimizer update models, the engine,
and the mathematics of every view (reconstruction, scores, data view, similarity)."""

from .batch import Batch
from .engine import Chunk, ExactPathKernel, Segment
from .layout import ParamLayout
from .options import PRESETS, EPKOptions
from .outputs import default_output_fn
from .quadrature import RULES, quadrature_rule
from .results import DataDecomposition, Reconstruction, ScoreResult, SimilarityResult, SweepStats
from .selection import resolve_groups, resolve_parameters
from .updates import StepCoefficients, UpdateModel
from .views import SweepView, ViewBase

__all__ = [
    "ExactPathKernel",
    "EPKOptions",
    "PRESETS",
    "Batch",
    "default_output_fn",
    "Reconstruction",
    "ScoreResult",
    "DataDecomposition",
    "SimilarityResult",
    "SweepStats",
    "SweepView",
    "ViewBase",
    "ParamLayout",
    "UpdateModel",
    "StepCoefficients",
    "Segment",
    "Chunk",
    "RULES",
    "quadrature_rule",
    "resolve_groups",
    "resolve_parameters",
]
