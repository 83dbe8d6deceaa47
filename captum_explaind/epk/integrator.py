r"""Adaptive path integral of one training step, with *measured* error.

For step s the integrand ``g(t) = J_f(θ_{s−1} + tΔ_s) v`` is integrated over [0, 1] by a fixed
rule. Unlike ordinary adaptive quadrature, the exact *total* is known on every sub-interval:
``f(θ(b)) − f(θ(a))`` costs one forward pass. So the error of each (input, interval) pair is
measured, not estimated. Pairs whose error exceeds their share of the tolerance are split and
integrated again — for that input only — until every input's step error is below its tolerance
or ``max_depth`` splits were made.

Kinks of ReLU networks make ``g`` jump inside a step, and every fixed rule then stalls at an
error proportional to the jump times the interval length. Splitting isolates the jump. Any split
point is valid (the identity holds on every sub-interval), so instead of always bisecting, the
split is placed where a single jump would explain the measured total: with ``g_L`` and ``g_R``
the integrand at the outermost nodes and ``I`` the exact total on [a, b],
``I ≈ g_L (τ − a) + g_R (b − τ)`` gives τ by least squares over the outputs. For a smooth
(linear) integrand this is the midpoint; for one kink it lands next to it, so both halves are
nearly smooth and converge at once. Implausible estimates fall back to bisection.

After the first pass every refinement level is evaluated in batched calls whose rows carry their
own parameter point θ(t_row) (see ``StepIntegrand.evaluate`` with a tensor ``t``), so many inputs
refining many different intervals cost a handful of calls per level.

Acceptance, per input i with requested tolerance τ_i and noise floor ν_i (a few ulps of |f|, the
best any computation in this precision can resolve): a pair on [a, b] is final when its error is
≤ τ_i (b − a) + ν_i, or when the errors of input i summed over all its pairs are ≤ τ_i + ν_i.
Everything is accepted at ``max_depth``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Tuple, Union

import torch

from .quadrature import quadrature_rule

__all__ = ["StepIntegrand", "StepStats", "integrate_step"]


class StepIntegrand(Protocol):
    """What a view provides to integrate one step over a chunk of inputs.

    ``rows`` index the chunk's inputs (they may repeat). ``t`` is either one float shared by all
    rows, or a tensor with one parameter point per row. ``evaluate`` returns the integrand (a
    payload tensor with rows first, e.g. jvps [m, T, C] or gradients [m, P]) and the checked
    total it implies [m, C]; ``checked`` returns the checked outputs ``f(θ(t))`` [m, C];
    ``accumulate`` receives the integrated payload of accepted rows.
    """

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor: ...

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None: ...


@dataclass
class StepStats:
    """Outcome of one step's integration for a chunk of inputs.

    Attributes:
        error (Tensor): [m] max over checked outputs of |integrated total − exact change|.
        evaluations (int): integrand evaluation calls (each over any number of rows).
        depth (int): deepest refinement level used.
        unconverged (int): inputs still above tolerance when ``max_depth`` stopped refinement.
    """

    error: torch.Tensor
    evaluations: int
    depth: int
    unconverged: int


def _bcast(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], *([1] * (like.dim() - 1)))


def _split_points(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, g_left: torch.Tensor,
                  g_right: torch.Tensor, bisect: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where to split each rejected pair: at the single-jump estimate, else the midpoint.

    Returns the split points and whether each used the estimate. ``bisect`` forces the midpoint:
    a pair whose estimated split did not settle it is bisected next, which stops the slow creep
    regula falsi shows when the jump sits near one end of the interval.
    """
    h = b - a
    jump = g_left - g_right
    denom = (jump * jump).sum(dim=1)
    num = ((exact - g_right * h.unsqueeze(1)) * jump).sum(dim=1)
    frac = torch.where(denom > 0, num / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.full_like(denom, -1.0))
    # Trust the estimate only well inside the interval; otherwise bisect.
    ok = (frac > 0.02) & (frac < 0.98) & torch.isfinite(frac) & ~bisect
    frac = torch.where(ok, frac, torch.full_like(frac, 0.5))
    return a + frac * h, ok


