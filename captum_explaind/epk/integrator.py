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
split is placed where a single jump would explain the measured total: for each gap between
nodes, the integrand on each side is extrapolated linearly from its nearest nodes and the jump
position τ solving ``∫_a^τ g_L + ∫_τ^b g_R = f(θ(b)) − f(θ(a))`` is found by least squares over
the outputs (:func:`_split_points`). On one kink the estimate converges super-linearly, so both
halves become smooth within a few levels; implausible estimates fall back to bisection.

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

from .kinks import kink_roots
from .quadrature import quadrature_rule

__all__ = ["StepIntegrand", "StepStats", "integrate_step", "KINK_SPLIT_RATIO"]

#: A rejected step whose error exceeds its tolerance by more than this factor is split at all the
#: kinks of its activations at once; closer ones are split at the estimated jump only.
KINK_SPLIT_RATIO = 64.0


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


def _split_points(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, quad: torch.Tensor, g: torch.Tensor,
                  xi: torch.Tensor, bisect: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where to split each rejected pair: at the estimated jump of the integrand, else the midpoint.

    The integrand is known at the interval's ends and at the rule's nodes. For every gap between
    two consecutive known points, the hypothesis "the integrand jumps in this gap" models each
    side by the line through its two nearest known points (a constant if it has only one) and
    solves ``∫_a^τ g_L + ∫_τ^b g_R = exact`` for τ in the gap (Gauss–Newton, least squares over
    the outputs). The hypothesis that explains the exact total best is used when it explains it at
    least twice as well as the rule did; otherwise the pair is bisected. ``bisect`` forces the
    midpoint (a pair whose estimated split did not settle it), which bounds the work of a bad
    estimate by one bisection.

    Args:
        a, b (Tensor): [p] intervals. exact (Tensor): [p, C] exact totals. quad (Tensor): [p, C] the
            rule's totals. g (Tensor): [p, K, C] integrand at the known points. xi (Tensor): [K]
            their positions in [0, 1], ascending, starting at 0 and ending at 1.

    Returns:
        *tuple[Tensor, Tensor]*: split points [p], and whether each came from an estimate.
    """
    p, K, C = g.shape
    h = b - a
    mid = a + 0.5 * h
    tiny = torch.finfo(h.dtype).tiny
    u = h.unsqueeze(1) * xi.unsqueeze(0)  # positions relative to a: [p, K]
    hh = h.unsqueeze(1)
    best_res = torch.full((p,), float("inf"), dtype=h.dtype, device=h.device)
    best_tau = torch.zeros_like(h)
    zero = torch.zeros_like(g[:, 0])
    for q in range(K - 1):  # jump between known points q and q+1
        gl, ul = g[:, q], u[:, q : q + 1]
        gr, ur = g[:, q + 1], u[:, q + 1 : q + 2]
        sl = (g[:, q] - g[:, q - 1]) / (u[:, q : q + 1] - u[:, q - 1 : q]).clamp_min(tiny) if q >= 1 else zero
        sr = (g[:, q + 2] - g[:, q + 1]) / (u[:, q + 2 : q + 3] - u[:, q + 1 : q + 2]).clamp_min(tiny) if q + 2 < K else zero
        # residual r(τ) = ∫_0^τ g_L + ∫_τ^h g_R − exact = A + B τ + C2 τ²  (τ measured from a)
        A = gr * hh + sr * (hh * hh / 2 - ur * hh) - exact
        B = gl - sl * ul - gr + sr * ur
        C2 = (sl - sr) / 2
        lo, hi = u[:, q], u[:, q + 1]
        tau = -(A * B).sum(1) / (B * B).sum(1).clamp_min(tiny)
        tau = torch.minimum(torch.maximum(tau, lo), hi)
        for _ in range(4):
            r = A + B * tau.unsqueeze(1) + C2 * (tau * tau).unsqueeze(1)
            J = B + 2 * C2 * tau.unsqueeze(1)
            tau = tau - (r * J).sum(1) / (J * J).sum(1).clamp_min(tiny)
            tau = torch.minimum(torch.maximum(tau, lo), hi)
        r = A + B * tau.unsqueeze(1) + C2 * (tau * tau).unsqueeze(1)
        res = r.norm(dim=1)
        inside = (tau > lo) & (tau < hi) & torch.isfinite(res)
        better = inside & (res < best_res)
        best_res = torch.where(better, res, best_res)
        best_tau = torch.where(better, tau, best_tau)
    err = (quad - exact).norm(dim=1)
    ok = (best_res < 0.5 * err) & (best_tau > 0) & (best_tau < h) & ~bisect
    return torch.where(ok, a + best_tau, mid), ok


def _kink_cuts(integrand: StepIntegrand, xs: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Kinks of the rows' activations on [0, 1], from forward passes at the points ``xs``.

    Returns the owning pair (index into ``rows``) and position of every kink, and the calls made.
    """
    zs = []
    for x in xs.tolist():
        z = integrand.capture(x, rows)
        if z is None:
            return rows.new_zeros(0), xs.new_zeros(0), len(zs)
        zs.append(z)
    roots = kink_roots(xs, torch.stack(zs, dim=1))
    owner = torch.cat([torch.full((len(r),), i, dtype=torch.long, device=rows.device) for i, r in enumerate(roots)])
    return owner, torch.cat(roots).to(xs.dtype), len(zs)


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
    # Sub-intervals made by refinement are short and (after kink splitting) smooth: two
    # Gauss–Legendre nodes integrate cubics exactly there, and the error check still applies.
    sub_rule = quadrature_rule(rule, min(nodes, 2)) if rule == "gauss" else (t_nodes, w_nodes)
    acc_total = torch.zeros_like(f0)
    acc_err = torch.zeros(m, dtype=dtype, device=device)
    evaluations = 0

    # Level 0: one shared parameter point per node, all rows in one call.
    order = sorted(range(len(t_nodes)), key=lambda q: t_nodes[q])
    xi = torch.tensor([t_nodes[q] for q in order], dtype=dtype, device=device)
    rows = torch.arange(m, device=device)
    contrib = total = None
    gvals = []
    for q in order:
        t, w = t_nodes[q], w_nodes[q]
        payload, tot = integrand.evaluate(t, rows)
        evaluations += 1
        contrib = payload * w if contrib is None else contrib.add_(payload, alpha=w)
        total = tot * w if total is None else total.add_(tot, alpha=w)
        gvals.append(tot)
    g = torch.stack(gvals, dim=1)  # [rows, n, C]
    a = torch.zeros(m, dtype=dtype, device=device)
    b = torch.ones(m, dtype=dtype, device=device)
    fa, fb = f0, f1
    nan = torch.full_like(f0, float("nan"))
    ga, gb = nan, nan.clone()  # integrand at the interval ends; NaN until a pair needs it
    estimated = torch.zeros(m, dtype=torch.bool, device=device)
    ends = torch.cat([xi.new_zeros(1), xi, xi.new_ones(1)])
    sub_xi = torch.tensor(sorted(sub_rule[0]), dtype=dtype, device=device)
    sub_ends = torch.cat([sub_xi.new_zeros(1), sub_xi, sub_xi.new_ones(1)])
    depth = 0
    unconverged = 0

    def batched(fn, t: torch.Tensor, r: torch.Tensor):
        pieces = [fn(t[i : i + max_rows], r[i : i + max_rows]) for i in range(0, len(r), max_rows)]
        return pieces, len(pieces)

    def integrand_at(t: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, int]:
        pieces, calls = batched(integrand.evaluate, t, r)
        return torch.cat([t_ for _, t_ in pieces]), calls

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
        r_fa, r_fb, r_ga, r_gb = fa[rej], fb[rej], ga[rej], gb[rej]
        r_total, r_g, r_est = total[rej], g[rej], estimated[rej]
        cut_owner = cut_t = None
        far = err[rej] > KINK_SPLIT_RATIO * (tol[r_rows] + noise[r_rows])
        if depth == 0 and hasattr(integrand, "capture") and bool(far.any()):
            # First refinement of steps far from their tolerance: split at every kink of the
            # activations at once. Steps that are nearly there take the cheaper jump estimate
            # (resolving every kink would cost more than the few splits they need).
            sub = far.nonzero().squeeze(1)
            cut_owner, cut_t, calls = _kink_cuts(integrand, ends, r_rows[sub])
            cut_owner = sub[cut_owner]
            evaluations += calls
        # Every pair still needs the integrand at its ends for the jump estimate.
        for side, pos in (("a", r_a), ("b", r_b)):
            vals = r_ga if side == "a" else r_gb
            missing = torch.isnan(vals).any(dim=1)
            if bool(missing.any()):
                got, calls = integrand_at(pos[missing], r_rows[missing])
                evaluations += calls
                vals[missing] = got
        if cut_owner is None or cut_owner.numel() == 0:
            known = torch.cat([r_ga.unsqueeze(1), r_g, r_gb.unsqueeze(1)], dim=1)
            split, used = _split_points(r_a, r_b, r_fb - r_fa, r_total, known, ends if depth == 0 else sub_ends, r_est)
            cut_owner = torch.arange(len(r_rows), device=device)
            cut_t = split
            cut_est = used
        else:
            # pairs without a detected kink fall back to the jump estimate
            has = torch.zeros(len(r_rows), dtype=torch.bool, device=device)
            has[cut_owner] = True
            if bool((~has).any()):
                lone = (~has).nonzero().squeeze(1)
                known = torch.cat([r_ga[lone].unsqueeze(1), r_g[lone], r_gb[lone].unsqueeze(1)], dim=1)
                split, _ = _split_points(r_a[lone], r_b[lone], r_fb[lone] - r_fa[lone], r_total[lone], known,
                                         ends if depth == 0 else sub_ends, r_est[lone])
                cut_owner = torch.cat([cut_owner, lone])
                cut_t = torch.cat([cut_t, split])
            cut_est = torch.zeros(len(cut_t), dtype=torch.bool, device=device)
        order_c = torch.argsort(cut_owner.to(dtype) * 4.0 + (cut_t - r_a[cut_owner]) / (r_b - r_a)[cut_owner])
        cut_owner, cut_t, cut_est = cut_owner[order_c], cut_t[order_c], cut_est[order_c]
        pieces, calls = batched(integrand.checked, cut_t, r_rows[cut_owner])
        f_cut = torch.cat(pieces)
        evaluations += calls
        # children: for pair j with cuts c1 < ... < ck, the intervals [a, c1], [c1, c2], ..., [ck, b]
        first = torch.ones_like(cut_owner, dtype=torch.bool)
        first[1:] = cut_owner[1:] != cut_owner[:-1]
        last = torch.ones_like(cut_owner, dtype=torch.bool)
        last[:-1] = cut_owner[1:] != cut_owner[:-1]
        prev_t = torch.where(first, r_a[cut_owner], torch.roll(cut_t, 1))
        prev_f = torch.where(first.unsqueeze(1), r_fa[cut_owner], torch.roll(f_cut, 1, dims=0))
        prev_g = torch.where(first.unsqueeze(1), r_ga[cut_owner], torch.full_like(f_cut, float("nan")))
        tail = cut_owner[last]
        rows = torch.cat([r_rows[cut_owner], r_rows[tail]])
        a = torch.cat([prev_t, cut_t[last]])
        b = torch.cat([cut_t, r_b[tail]])
        fa = torch.cat([prev_f, f_cut[last]])
        fb = torch.cat([f_cut, r_fb[tail]])
        ga = torch.cat([prev_g, torch.full_like(f_cut[last], float("nan"))])
        gb = torch.cat([torch.full_like(f_cut, float("nan")), r_gb[tail]])
        estimated = torch.cat([cut_est, cut_est[last]])
        h = b - a
        contrib = total = None
        gvals = []
        for t, w in zip(*sub_rule):
            tt, wq = a + h * t, h * w
            tots = []
            # accumulate payloads chunk by chunk: a vjp payload is parameter-sized per row, and
            # concatenating every chunk first would hold all of them twice
            for i in range(0, len(rows), max_rows):
                sl = slice(i, i + max_rows)
                payload, tot = integrand.evaluate(tt[sl], rows[sl])
                evaluations += 1
                if contrib is None:
                    contrib = payload.new_zeros((len(rows),) + tuple(payload.shape[1:]))
                contrib[sl].add_(payload * _bcast(wq[sl], payload))
                tots.append(tot)
                del payload
            tot = torch.cat(tots)
            total = tot * wq.unsqueeze(1) if total is None else total.add_(tot * wq.unsqueeze(1))
            gvals.append(tot)
        g = torch.stack(gvals, dim=1)
        depth += 1
    error = (acc_total - (f1 - f0)).abs().amax(dim=1)
    return StepStats(error=error, evaluations=evaluations, depth=depth, unconverged=unconverged)
