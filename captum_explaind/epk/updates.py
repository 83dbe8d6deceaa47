r"""Linear models of torch optimizer updates (MATH.md §3, §7).

Every supported optimizer step has the form, element-wise over the flat parameter vector,

.. math::

    b_s = β_s\, b_{s-1} + h_s\, u_s, \qquad
    Δ_s = -η_s D_s \left(e_s\, b_s + z_s\, u_s\right) - η_s λ^D_s\, θ_{s-1},
    \qquad u_s = σ_s c_s g_s + λ^C_s θ_{s-1}

with ``b`` the momentum buffer (SGD ``momentum_buffer``, Adam ``exp_avg``), ``D_s`` a known
diagonal preconditioner (1 for SGD, ``1/d_s`` for Adam), ``λ^C`` coupled and ``λ^D`` decoupled
weight decay, ``σ = -1`` under ``maximize``. The coefficients per optimizer:

============================  ==========  ===========  ===================  ======
optimizer                     β_s         h_s          e_s                  z_s
============================  ==========  ===========  ===================  ======
SGD, μ = 0                    0           1            1                    0
SGD momentum                  μ           1 on the     1                    0
                                          first step,
                                          else 1 − τ
SGD nesterov                  μ           as above     μ                    1
Adam / AdamW                  β1          1 − β1       1 / (1 − β1^k)       0
============================  ==========  ===========  ===================  ======

where ``k`` is the parameter's own Adam step count. A parameter whose ``.grad`` was ``None`` is
skipped by torch: its buffer is carried (β = 1, h = 0) and it does not move (η = 0). Because the
model is linear in ``u``, the update splits exactly into a kernel part (driven by gradients) and
a regularization part ``R_s`` (driven by λθ), computed here by running the same recurrence on
``λ^C θ``: this module needs no training data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..errors import MissingOptimizerStateError
from ..recording.format import StepRecord
from ..recording.trajectory import Trajectory
from .layout import ParamLayout

__all__ = ["StepCoefficients", "StepScalars", "UpdateModel"]


@dataclass
class StepCoefficients:
    """Per-element coefficients of one optimizer step (flat vectors of length P).

    ``precond`` is ``None`` when it was not requested (it needs Adam's recorded ``exp_avg_sq``).
    ``reg`` is the regularization part ``R_s`` of the update, or ``None`` when it is zero.
    """

    step: int
    lr: torch.Tensor  # η_s, already 0 for inactive elements
    active: torch.Tensor  # 1 where the parameter had a gradient
    beta: torch.Tensor
    h: torch.Tensor
    e: torch.Tensor
    z: torch.Tensor
    sign: torch.Tensor  # σ_s: -1 under maximize
    decay_coupled: torch.Tensor
    decay_decoupled: torch.Tensor
    precond: Optional[torch.Tensor]
    reg: Optional[torch.Tensor]


@dataclass
class StepScalars:
    """One step's coefficients as one scalar per parameter tensor (layout order)."""

    step: int
    lr: List[float]
    active: List[float]
    beta: List[float]
    h: List[float]
    e: List[float]
    z: List[float]
    sign: List[float]
    decay_coupled: List[float]
    decay_decoupled: List[float]
    counts: List[int]


class UpdateModel:
    """Streams over the steps of a trajectory and yields each step's :class:`StepCoefficients`.

    Call :meth:`advance` for s = 1, 2, ... in order (the SGD first-step rule, Adam step counts and
    the regularization momentum carry state from step to step); :meth:`reset` starts over.

    Args:
        trajectory (Trajectory): the recorded run.
        layout (ParamLayout): the trainable parameters, in flat order.
        device, dtype: where and in which precision coefficients are computed.
        need_precond (bool): always compute Adam's preconditioner ``D_s`` (the data view needs
            it); otherwise it is only computed when coupled decay requires it for ``R_s``.
    """

    def __init__(
        self,
        trajectory: Trajectory,
        layout: ParamLayout,
        *,
        device: torch.device,
        dtype: torch.dtype,
        need_precond: bool = False,
    ) -> None:
        self.trajectory = trajectory
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.family = trajectory.family
        self._group: List[int] = []
        for n in layout.names:
            group = trajectory.spec[n].group
            # the layout holds the trainable parameters, and a parameter is trainable iff it is in a group
            assert group is not None, f"trainable parameter {n!r} is in no optimizer group"
            self._group.append(group)
        self._requested = need_precond
        self.need_precond = self.family in ("adam", "adamw") and (need_precond or self.family == "adam")
        if self.need_precond:
            amsgrad = any(bool(g.get("amsgrad", False)) for g in trajectory.groups_initial)
            self._v_key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
            if not (trajectory.has_state("exp_avg_sq") and trajectory.has_state(self._v_key)):
                if need_precond:
                    raise self._missing_state("the data view")
                # Adam without decay never needs D_s for R_s; fail only if a step has L2 decay.
                self.need_precond = False
        self.reset()

    def _missing_state(self, why: str) -> MissingOptimizerStateError:
        return MissingOptimizerStateError(
            f"{why} needs Adam's second moment {self._v_key!r} at every step, but trajectory "
            f"{self.trajectory.path!r} was recorded without it; record with record_optimizer_state=True"
        )

    @property
    def exact(self) -> bool:
        """Whether the regularization part is modelled exactly (False for unsupported optimizers)."""
        return self.family in ("sgd", "adam", "adamw")

    def reset(self) -> None:
        self.next_step = 1
        self._seen: List[bool] = [False] * len(self.layout)
        self._count: List[int] = [0] * len(self.layout)
        self._reg_buffer: Optional[torch.Tensor] = None

    def _vec(self, values: List[float]) -> torch.Tensor:
        return self.layout.expand(values, dtype=self.dtype, device=self.device)

    @property
    def needs_history(self) -> bool:
        """Whether ``R_s`` depends on earlier parameters (coupled decay riding a momentum buffer)."""
        if self.family == "adam":
            return any(float(g.get("weight_decay", 0.0) or 0.0) != 0.0 for g in self.trajectory.groups_initial)
        if self.family == "sgd":
            return any(
                float(g.get("weight_decay", 0.0) or 0.0) != 0.0 and float(g.get("momentum", 0.0) or 0.0) != 0.0
                for g in self.trajectory.groups_initial
            )
        return False

    def advance(self, record: StepRecord, theta_prev: Optional[torch.Tensor]) -> StepCoefficients:
        """Coefficients of step ``record.step`` given θ_{s−1} (flat, on this model's device).

        ``theta_prev=None`` skips ``R_s`` (allowed only when :attr:`needs_history` is False);
        used to step over steps whose contribution is not requested.
        """
        coeffs = self.vectors(self.scalars(record), record)
        if theta_prev is None:
            if self.needs_history:
                raise RuntimeError("this optimizer's regularization needs every θ_{s-1}")
            return coeffs
        coeffs.reg = self._regularization(coeffs, theta_prev)
        return coeffs

    def scalars(self, record: StepRecord) -> StepScalars:
        """Per-parameter scalar coefficients of the next step (advances the step counters).

        Cheap (no tensors): a reverse-time sweep runs this forward over all records first.
        """
        s = record.step
        if s != self.next_step:
            raise RuntimeError(f"UpdateModel expects step {self.next_step}, got {s}")
        self.next_step += 1
        inactive = set(record.inactive)
        names = self.layout.names
        active = [0.0 if n in inactive else 1.0 for n in names]
        lr, beta, h, e, z, sign, lc, ld = ([] for _ in range(8))
        counts: List[int] = []
        for i, name in enumerate(names):
            g = self._group[i]
            hyper = record.groups[g]
            eta = float(record.lr[g]) * active[i]
            wd = float(hyper.get("weight_decay", 0.0) or 0.0)
            sign.append(-1.0 if hyper.get("maximize", False) else 1.0)
            if active[i]:
                self._count[i] += 1
            counts.append(record.state_step.get(name, self._count[i]))
            if self.family == "sgd":
                mu = float(hyper.get("momentum", 0.0) or 0.0)
                tau = float(hyper.get("dampening", 0.0) or 0.0)
                nesterov = bool(hyper.get("nesterov", False))
                if not active[i]:
                    b_, h_, e_, z_ = 1.0, 0.0, 0.0, 0.0
                elif mu == 0.0:
                    b_, h_, e_, z_ = 0.0, 1.0, 1.0, 0.0
                else:
                    first = not self._seen[i]
                    b_, h_ = mu, (1.0 if first else 1.0 - tau)
                    e_, z_ = (mu, 1.0) if nesterov else (1.0, 0.0)
                lr.append(eta)
                beta.append(b_)
                h.append(h_)
                e.append(e_)
                z.append(z_)
                lc.append(wd)
                ld.append(0.0)
            elif self.family in ("adam", "adamw"):
                b1, _b2 = hyper.get("betas", (0.9, 0.999))
                b1 = float(b1)
                k = counts[-1]
                decoupled = self.family == "adamw"
                if not active[i]:
                    b_, h_, e_ = 1.0, 0.0, 0.0
                else:
                    b_, h_, e_ = b1, 1.0 - b1, 1.0 / (1.0 - b1 ** k)
                lr.append(eta)
                beta.append(b_)
                h.append(h_)
                e.append(e_)
                z.append(0.0)
                lc.append(0.0 if decoupled else wd)
                ld.append(wd if decoupled else 0.0)
            else:
                lr.append(eta)
                beta.append(0.0)
                h.append(1.0)
                e.append(1.0)
                z.append(0.0)
                lc.append(0.0)
                ld.append(0.0)
            if active[i]:
                self._seen[i] = True
        return StepScalars(s, lr, active, beta, h, e, z, sign, lc, ld, counts)

    def vectors(self, sc: StepScalars, record: StepRecord) -> StepCoefficients:
        """Expand per-parameter scalars to flat vectors (loads Adam's ``D_s`` when needed)."""
        precond = self._precond(record, sc.counts) if self.need_precond else None
        return StepCoefficients(
            step=sc.step,
            lr=self._vec(sc.lr),
            active=self._vec(sc.active),
            beta=self._vec(sc.beta),
            h=self._vec(sc.h),
            e=self._vec(sc.e),
            z=self._vec(sc.z),
            sign=self._vec(sc.sign),
            decay_coupled=self._vec(sc.decay_coupled),
            decay_decoupled=self._vec(sc.decay_decoupled),
            precond=precond,
            reg=None,
        )

    def beta(self, sc: StepScalars) -> torch.Tensor:
        """The momentum coefficient β_s of :meth:`vectors`, alone (one flat vector)."""
        return self._vec(sc.beta)

    def _precond(self, record: StepRecord, counts: List[int]) -> torch.Tensor:
        """Adam's D_s = 1 / (sqrt(v̄_s) / sqrt(1 − β2^k) + ε), from the recorded second moment."""
        amsgrad = [bool(record.groups[g].get("amsgrad", False)) for g in self._group]
        v = self.trajectory.state(record.step, "exp_avg_sq", self.layout.names, device=self.device, dtype=self.dtype)
        vmax = (
            self.trajectory.state(
                record.step, "max_exp_avg_sq", self.layout.names, device=self.device, dtype=self.dtype
            )
            if any(amsgrad)
            else {}
        )
        parts = []
        for i, name in enumerate(self.layout.names):
            hyper = record.groups[self._group[i]]
            _b1, b2 = hyper.get("betas", (0.9, 0.999))
            eps = float(hyper.get("eps", 1e-8))
            k = counts[i]
            source = vmax if amsgrad[i] else v
            if name not in source:
                if k == 0:
                    # The parameter never had a gradient, so it never moved: D_s is irrelevant.
                    parts.append(torch.ones(self.layout.numels[i], dtype=self.dtype, device=self.device))
                    continue
                raise MissingOptimizerStateError(
                    f"step {record.step}: trajectory {self.trajectory.path!r} holds no "
                    f"{'max_exp_avg_sq' if amsgrad[i] else 'exp_avg_sq'} for parameter {name!r}"
                )
            denom = source[name].reshape(-1).sqrt() / math.sqrt(1.0 - float(b2) ** k) + eps
            parts.append(1.0 / denom)
        return torch.cat(parts)

    def _regularization(self, c: StepCoefficients, theta_prev: torch.Tensor) -> Optional[torch.Tensor]:
        """R_s: the same momentum recurrence run on λ^C θ_{s−1}, plus decoupled decay."""
        reg: Optional[torch.Tensor] = None
        if bool((c.decay_coupled != 0).any()):
            if self.family == "adam" and c.precond is None:
                raise self._missing_state("Adam's coupled (L2) weight decay")
            u = c.decay_coupled * theta_prev
            if self._reg_buffer is None:
                self._reg_buffer = torch.zeros_like(theta_prev)
            self._reg_buffer = c.beta * self._reg_buffer + c.h * u
            pre = c.precond if c.precond is not None else 1.0
            reg = -c.lr * pre * (c.e * self._reg_buffer + c.z * u)
        elif self._reg_buffer is not None:
            # Decay switched off: what was accumulated still rides the momentum.
            self._reg_buffer = c.beta * self._reg_buffer
            pre = c.precond if c.precond is not None else 1.0
            reg = -c.lr * pre * c.e * self._reg_buffer
        if bool((c.decay_decoupled != 0).any()):
            dec = -c.lr * c.decay_decoupled * theta_prev
            reg = dec if reg is None else reg + dec
        return reg