def integrate_step(
    integrand: StepIntegrand,
    f0: torch.Tensor,
    f1: torch.Tensor,
    *,
    rule: str,
    nodes: int,
    tol: torch.Tensor,
    noise: torch.Tensor,
    control: bool,
    max_depth: int,
    max_rows: int = 1024,
) -> StepStats:
    """Integrate one step for all rows of a chunk, refining where the measured error is too big.

    Args:
        integrand (StepIntegrand): the view's integrand for this step and chunk.
        f0, f1 (Tensor): checked outputs at θ_{s−1} and θ_s, [m, C].
        rule (str), nodes (int): base quadrature rule, applied on every (sub-)interval.
        tol (Tensor): requested per-row tolerance of the whole step, [m].
        noise (Tensor): per-row floating-point noise floor, [m].
        control (bool): refine at all (False: one pass of the base rule).
        max_depth (int): maximum number of refinement levels.
        max_rows (int): rows per batched call during refinement (memory bound).

    Returns:
        *StepStats*
    """
    m, C = f0.shape
    device, dtype = f0.device, f0.dtype
    t_nodes, w_nodes = quadrature_rule(rule, nodes)
    acc_total = torch.zeros_like(f0)
    acc_err = torch.zeros(m, dtype=dtype, device=device)
    evaluations = 0

    # Level 0: one shared parameter point per node, all rows in one call.
    rows = torch.arange(m, device=device)
    contrib = total = g_first = g_last = None
    for q, (t, w) in enumerate(zip(t_nodes, w_nodes)):
        payload, tot = integrand.evaluate(t, rows)
        evaluations += 1
        contrib = payload * w if contrib is None else contrib.add_(payload, alpha=w)
        total = tot * w if total is None else total.add_(tot, alpha=w)
        if q == 0:
            g_first = tot
        if q == len(t_nodes) - 1:
            g_last = tot
    a = torch.zeros(m, dtype=dtype, device=device)
    b = torch.ones(m, dtype=dtype, device=device)
    fa, fb = f0, f1
    estimated = torch.zeros(m, dtype=torch.bool, device=device)
    depth = 0
    unconverged = 0
    while True:
        err = (total - (fb - fa)).abs().amax(dim=1)
        final = (not control) or depth >= max_depth
        if final:
            keep = torch.ones_like(err, dtype=torch.bool)
        else:
            level_err = torch.zeros(m, dtype=dtype, device=device).index_add_(0, rows, err)
            done = (acc_err + level_err) <= tol + noise
            keep = done[rows] | (err <= tol[rows] * (b - a) + noise[rows])
        all_kept = bool(keep.all())
        sel = slice(None) if all_kept else keep
        if bool(keep.any()):
            integrand.accumulate(rows[sel], contrib[sel])
            acc_total.index_add_(0, rows[sel], total[sel])
            acc_err.index_add_(0, rows[sel], err[sel])
        if final and control:
            unconverged = int((acc_err > tol + noise).sum())
        if all_kept:
            break
        rej = ~keep
        r_rows, r_a, r_b = rows[rej], a[rej], b[rej]
        r_fa, r_fb = fa[rej], fb[rej]
        split, used = _split_points(r_a, r_b, r_fb - r_fa, g_first[rej], g_last[rej], estimated[rej])
        f_split = torch.cat([
            integrand.checked(split[i : i + max_rows], r_rows[i : i + max_rows])
            for i in range(0, len(r_rows), max_rows)
        ])
        evaluations += (len(r_rows) + max_rows - 1) // max_rows
        rows = torch.cat([r_rows, r_rows])
        a = torch.cat([r_a, split])
        b = torch.cat([split, r_b])
        fa = torch.cat([r_fa, f_split])
        fb = torch.cat([f_split, r_fb])
        estimated = torch.cat([used, used])
        h = b - a
        contrib = total = g_first = g_last = None
        for q, (t, w) in enumerate(zip(t_nodes, w_nodes)):
            tq = a + h * t
            pieces = [integrand.evaluate(tq[i : i + max_rows], rows[i : i + max_rows]) for i in range(0, len(rows), max_rows)]
            evaluations += len(pieces)
            payload = torch.cat([p for p, _ in pieces])
            tot = torch.cat([t_ for _, t_ in pieces])
            wq = h * w
            contrib = payload * _bcast(wq, payload) if contrib is None else contrib.add_(payload * _bcast(wq, payload))
            total = tot * wq.unsqueeze(1) if total is None else total.add_(tot * wq.unsqueeze(1))
            if q == 0:
                g_first = tot
            if q == len(t_nodes) - 1:
                g_last = tot
        depth += 1
    error = (acc_total - (f1 - f0)).abs().amax(dim=1)
    return StepStats(error=error, evaluations=evaluations, depth=depth, unconverged=unconverged)
