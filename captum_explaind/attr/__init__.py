"""Captum attribution views of the Exact Path Kernel."""

from ._target import TargetType
from .data_influence import DataDecomposition, KMostInfluentialResults, TrainingDataInfluence
from .parameter_influence import ParameterInfluence
from .similarity import PredictionSimilarity
from .step_influence import StepInfluence

__all__ = [
    "ParameterInfluence",
    "StepInfluence",
    "TrainingDataInfluence",
    "PredictionSimilarity",
    "DataDecomposition",
    "KMostInfluentialResults",
    "TargetType",
]
