"""Result rows of the data-view benchmark (:mod:`benchmarks.data_view`) and their markdown tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from benchmarks.reconstruct import Policy, fmt_mem


# ----------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One line of a result table (times in s; all inputs unless ``n_inputs`` says otherwise)."""

    run: str
    method: str
    setting: str
    seconds: float  # measured wall time of what ran
    n_inputs: int
    steps: int  # steps whose time is in ``seconds`` (prefix runs: fewer than the run's)
    peak_rss: Optional[int]
    foreign: Optional[float]
    est_seconds: Optional[float] = None  # extrapolated to all inputs and steps, when not measured
    est_note: str = ""
    peak_note: str = ""
    metrics: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    scores: Optional[torch.Tensor] = None  # [n_inputs, n_train], positive = pushes the label output up

    @property
    def total_seconds(self) -> float:
        """Time for all inputs and all steps (measured, or extrapolated when ``est_seconds``)."""
        return self.seconds if self.est_seconds is None else self.est_seconds


@dataclass
class SizeRow:
    n_train: int
    steps: int
    ours: Optional[Row] = None
    tracin: Optional[Row] = None
    peer_peak: Optional[int] = None
    peer_per_step: Optional[float] = None
    peer_steps: int = 0



# ----------------------------------------------------------------------------- agreement
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def mean_row_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over test inputs of the correlation of their per-training-sample scores."""
    return sum(pearson(a[i], b[i]) for i in range(a.shape[0])) / a.shape[0]


# ----------------------------------------------------------------------------- reporting
def fmt_s(v: Optional[float]) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.3f}"


def fmt_load(f: Optional[float], policy: Policy) -> str:
    if f is None:
        return "n/a"
    return f"{100 * f:.0f}%" + (" ⚠" if policy.contended(f) else "")


def row_inputs(row: Row, n_all: int) -> str:
    return f"{row.n_inputs}" + ("" if row.n_inputs == n_all else f" of {n_all}")


def per_step(row: Row, N: int) -> float:
    return row.total_seconds / N


def render_main(rows: List[Row], n_all: int, N: int, policy: Policy) -> str:
    head = ("| run | method | setting | inputs timed | time (s) | time per step (s) | peak mem (RSS increase) | "
            "max\\|delta\\| | max\\|residual\\| | completeness error | CPU used by others |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r.est_seconds is not None:
            t = f"{fmt_s(r.est_seconds)} (extrapolated; measured {fmt_s(r.seconds)} on {r.steps} steps)"
            if r.n_inputs != n_all and r.method.startswith("captum"):
                t = f"{fmt_s(r.est_seconds)} (extrapolated ×{n_all / r.n_inputs:.3g}; measured {fmt_s(r.seconds)})"
        else:
            t = fmt_s(r.seconds)
        mem = fmt_mem(r.peak_rss) + (f" {r.peak_note}" if r.peak_note else "")
        m = r.metrics
        d = f"{m['delta']:.2e}" if "delta" in m else "–"
        res = f"{m['residual']:.2e}" if "residual" in m else "–"
        comp = f"{m['completeness']:.1e}" if "completeness" in m else "–"
        if "their_change_error" in m:
            d = f"{m['their_change_error']:.2e} (its f(θ_N) error)"
        lines.append(f"| {r.run} | {r.method} | {r.setting} | {row_inputs(r, n_all)} | {t} | {fmt_s(per_step(r, N))} | "
                     f"{mem} | {d} | {res} | {comp} | {fmt_load(r.foreign, policy)} |")
    return "\n".join(lines)


def render_ratios(by_run: Dict[str, List[Row]], N: int) -> str:
    head = ("| run | our setting | ours s/step (all inputs) | TracInCP s/checkpoint | ours ÷ TracInCP per step "
            "(target ≤ 2×) | peak mem ours / TracInCP | explaind s/step | explaind ÷ ours time | "
            "peak mem explaind / ours |")
    lines = [head, "|" + "---|" * 9]
    for name, rows in by_run.items():
        tracin = next((r for r in rows if r.method == "Captum TracInCP"), None)
        peer = next((r for r in rows if r.method.startswith("explaind")), None)
        for r in rows:
            if not r.method.startswith("captum"):
                continue
            ours_ps = per_step(r, N)
            tr = "–" if tracin is None else fmt_s(per_step(tracin, N))
            ratio = "–" if tracin is None else f"{ours_ps / per_step(tracin, N):.2f}×"
            mem = "–" if tracin is None else f"{fmt_mem(r.peak_rss)} / {fmt_mem(tracin.peak_rss)}"
            pe = "–" if peer is None else fmt_s(per_step(peer, N))
            pr = "–" if peer is None else f"{per_step(peer, N) / ours_ps:.1f}×"
            pm = "–" if peer is None or not r.peak_rss or peer.peak_rss is None else \
                f"{fmt_mem(peer.peak_rss)} / {fmt_mem(r.peak_rss)} = {peer.peak_rss / r.peak_rss:.1f}×"
            tag = "" if r.est_seconds is None else " (extrapolated)"
            lines.append(f"| {name} | {r.setting} | {fmt_s(ours_ps)}{tag} | {tr} | {ratio} | {mem} | {pe} | {pr} | {pm} |")
    return "\n".join(lines)


def render_agreement(by_run: Dict[str, List[Row]]) -> str:
    head = ("| run | ours | compared with | inputs | Pearson (all pairs) | mean per-input Pearson | "
            "max\\|diff\\| / max\\|ours\\| |")
    lines = [head, "|" + "---|" * 7]
    for name, rows in by_run.items():
        # train_batch_size only chunks the same computation: compared with its twin in the notes
        ours = [r for r in rows if r.method.startswith("captum") and r.scores is not None
                and "train_batch_size" not in r.setting]
        exact = next((r for r in ours if r.setting.startswith("exact")), None)
        others = [r for r in rows if not r.method.startswith("captum") and r.scores is not None]
        pairs = [(o, other) for other in others for o in ours]
        if exact is not None:
            pairs += [(exact, o) for o in ours if o is not exact]
        for a, b in pairs:
            k = min(a.scores.shape[0], b.scores.shape[0])
            sa, sb = a.scores[:k], b.scores[:k]
            rel = float((sa - sb).abs().max() / sa.abs().max().clamp_min(1e-300))
            who = b.setting if b.method.startswith("captum") else f"{b.method} ({b.setting})"
            lines.append(f"| {name} | {a.setting} | {who} | {k} | {pearson(sa, sb):.4f} | "
                         f"{mean_row_pearson(sa, sb):.4f} | {rel:.2e} |")
    return "\n".join(lines)


def render_sizes(rows: List[SizeRow], tbs: int, n_test: int, P: int, policy: Policy) -> str:
    head = (f"| n_train | steps | ours peak mem (left-1, float64, train_batch_size={tbs}) | ours s/step | "
            f"TracInCP peak mem (batch_size={tbs}) | TracInCP s/checkpoint | explaind peak mem | explaind s/step | "
            "explaind per-sample buffer n_train × P × 4 B |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ours = r.ours
        tr = r.tracin
        buf = r.n_train * P * 4
        lines.append(
            f"| {r.n_train} | {r.steps} | {fmt_mem(ours.peak_rss) if ours else '–'} | "
            f"{fmt_s(ours.seconds / r.steps) if ours else '–'} | "
            f"{fmt_mem(tr.peak_rss) if tr else '–'} | {fmt_s(tr.seconds / r.steps) if tr else '–'} | "
            f"{fmt_mem(r.peer_peak) + f' ({r.peer_steps}-step prefix)' if r.peer_steps else '–'} | "
            f"{fmt_s(r.peer_per_step) if r.peer_steps else '–'} | {buf / 2**20:.0f} MiB |")
    return "\n".join(lines)
