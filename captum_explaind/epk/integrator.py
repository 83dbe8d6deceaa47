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
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple, Union, cast

import torch

from .checks import check_integrand
from .kinks import kink_roots
from .quadrature import quadrature_rule

__all__ = ["StepIntegrand", "StepStats", "integrate_step", "KINK_SPLIT_RATIO", "RULE_NODES"]

#: A rejected step whose error exceeds its tolerance by more than this factor is split at all the
#: kinks of its activations at once; closer ones are split at the estimated jump only.
KINK_SPLIT_RATIO = 64.0

#: The most nodes of a rule one ``evaluate_rule`` call takes: each node's activations are held at
#: once inside every row's evaluation (the memory plan counts this many per row).
RULE_NODES = 8


class StepIntegrand(Protocol):
    """What a view provides to integrate one step over a chunk of inputs.

    ``rows`` index the chunk's inputs (they may repeat). ``t`` is either one float shared by all
    rows, or a tensor with one parameter point per row. ``evaluate`` returns the integrand (a
    payload tensor with rows first, e.g. jvps [m, T, C] or gradients [m, P]) and the checked
    total it implies [m, C]; ``checked`` returns the checked outputs ``f(θ(t))`` [m, C];
    ``accumulate`` receives the integrated payload of accepted rows. An integrand may also offer
    ``evaluate_rule(t, w, rows)`` (``t``, ``w``: [m, K] nodes and weights per row): the weighted
    payload sum over the nodes and the totals at each node [m, K, C] at once, or None; the
    integrator then never holds a payload per node (:func:`_rule_at_once`).
    """

    def evaluate(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def checked(self, t: Union[float, torch.Tensor], rows: torch.Tensor) -> torch.Tensor: ...

    def accumulate(self, rows: torch.Tensor, payload: torch.Tensor) -> None: ...


@dataclass
class StepStats:
    """Outcome of one step's integration for a chunk of inputs.

    Attributes:
        error (Tensor): [m] max over checked outputs of |integrated total − exact change|.
        evaluations (int): integrand evaluation calls (each over any number of rows; a rule
            evaluated at once counts one per node).
        depth (int): deepest refinement level used.
        unconverged (int): inputs still above tolerance when ``max_depth`` stopped refinement.
        unconverged_rows (Tensor, optional): which rows of the chunk they are.
    """

    error: torch.Tensor
    evaluations: int
    depth: int
    unconverged: int
    unconverged_rows: Optional[torch.Tensor] = None


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
        sr = ((g[:, q + 2] - g[:, q + 1]) / (u[:, q + 2 : q + 3] - u[:, q + 1 : q + 2]).clamp_min(tiny)
              if q + 2 < K else zero)
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


class _CapturingIntegrand(StepIntegrand, Protocol):
    """An integrand that can also report its pre-activations (optional: enables kink splitting).

    ``capture`` returns the activations' inputs at ``θ(t)`` for the rows [m, units], or None
    when the model has no piecewise-linear activation to split at.
    """

    def capture(self, t: float, rows: torch.Tensor) -> Optional[torch.Tensor]: ...


def _kink_cuts(integrand: _CapturingIntegrand, xs: torch.Tensor,
               rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Kinks of the rows' activations on [0, 1], from forward passes at the points ``xs``.

    Returns the owning pair (index into ``rows``) and position of every kink, and the calls made.
    """
    zs: List[torch.Tensor] = []
    for x in xs.tolist():
        z = integrand.capture(x, rows)
        if z is None:
            return rows.new_zeros(0), xs.new_zeros(0), len(zs)
        zs.append(z)
    roots = kink_roots(xs, torch.stack(zs, dim=1))
    owner = torch.cat([torch.full((len(r),), i, dtype=torch.long, device=rows.device) for i, r in enumerate(roots)])
    return owner, torch.cat(roots).to(xs.dtype), len(zs)


@dataclass
class _Pairs:
    """The (input row, sub-interval) pairs of one refinement level and what is known at their ends.

    Attributes:
        rows (Tensor): [p] the chunk input each pair belongs to (an input may own many pairs).
        a, b (Tensor): [p] the pair's interval [a, b] of the step's path parameter.
        fa, fb (Tensor): [p, C] checked outputs ``f(θ(a))``, ``f(θ(b))``.
        ga, gb (Tensor): [p, C] integrand totals at a and b; NaN where not evaluated yet.
        estimated (Tensor): [p] bool, whether the split that made the pair came from a jump
            estimate (such a pair is bisected if it is rejected again).
    """

    rows: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    fa: torch.Tensor
    fb: torch.Tensor
    ga: torch.Tensor
    gb: torch.Tensor
    estimated: torch.Tensor

    @classmethod
    def whole_step(cls, rows: torch.Tensor, f0: torch.Tensor, f1: torch.Tensor) -> "_Pairs":
        """One pair per row on [0, 1], with the checked outputs ``f0``, ``f1`` at its ends."""
        m = len(rows)
        nan = torch.full_like(f0, float("nan"))
        return cls(
            rows=rows,
            a=torch.zeros(m, dtype=f0.dtype, device=f0.device),
            b=torch.ones(m, dtype=f0.dtype, device=f0.device),
            fa=f0,
            fb=f1,
            ga=nan,  # integrand at the interval ends; NaN until a pair needs it
            gb=nan.clone(),
            estimated=torch.zeros(m, dtype=torch.bool, device=f0.device),
        )

    def select(self, mask: torch.Tensor) -> "_Pairs":
        """The pairs where ``mask`` (bool, [p]) is set, as copies."""
        return _Pairs(
            rows=self.rows[mask], a=self.a[mask], b=self.b[mask], fa=self.fa[mask], fb=self.fb[mask],
            ga=self.ga[mask], gb=self.gb[mask], estimated=self.estimated[mask],
        )


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], Any], t: torch.Tensor, rows: torch.Tensor,
             max_rows: int) -> Tuple[List[Any], int]:
    """``fn(t, rows)`` in slices of at most ``max_rows`` rows: the pieces, and the calls made."""
    pieces = [fn(t[i : i + max_rows], rows[i : i + max_rows]) for i in range(0, len(rows), max_rows)]
    return pieces, len(pieces)


def _totals_at(integrand: StepIntegrand, t: torch.Tensor, rows: torch.Tensor,
               max_rows: int) -> Tuple[torch.Tensor, int]:
    """The integrand's checked totals at one point per row [p, C] (payloads dropped), and the calls."""
    pieces, calls = _batched(integrand.evaluate, t, rows, max_rows)
    return torch.cat([t_ for _, t_ in pieces]), calls


def _known_points(t_nodes: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Positions in [0, 1] where a pair knows its integrand: 0, the rule's nodes ascending, 1."""
    xi = torch.tensor(sorted(t_nodes), dtype=dtype, device=device)
    return torch.cat([xi.new_zeros(1), xi, xi.new_ones(1)])


def _base_pass(integrand: StepIntegrand, t_nodes: Sequence[float], w_nodes: Sequence[float],
               rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Level 0: the base rule on [0, 1] for every row (one shared point per node).

    Returns:
        *tuple*: integrated payload, integrated total [m, C], the totals at the nodes in ascending
        order [m, n, C], and the node evaluations made.
    """
    order = sorted(range(len(t_nodes)), key=lambda q: t_nodes[q])
    like = torch.zeros((), dtype=torch.float64, device=rows.device)
    t = like.new_tensor([t_nodes[q] for q in order]).expand(len(rows), -1)
    w = like.new_tensor([w_nodes[q] for q in order]).expand(len(rows), -1)
    at_once = _rule_at_once(integrand, t, w, rows)
    if at_once is not None:
        summed, g = at_once
        return summed, (g * _bcast_nodes(w, g)).sum(dim=1), g, len(order)
    contrib: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None
    gvals = []
    for q in order:
        tq, wq = t_nodes[q], w_nodes[q]
        payload, tot = integrand.evaluate(tq, rows)
        contrib = payload * wq if contrib is None else contrib.add_(payload, alpha=wq)
        total = tot * wq if total is None else total.add_(tot, alpha=wq)
        gvals.append(tot)
    assert contrib is not None and total is not None  # a rule has at least one node
    return contrib, total, torch.stack(gvals, dim=1), len(order)


def _bcast_nodes(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Weights [p, K] against node totals [p, K, C]."""
    return w.to(g.dtype).unsqueeze(2)


def _rule_at_once(integrand: StepIntegrand, t: torch.Tensor, w: torch.Tensor, rows: torch.Tensor
                  ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The integrand's whole rule per row in calls of at most :data:`RULE_NODES` nodes, where it
    offers that (``evaluate_rule``: a per-row parameter-sized payload written once per call, not
    once per node): ``(Σ_j w_rj payload(t_rj) [p, ...], node totals [p, K, C])``, else None."""
    rule = getattr(integrand, "evaluate_rule", None)
    if rule is None:
        return None
    payload: Optional[torch.Tensor] = None
    totals = []
    for j in range(0, t.shape[1], RULE_NODES):
        got = rule(t[:, j : j + RULE_NODES], w[:, j : j + RULE_NODES], rows)
        if got is None:
            return None  # (decided on the first call: the integrand evaluates node by node)
        payload = got[0] if payload is None else payload.add_(got[0])
        totals.append(got[1])
    assert payload is not None  # a rule has at least one node
    return payload, torch.cat(totals, dim=1)


def _sub_pass(integrand: StepIntegrand, pairs: _Pairs, sub_rule: Tuple[Sequence[float], Sequence[float]],
              max_rows: int) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, int]:
    """A refinement level: the sub-rule on every pair's own interval, in batched calls.

    The integrated payload is held only for a level of at most ``max_rows`` pairs: a vjp payload
    is parameter-sized per pair, and a level of many pairs (a ResNet's kinks) would hold one
    parameter vector each. For more pairs it is ``None`` and :func:`_payload_kept` recomputes the
    accepted pairs' payloads in slices of ``max_rows`` once they are known.

    Returns:
        *tuple*: integrated payload (or None), integrated total [p, C], the totals at the nodes
        [p, n, C] (in the rule's node order), and the calls made.
    """
    a, rows = pairs.a, pairs.rows
    h = pairs.b - a
    hold = len(rows) <= max_rows
    at_once = _sub_rule_at_once(integrand, pairs, sub_rule, max_rows, hold)
    if at_once is not None:
        return at_once
    contrib: Optional[torch.Tensor] = None
    total: Optional[torch.Tensor] = None
    gvals = []
    calls = 0
    for t, w in zip(*sub_rule):
        tt, wq = a + h * t, h * w
        tots = []
        # accumulate payloads chunk by chunk: a vjp payload is parameter-sized per row, and
        # concatenating every chunk first would hold all of them twice
        for i in range(0, len(rows), max_rows):
            sl = slice(i, i + max_rows)
            payload, tot = integrand.evaluate(tt[sl], rows[sl])
            calls += 1
            if hold:
                if contrib is None:
                    contrib = payload.new_zeros((len(rows),) + tuple(payload.shape[1:]))
                contrib[sl].add_(payload * _bcast(wq[sl], payload))
            tots.append(tot)
            del payload
        tot = torch.cat(tots)
        total = tot * wq.unsqueeze(1) if total is None else total.add_(tot * wq.unsqueeze(1))
        gvals.append(tot)
    assert total is not None and (contrib is not None or not hold)  # a rule has a node, a rejected pair a child
    return contrib, total, torch.stack(gvals, dim=1), calls


_Level = Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, int]


def _sub_rule_at_once(integrand: StepIntegrand, pairs: _Pairs, sub_rule: Tuple[Sequence[float], Sequence[float]],
                      max_rows: int, hold: bool) -> Optional[_Level]:
    """:func:`_sub_pass` by :func:`_rule_at_once`, in slices of ``max_rows`` pairs (None where the
    integrand evaluates node by node); the node evaluations are counted as node by node."""
    a, rows = pairs.a, pairs.rows
    h = (pairs.b - a).unsqueeze(1)
    t_q, w_q = a.new_tensor(list(sub_rule[0])), a.new_tensor(list(sub_rule[1]))
    contrib: Optional[torch.Tensor] = None
    gs = []
    for i in range(0, len(rows), max_rows):
        sl = slice(i, i + max_rows)
        got = _rule_at_once(integrand, a[sl].unsqueeze(1) + h[sl] * t_q, h[sl] * w_q, rows[sl])
        if got is None:
            return None
        if hold:
            if contrib is None:
                contrib = got[0].new_empty((len(rows),) + tuple(got[0].shape[1:]))
            contrib[sl] = got[0]
        gs.append(got[1])
        del got
    g = torch.cat(gs)
    total = (g * _bcast_nodes(h * w_q, g)).sum(dim=1)
    calls = len(sub_rule[0]) * len(gs)
    return (contrib if hold else None), total, g, calls


def _payload_kept(integrand: StepIntegrand, pairs: _Pairs, keep: torch.Tensor,
                  sub_rule: Tuple[Sequence[float], Sequence[float]], max_rows: int) -> int:
    """The accepted pairs' integrated payload, recomputed and handed to the integrand in slices of
    ``max_rows`` pairs (a level too large to hold, see :func:`_sub_pass`); the calls made.

    The same points, nodes and weights in the same order as :func:`_sub_pass`: the payload of
    each pair is the one it would have held.
    """
    idx = keep.nonzero().reshape(-1)
    a, h, rows = pairs.a[idx], (pairs.b - pairs.a)[idx], pairs.rows[idx]
    t_q, w_q = a.new_tensor(list(sub_rule[0])), a.new_tensor(list(sub_rule[1]))
    calls = 0
    for i in range(0, len(idx), max_rows):
        sl = slice(i, i + max_rows)
        at_once = _rule_at_once(integrand, a[sl].unsqueeze(1) + h[sl].unsqueeze(1) * t_q,
                                h[sl].unsqueeze(1) * w_q, rows[sl])
        part: Optional[torch.Tensor] = None if at_once is None else at_once[0]
        if part is not None:
            calls += len(sub_rule[0])
        for t, w in zip(*sub_rule) if part is None else ():
            payload, _ = integrand.evaluate(a[sl] + h[sl] * t, rows[sl])
            calls += 1
            term = payload * _bcast(h[sl] * w, payload)
            part = term if part is None else part.add_(term)
            del payload
        assert part is not None  # a rule has a node
        integrand.accumulate(rows[sl], part)
    return calls


def _accepted(err: torch.Tensor, pairs: _Pairs, acc_err: torch.Tensor, tol: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """Which pairs converged [p]: those within their share of the tolerance, and all pairs of an
    input whose errors (accepted and this level's) sum within it. (Pairs stopped by ``max_depth``
    or the work budget are kept by the caller, as unconverged.)"""
    rows = pairs.rows
    level_err = torch.zeros_like(acc_err).index_add_(0, rows, err)
    done = (acc_err + level_err) <= tol + noise
    return done[rows] | (err <= tol[rows] * (pairs.b - pairs.a) + noise[rows])


def _accumulate(integrand: StepIntegrand, keep: torch.Tensor, rows: torch.Tensor, contrib: Optional[torch.Tensor],
                total: torch.Tensor, err: torch.Tensor, acc_total: torch.Tensor, acc_err: torch.Tensor) -> bool:
    """Hand the kept pairs' payload to the integrand (unless ``contrib`` is None: handed over by
    :func:`_payload_kept`) and add their totals and errors to the per-input accumulators (in
    place). Returns whether every pair was kept."""
    all_kept = bool(keep.all())
    # all kept: pass the tensors themselves, not masked copies
    sel = slice(None) if all_kept else keep
    if bool(keep.any()):
        if contrib is not None:
            integrand.accumulate(rows[sel], contrib[sel])
        acc_total.index_add_(0, rows[sel], total[sel])
        acc_err.index_add_(0, rows[sel], err[sel])
    return all_kept


def _far_kink_cuts(integrand: StepIntegrand, rej: _Pairs, err: torch.Tensor, tol: torch.Tensor, noise: torch.Tensor,
                   ends: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """At the first refinement, the kinks of the rejected pairs far from their tolerance.

    Returns:
        *tuple*: owning pair (index into ``rej``) and position of every kink — both None when no
        pair is far or the integrand cannot capture activations — and the calls made.
    """
    far = err > KINK_SPLIT_RATIO * (tol[rej.rows] + noise[rej.rows])
    if not (hasattr(integrand, "capture") and bool(far.any())):
        return None, None, 0
    # Steps far from their tolerance are split at every kink of the activations at once. Steps
    # that are nearly there take the cheaper jump estimate (resolving every kink would cost more
    # than the few splits they need).
    sub = far.nonzero().squeeze(1)
    cut_owner, cut_t, calls = _kink_cuts(cast(_CapturingIntegrand, integrand), ends, rej.rows[sub])
    return sub[cut_owner], cut_t, calls


def _fill_ends(integrand: StepIntegrand, pairs: _Pairs, max_rows: int) -> int:
    """Evaluate the integrand at the pairs' ends where it is not known yet (in place); the calls.

    Every rejected pair needs both ends for the jump estimate of :func:`_split_points`.
    """
    calls = 0
    for vals, pos in ((pairs.ga, pairs.a), (pairs.gb, pairs.b)):
        missing = torch.isnan(vals).any(dim=1)
        if bool(missing.any()):
            got, c = _totals_at(integrand, pos[missing], pairs.rows[missing], max_rows)
            calls += c
            vals[missing] = got
    return calls


def _place_cuts(rej: _Pairs, total: torch.Tensor, g: torch.Tensor, known_xi: torch.Tensor,
                cut_owner: Optional[torch.Tensor], cut_t: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All cuts of the rejected pairs: the kinks found (``cut_owner``, ``cut_t``; None for none),
    and the jump estimate of :func:`_split_points` for every pair without a kink.

    Args:
        rej (_Pairs): the rejected pairs, both ends known. total (Tensor): [p, C] their rule's
            totals. g (Tensor): [p, n, C] their totals at the nodes. known_xi (Tensor): positions
            of ends and nodes in [0, 1].

    Returns:
        *tuple[Tensor, Tensor, Tensor]*: owning pair (index into ``rej``), position, and whether
        it came from a jump estimate, per cut (unsorted).
    """
    device = rej.rows.device
    if cut_owner is None or cut_owner.numel() == 0:
        known = torch.cat([rej.ga.unsqueeze(1), g, rej.gb.unsqueeze(1)], dim=1)
        split, used = _split_points(rej.a, rej.b, rej.fb - rej.fa, total, known, known_xi, rej.estimated)
        return torch.arange(len(rej.rows), device=device), split, used
    assert cut_t is not None  # found together with cut_owner
    # pairs without a detected kink fall back to the jump estimate
    has = torch.zeros(len(rej.rows), dtype=torch.bool, device=device)
    has[cut_owner] = True
    if bool((~has).any()):
        lone = (~has).nonzero().squeeze(1)
        known = torch.cat([rej.ga[lone].unsqueeze(1), g[lone], rej.gb[lone].unsqueeze(1)], dim=1)
        split, _ = _split_points(rej.a[lone], rej.b[lone], rej.fb[lone] - rej.fa[lone], total[lone], known,
                                 known_xi, rej.estimated[lone])
        cut_owner = torch.cat([cut_owner, lone])
        cut_t = torch.cat([cut_t, split])
    # cuts at kinks are exact positions, not estimates: never force a bisection after them
    return cut_owner, cut_t, torch.zeros(len(cut_t), dtype=torch.bool, device=device)


def _children(integrand: StepIntegrand, rej: _Pairs, cut_owner: torch.Tensor, cut_t: torch.Tensor,
              cut_est: torch.Tensor, max_rows: int) -> Tuple[_Pairs, int]:
    """Cut the rejected pairs into the next level's pairs; the checked outputs at the cuts cost
    batched calls (returned with the pairs).

    For pair j with cuts c1 < ... < ck the children are [a, c1], [c1, c2], ..., [ck, b]: the
    first child of each pair keeps its known integrand at a, the tail child the one at b.
    """
    a, b = rej.a, rej.b
    order_c = torch.argsort(cut_owner.to(a.dtype) * 4.0 + (cut_t - a[cut_owner]) / (b - a)[cut_owner])
    cut_owner, cut_t, cut_est = cut_owner[order_c], cut_t[order_c], cut_est[order_c]
    pieces, calls = _batched(integrand.checked, cut_t, rej.rows[cut_owner], max_rows)
    f_cut = torch.cat(pieces)
    first = torch.ones_like(cut_owner, dtype=torch.bool)
    first[1:] = cut_owner[1:] != cut_owner[:-1]
    last = torch.ones_like(cut_owner, dtype=torch.bool)
    last[:-1] = cut_owner[1:] != cut_owner[:-1]
    prev_t = torch.where(first, a[cut_owner], torch.roll(cut_t, 1))
    prev_f = torch.where(first.unsqueeze(1), rej.fa[cut_owner], torch.roll(f_cut, 1, dims=0))
    prev_g = torch.where(first.unsqueeze(1), rej.ga[cut_owner], torch.full_like(f_cut, float("nan")))
    tail = cut_owner[last]
    children = _Pairs(
        rows=torch.cat([rej.rows[cut_owner], rej.rows[tail]]),
        a=torch.cat([prev_t, cut_t[last]]),
        b=torch.cat([cut_t, b[tail]]),
        fa=torch.cat([prev_f, f_cut[last]]),
        fb=torch.cat([f_cut, rej.fb[tail]]),
        ga=torch.cat([prev_g, torch.full_like(f_cut[last], float("nan"))]),
        gb=torch.cat([torch.full_like(f_cut, float("nan")), rej.gb[tail]]),
        estimated=torch.cat([cut_est, cut_est[last]]),
    )
    return children, calls


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
    max_points: Optional[int] = None,
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
        max_points (int, optional): work budget of the step per input: once an input's pairs
            cost this many integrand rows, its current pairs are accepted as they are (the other
            inputs refine on); inputs so stopped above tolerance are counted as unconverged.
            Per input, not pooled: one input that cannot converge must not take the budget of
            all (a p = 113 Grokking step spent 721,457 rows of a chunk's 524,288 that way, for
            15 minutes). ``None``: no budget.

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

    # Level 0: one shared parameter point per node, all rows in one call.
    rows = torch.arange(m, device=device)
    contrib: Optional[torch.Tensor]
    contrib, total, g, evaluations = _base_pass(integrand, t_nodes, w_nodes, rows)
    check_integrand(total, rows, "the rule's nodes")  # NaN never converges: stop before refining
    pairs = _Pairs.whole_step(rows, f0, f1)
    ends = _known_points(t_nodes, dtype, device)
    sub_ends = _known_points(sub_rule[0], dtype, device)
    depth = 0
    unconverged = 0
    bad_rows: Optional[torch.Tensor] = None
    # integrand rows evaluated so far per input (the work the budget bounds), and the inputs whose
    # refinement was stopped (by max_depth or the budget) rather than accepted
    points = torch.full((m,), float(len(t_nodes)), dtype=dtype, device=device)
    stopped = torch.zeros(m, dtype=torch.bool, device=device)

    while True:
        err = (total - (pairs.fb - pairs.fa)).abs().amax(dim=1)
        final = (not control) or depth >= max_depth
        keep = _accepted(err, pairs, acc_err, tol, noise)
        spent = (points >= max_points)[pairs.rows] if max_points is not None else torch.zeros_like(keep)
        forced = ~keep & (spent | final)
        if control:
            stopped[pairs.rows[forced]] = True
        keep = keep | forced
        if contrib is None:  # a level too large to hold its payload: the accepted pairs', recomputed
            evaluations += _payload_kept(integrand, pairs, keep, sub_rule, max_rows)
        all_kept = _accumulate(integrand, keep, pairs.rows, contrib, total, err, acc_total, acc_err)
        if all_kept:
            if control and bool(stopped.any()):
                bad_rows = (stopped & (acc_err > tol + noise)).nonzero().reshape(-1)
                unconverged = int(bad_rows.numel())
            break
        rej_mask = ~keep
        rej = pairs.select(rej_mask)
        r_total, r_g = total[rej_mask], g[rej_mask]
        cut_owner = cut_t = None
        if depth == 0:
            cut_owner, cut_t, calls = _far_kink_cuts(integrand, rej, err[rej_mask], tol, noise, ends)
            evaluations += calls
        evaluations += _fill_ends(integrand, rej, max_rows)
        cut_owner, cut_t, cut_est = _place_cuts(rej, r_total, r_g, ends if depth == 0 else sub_ends, cut_owner, cut_t)
        pairs, calls = _children(integrand, rej, cut_owner, cut_t, cut_est, max_rows)
        evaluations += calls
        # free the level's payload first: a vjp payload is parameter-sized per row, and holding
        # the old level's while the next is built would double the peak memory of refinement
        del contrib
        contrib, total, g, calls = _sub_pass(integrand, pairs, sub_rule, max_rows)
        check_integrand(total, pairs.rows, pairs.a)
        evaluations += calls
        # each child: its nodes plus the check at its cut (ends and kink probes are extra, small)
        points.index_add_(0, pairs.rows, torch.full((len(pairs.rows),), float(len(sub_rule[0]) + 1),
                                                    dtype=dtype, device=device))
        depth += 1
    error = (acc_total - (f1 - f0)).abs().amax(dim=1)
    return StepStats(error=error, evaluations=evaluations, depth=depth, unconverged=unconverged,
                     unconverged_rows=bad_rows)
