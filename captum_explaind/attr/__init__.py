"""Captum attribution views of the Exact Path Kernel."""

from ._target import TargetType
from .parameter_influence import ParameterInfluence
from .step_influence import StepInfluence

__all__ = ["ParameterInfluence", "StepInfluence", "TargetType"]
