"""Captum attribution views of the Exact Path Kernel (Captum-facing parsing and formatting only;
the mathematics is in :mod:`captum_explaind.epk`)."""

from ..epk.results import DataDecomposition, ScoreResult, SimilarityResult
from ..epk.target import TargetType
from .data_influence import KMostInfluentialResults, TrainingDataInfluence
from .parameter_influence import ParameterInfluence
from .similarity import PredictionSimilarity
from .step_influence import StepInfluence

__all__ = [
    "ParameterInfluence",
    "StepInfluence",
    "TrainingDataInfluence",
    "PredictionSimilarity",
    "DataDecomposition",
    "ScoreResult",
    "SimilarityResult",
    "KMostInfluentialResults",
    "TargetType",
]
