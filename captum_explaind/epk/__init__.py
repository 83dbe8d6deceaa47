"""The Exact Path Kernel core: quadrature, optimizer update models and the engine."""

from .engine import Chunk, ExactPathKernel, Segment, SweepStats
from .layout import ParamLayout
from .quadrature import RULES, quadrature_rule
from .results import Reconstruction
from .selection import resolve_groups, resolve_parameters
from .updates import StepCoefficients, UpdateModel

__all__ = [
    "ExactPathKernel",
    "Reconstruction",
    "ParamLayout",
    "UpdateModel",
    "StepCoefficients",
    "Segment",
    "Chunk",
    "SweepStats",
    "RULES",
    "quadrature_rule",
    "resolve_groups",
    "resolve_parameters",
]
