"""Recording a training run: the recorder (write side) and the on-disk trajectory (read side)."""

from .format import MicroBatch, StepRecord
from .recorder import TrajectoryRecorder
from .trajectory import ParamSpec, StepData, Trajectory

__all__ = ["TrajectoryRecorder", "Trajectory", "ParamSpec", "StepData", "StepRecord", "MicroBatch"]
