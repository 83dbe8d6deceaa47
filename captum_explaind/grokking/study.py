"""The whole Grokking study in one call: train and record, every figure's analysis, timings.

Used by ``python -m captum_explaind.demo`` (small configuration) and ``benchmarks/grokking.py``
(the paper's). Each part is timed; :class:`Study` holds the results, the deltas and the
timings, writes the figures and a text summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..epk import EPKOptions
from .analysis import (
    LayerBalance,
    SampleInfluence,
    SimilarityStages,
    Stage,
    TrainingBalance,
    balances,
    find_stages,
    layer_balance,
    sample_influences,
    similarity_stages,
    training_balance,
)
from .findings import Finding, findings
from .lasso import LassoFit, fit_similarity
from .swap import RetrainResult, SwapResult, retrain_with, swap_layers
from .task import GrokConfig, GrokRun, train

__all__ = ["StudySettings", "Study", "run_study", "PARTS"]

#: the analyses of :func:`run_study`, by their names in ``Study.seconds``
PARTS = ("Fig. 3a left", "Fig. 3a right", "Fig. 4", "Fig. 5", "Fig. 3b swap", "Fig. 7 retrain")


@dataclass
class StudySettings:
    """How much of the run each analysis looks at.

    Attributes:
        window (int): steps per window for Fig. 3a. Default: 50
        stage_width (int): steps per stage window for Fig. 4 / 5. Default: 50
        n_inputs (int): test predictions explained in Fig. 3a (the first ones). Default: 64
        d_inputs (int): of those, how many enter D_s (per-element scores). Default: 16
        n_influence (int): test (and training) predictions in Fig. 4. Default: 64
        n_similarity (int): test predictions in Fig. 5 / Table 2. Default: 96
        layer (str): the layer of Fig. 4 / 5. Default: "decoder"
        options (EPKOptions or str): how the decompositions are computed. Default: "exact"
        retrain (bool): run the retraining experiment (Fig. 7 / 8). Default: True
        retrain_steps (int, optional): step budget per retraining variant.
        skip (tuple[str]): parts not run, by their names in ``Study.seconds`` (``"Fig. 3a left"``,
            ``"Fig. 3a right"``, ``"Fig. 4"``, ``"Fig. 5"`` (and with it Table 2), ``"Fig. 3b swap"``,
            ``"Fig. 7 retrain"``). Default: ()
        stages (list[str], optional): only these of the four stages (by name) in Fig. 4 / 5.
        similarity_horizon (int, optional): Fig. 5's sweeps start this many steps before their
            stages (:func:`~captum_explaind.grokking.analysis.similarity_stages`). Default: None
    """

    window: int = 50
    stage_width: int = 50
    n_inputs: int = 64
    d_inputs: int = 16
    n_influence: int = 64
    n_similarity: int = 96
    layer: str = "decoder"
    options: Union[EPKOptions, str] = "exact"
    retrain: bool = True
    retrain_steps: Optional[int] = None
    skip: Tuple[str, ...] = ()
    similarity_horizon: Optional[int] = None
    stages: Optional[List[str]] = None

    def __post_init__(self) -> None:
        unknown = set(self.skip) - set(PARTS)
        if unknown:
            raise ValueError(f"skip names unknown parts {sorted(unknown)}; the parts are {list(PARTS)}")


@dataclass
class Study:
    """Everything :func:`run_study` produced."""

    run: GrokRun
    settings: StudySettings
    stages: List[Stage]
    balance: Optional[TrainingBalance] = None
    layers: Optional[LayerBalance] = None
    test_influence: Optional[SampleInfluence] = None
    train_influence: Optional[SampleInfluence] = None
    similarity: Optional[SimilarityStages] = None
    lasso: Optional[LassoFit] = None
    swap: Optional[SwapResult] = None
    retrain: Optional[RetrainResult] = None
    seconds: Dict[str, float] = field(default_factory=dict)
    cpu_seconds: Dict[str, float] = field(default_factory=dict)

    def deltas(self) -> Dict[str, float]:
        """Per figure, the largest |change − parts| of its decomposition (the convergence delta)."""
        out: Dict[str, float] = {}
        if self.balance is not None:
            out["Fig. 3a left (kernel + regularization)"] = float(self.balance.delta.abs().max())
        if self.layers is not None:
            out["Fig. 3a right (six layers)"] = float(self.layers.delta.abs().max())
        for name, r in (("Fig. 4, test predictions", self.test_influence),
                        ("Fig. 4, training predictions", self.train_influence)):
            if r is not None:
                out[name] = float(r.delta.abs().max())
                out[name + " (update residual)"] = float(r.residual.abs().max())
        if self.similarity is not None:
            out["Fig. 5 (largest per-step quadrature error)"] = max(self.similarity.max_step_error)
            if any(self.similarity.truncation):
                out["Fig. 5 (bound on the momentum dropped by the late start)"] = max(self.similarity.truncation)
        return out

    def relative_deltas(self) -> Dict[str, float]:
        """Per decomposition, largest |delta| over the largest |change| it decomposes (0 = exact)."""
        out: Dict[str, float] = {}
        pairs = [("Fig. 3a left (kernel + regularization)", self.balance),
                 ("Fig. 3a right (six layers)", self.layers),
                 ("Fig. 4, test predictions", self.test_influence),
                 ("Fig. 4, training predictions", self.train_influence)]
        for name, r in pairs:
            if r is not None:
                out[name] = float(r.delta.abs().max()) / max(float(r.change.abs().max()), 1e-300)
        return out

    def findings(self) -> List[Finding]:
        return findings(self.run, self.balance, self.layers, self.test_influence, self.lasso, self.swap, self.retrain)

    def save_figures(self, folder: Union[str, os.PathLike]) -> List[Path]:
        """Write every figure as PNG into ``folder``; returns the paths."""
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        figs: Dict[str, Any] = {}
        if self.balance is not None:
            figs["fig3a_left_accuracy_and_balance"] = self.balance.plot()
        if self.layers is not None:
            figs["fig3a_right_layers"] = self.layers.plot()
        for tag, r in (("test", self.test_influence), ("train", self.train_influence)):
            if r is not None:
                figs[f"fig4_{tag}_by_sum"] = r.plot(by="sum")
                figs[f"fig4_{tag}_by_mod"] = r.plot(by="mod")
        if self.similarity is not None:
            figs["fig5_similarity_by_sum"] = self.similarity.plot(by="sum")
            figs["fig5_similarity_by_mod"] = self.similarity.plot(by="mod")
        if self.lasso is not None:
            figs["fig9_lasso"] = self.lasso.plot()
        if self.swap is not None:
            figs["fig3b_layer_swap"] = self.swap.plot()
        if self.retrain is not None:
            figs["fig7_retraining"] = self.retrain.plot()
        paths = []
        for name, (fig, _) in figs.items():
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
        return paths


def _timed(study: Study, name: str, fn: Any, verbose: bool) -> Any:
    start, cpu = time.perf_counter(), time.process_time()
    if verbose:
        print(f"-> {name} ...", flush=True)
    out = fn()
    study.seconds[name] = time.perf_counter() - start
    study.cpu_seconds[name] = time.process_time() - cpu  # this process only: robust to other jobs' load
    if verbose:
        print(f"   {name}: {study.seconds[name]:.1f} s (CPU {study.cpu_seconds[name]:.1f} s)", flush=True)
    return out


def run_study(path: Union[str, os.PathLike], config: GrokConfig, settings: Optional[StudySettings] = None,
              *, device: Union[str, torch.device] = "cpu", verbose: bool = True,
              run: Optional[GrokRun] = None) -> Study:
    """Train and record ``config``, then run every figure's analysis with ``settings``.

    Args:
        path (str or os.PathLike): trajectory directory.
        config (GrokConfig): the task and training. settings (StudySettings, optional): analyses.
        device (str or torch.device): where to train and compute. Default: "cpu"
        verbose (bool): progress bars and a line per part. Default: True
        run (GrokRun, optional): analyse this recorded run instead of training (``path`` and
            ``config`` are then unused; ``"training"`` is ``run.train_seconds``, the time measured
            when it was recorded). Default: None

    Returns:
        *Study* (``study.seconds`` holds each part's wall time; ``"training"`` the training's)
    """
    st = settings or StudySettings()
    start, cpu = time.perf_counter(), time.process_time()
    if run is None:
        run = train(path, config, device=device, show_progress=verbose)
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    else:
        train_seconds, train_cpu = run.train_seconds, float("nan")
    stages = find_stages(run, st.stage_width)
    if st.stages is not None:
        unknown = set(st.stages) - {s.name for s in stages}
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; the stages are {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in st.stages]
    study = Study(run=run, settings=st, stages=stages)
    study.seconds["training"] = train_seconds
    study.cpu_seconds["training"] = train_cpu
    opts: Dict[str, Any] = {"show_progress": verbose, "device": device}
    d = run.data
    xt, yt = d.test_x[: st.n_inputs], d.test_y[: st.n_inputs]
    if "Fig. 3a left" not in st.skip and "Fig. 3a right" not in st.skip:
        study.balance, study.layers = _timed(study, "Fig. 3a", lambda: balances(
            run, xt, yt, st.window, d_inputs=st.d_inputs, options=st.options, **opts), verbose)
    elif "Fig. 3a left" not in st.skip:
        study.balance = _timed(study, "Fig. 3a left", lambda: training_balance(
            run, xt, yt, st.window, st.options, **opts), verbose)
    elif "Fig. 3a right" not in st.skip:
        study.layers = _timed(study, "Fig. 3a right", lambda: layer_balance(
            run, xt, yt, st.window, d_inputs=st.d_inputs, options=st.options, **opts), verbose)
    if "Fig. 4" not in st.skip:
        sets = {"test": (d.test_x[: st.n_influence], d.test_y[: st.n_influence]),
                "train": (d.train_x[: st.n_influence], d.train_y[: st.n_influence])}
        influence = _timed(study, "Fig. 4", lambda: sample_influences(
            run, sets, study.stages, st.layer, st.options, **opts), verbose)
        study.test_influence, study.train_influence = influence["test"], influence["train"]
    if "Fig. 5" not in st.skip:
        xs, ys = d.test_x[: st.n_similarity], d.test_y[: st.n_similarity]
        study.similarity = _timed(study, "Fig. 5", lambda: similarity_stages(
            run, xs, ys, study.stages, st.layer, st.options, horizon=st.similarity_horizon, **opts), verbose)
        sim = study.similarity
        study.lasso = _timed(study, "Table 2", lambda: fit_similarity(sim.similarity[-1], sim.sums, d.p), verbose)
    if "Fig. 3b swap" not in st.skip:
        study.swap = _timed(study, "Fig. 3b swap", lambda: swap_layers(run, show_progress=verbose), verbose)
    if st.retrain and "Fig. 7 retrain" not in st.skip:
        study.retrain = _timed(study, "Fig. 7 retrain", lambda: retrain_with(
            run, max_steps=st.retrain_steps, show_progress=verbose, device=device), verbose)
    return study
