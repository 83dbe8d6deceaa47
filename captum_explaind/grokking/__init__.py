"""The paper's Grokking study (ExPLAIND Sec. 5): task, analyses, Lasso fit and layer swapping."""

from .task import (
    LAYERS,
    GrokConfig,
    GrokRun,
    History,
    ModAddData,
    ModAddTransformer,
    accuracy,
    build_model,
    load_run,
    make_data,
    make_optimizer,
    train,
)

__all__ = [
    "LAYERS",
    "GrokConfig",
    "GrokRun",
    "History",
    "ModAddData",
    "ModAddTransformer",
    "accuracy",
    "build_model",
    "make_data",
    "make_optimizer",
    "load_run",
    "train",
]
