"""Per-part cost of the Grokking study on a recorded run, measured on a few steps and extrapolated.

Used by ``benchmarks/grokking.py --profile K`` (the paper's p = 113 run takes hours per figure
with the ``exact`` preset on a 2-core CPU, so its cost is measured on ``K`` steps of each view and
scaled to the steps each view visits on the whole run). Every line says what was timed and how
it was scaled; the extrapolation is a model, not a measurement.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from captum_explaind.attr import ParameterInfluence, PredictionSimilarity, StepInfluence, TrainingDataInfluence
from captum_explaind.grokking import LAYERS, GrokRun
from captum_explaind.grokking.analysis import Stage

__all__ = ["profile_parts", "format_profile"]


def _timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _momentum_reach(beta1: float, tiny: float = torch.finfo(torch.float64).eps * 1e-3) -> int:
    """Steps until a momentum weight β1^k falls below the data view's round-off cut (its accumulators)."""
    import math

    return 0 if beta1 <= 0 else int(math.ceil(math.log(tiny) / math.log(beta1)))


class _Rows(list):
    """A list of result rows that prints each as it is measured (a profile of p = 113 takes minutes)."""

    def append(self, row: Dict[str, Any]) -> None:
        print(f"   {row['part']}: {row['seconds']:.1f} s measured ({row['timed']}); estimate {row['estimate']:,.0f} s",
              flush=True)
        super().append(row)


def profile_parts(run: GrokRun, stages: List[Stage], settings: Any, k: int = 2, at: int = 600) -> List[Dict[str, Any]]:
    """Time each view on ``k`` steps and scale to the whole run.

    Args:
        run (GrokRun): the recorded run. stages (list[Stage]): Fig. 4 / 5's windows.
        settings (StudySettings): the inputs and options of the study to profile.
        k (int): steps timed per view. Default: 2
        at (int): first step timed by the step-indexed views (Fig. 3a). Default: 600

    Returns:
        *list[dict]*: per part: ``part``, ``timed`` (what), ``seconds`` (measured), ``scale`` (how),
        ``estimate`` (seconds for the whole run).
    """
    N, d, o = run.steps, run.data, settings.options
    at = max(1, min(at, N - k + 1))
    rows = _Rows()
    nll = nn.NLLLoss(reduction="none")
    xt, yt = d.test_x[: settings.n_inputs], d.test_y[: settings.n_inputs]

    si = StepInfluence(run.model, run.recorded, o)
    t, _ = _timed(lambda: si.explain(xt, target=yt, window=k, steps=range(at, at + k),
                                     component=["kernel", "regularization"]))
    rows.append(dict(part="Fig. 3a left", timed=f"{len(xt)} predictions, {k} steps", seconds=t,
                     scale=f"× {N}/{k} steps", estimate=t * N / k))
    t1, _ = _timed(lambda: si.explain(xt, target=yt, window=k, steps=range(at, at + k), layers=LAYERS))
    pi = ParameterInfluence(run.model, run.recorded, o)
    nd = min(settings.d_inputs, len(xt))
    t2, _ = _timed(lambda: pi.regularization_influence(xt[:nd], target=yt[:nd], steps=[range(at, at + k)],
                                                       layers=LAYERS))
    rows.append(dict(part="Fig. 3a right", timed=f"Ψ_s: {len(xt)} predictions, {k} steps ({t1:.1f} s); "
                     f"D_s: {nd} predictions ({t2:.1f} s)", seconds=t1 + t2, scale=f"× {N}/{k} steps",
                     estimate=(t1 + t2) * N / k))

    # Fig. 4: one reverse sweep per stage: its width integrated, then back while momentum carries
    # credit (visits: the training side only). The same job as the analysis: per-sample gradients of
    # the layer, the other layers' share from each step's batch gradient.
    x4 = torch.cat([d.test_x[: settings.n_influence], d.train_x[: settings.n_influence]])
    y4 = torch.cat([d.test_y[: settings.n_influence], d.train_y[: settings.n_influence]])
    n_inf = len(x4)
    tdi = TrainingDataInfluence(run.model, run.recorded, d.train_set, loss_fn=nll, options=o)
    groups = {settings.layer: LAYERS[settings.layer]}
    ta, _ = _timed(lambda: tdi.explain(x4, target=y4, layers=groups, steps=range(1, k + 1)))
    tc, _ = _timed(lambda: tdi.explain(x4, target=y4, layers=groups, steps=range(k + 1, k + 2)))
    per_int = ta / k  # steps 1..k: no earlier step to visit
    per_visit = max(tc - per_int, 0.0) / k  # step k+1 integrated (as 1..k on average), steps k..1 visited
    beta1 = float(run.config.betas[0])
    reach = _momentum_reach(beta1)
    n_int = sum(len(st.steps) for st in stages)
    visits = sum(min(st.steps.start - 1, reach) for st in stages)
    rows.append(dict(part="Fig. 4", timed=f"{n_inf} predictions (test + training): steps 1–{k} integrated "
                     f"({ta:.1f} s); step {k + 1} integrated and {k} earlier visited ({tc:.1f} s)",
                     seconds=ta + tc, scale=f"{n_int} integrated × {per_int:.2f} s + {visits} visits × "
                     f"{per_visit:.2f} s (up to {reach} steps of momentum before each stage, β1 = {beta1}); "
                     f"integrated steps timed at the start, where they refine deepest: an upper bound",
                     estimate=n_int * per_int + visits * per_visit))

    # Fig. 5: one forward sweep from step 1 to the last stage's end; the stages' steps integrated
    ns = settings.n_similarity
    ps = PredictionSimilarity(run.model, run.recorded, d.train_set, loss_fn=nll, options=o)
    tv, _ = _timed(lambda: ps.explain(d.test_x[:1], target=d.test_y[:1], layers=LAYERS[settings.layer],
                                      steps=range(k, k + 1)))
    ti, _ = _timed(lambda: ps.explain(d.test_x[:ns], target=d.test_y[:ns], layers=LAYERS[settings.layer],
                                      steps=range(1, k + 1)))
    per_visit = tv / k
    per_integrated = max(ti - per_visit * k, 0.0) / k
    last = max(st.steps.stop - 1 for st in stages)
    n_int = len({s for st in stages for s in st.steps})
    rows.append(dict(part="Fig. 5", timed=f"{k} visited steps of 1 prediction ({tv:.1f} s); {k} integrated steps "
                     f"of {min(ns, len(d.test_x))} predictions ({ti:.1f} s, at the start: an upper bound)", seconds=tv + ti,
                     scale=f"{last} visits × {per_visit:.2f} s + {n_int} integrated × {per_integrated:.2f} s",
                     estimate=last * per_visit + n_int * per_integrated))
    return list(rows)


def format_profile(rows: List[Dict[str, Any]], train_seconds: float) -> str:
    lines = ["| part | timed | measured (s) | scaled by | estimate for the run (s) | × training |",
             "|---|---|---|---|---|---|"]
    total = 0.0
    for r in rows:
        total += r["estimate"]
        lines.append(f"| {r['part']} | {r['timed']} | {r['seconds']:.1f} | {r['scale']} | {r['estimate']:,.0f} | "
                     f"{r['estimate'] / train_seconds:.1f}× |")
    lines.append(f"| **these parts** | | | | **{total:,.0f}** | **{total / train_seconds:.1f}×** |")
    return "\n".join(lines)
