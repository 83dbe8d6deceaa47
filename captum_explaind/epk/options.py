"""What to compute, separated from how: one frozen, validated options object (and presets).

Every view and :class:`~captum_explaind.ExactPathKernel` take the same options, either as an
:class:`EPKOptions` (``options=EPKOptions.preset("fast")``), a preset name
(``options="fast"``), or as keyword arguments (``nodes=8, dtype=torch.float64``) that override
the preset. They are validated once, here, and saved with every result (``result.options``,
``to_dict()``), so a number can always be traced to the settings that produced it.

Presets:

* ``"exact"`` (default) — Gauss–Legendre, 4 nodes, per-step error control at ``rtol=1e-10``,
  float64: the decomposition is exact to round-off wherever refinement converges. Refinement is
  bounded by ``max_evaluations`` integrand evaluations per input and step; what is left is in the
  convergence delta, and unconverged (step, input) pairs are counted and warned about.
* ``"balanced"`` — the same rule with error control at ``rtol=1e-6`` (float64): much cheaper on
  ReLU networks with many kinks, still exact to ~1e-6 of each step's change.
* ``"fast"`` — Gauss–Legendre with 2 nodes, float32, no error control: a first look, with the
  delta saying how far it is from exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .memory import parse_bytes
from .quadrature import RULES, quadrature_rule

__all__ = ["EPKOptions", "PRESETS", "PER_SAMPLE", "TRAIN_GRADS", "resolve_options"]

PER_SAMPLE = ("auto", "vmap", "loop")
#: Most nodes per rule: Gauss–Legendre gains nothing past round-off at ~100 nodes, and a fixed grid
#: of more than 10,000 points is a typo (each node is a pass over the inputs at every step).
MAX_NODES = {"gauss": 128, "midpoint": 10_000, "left": 10_000}
#: how per-sample *training* gradients are computed (see :mod:`captum_explaind.epk.train_grads`)
TRAIN_GRADS = ("auto", "independent", "coupled")


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")


@dataclass(frozen=True)
class EPKOptions:
    """How the exact path kernel is computed.

    Args:
        quadrature (str): ``"gauss"`` (Gauss–Legendre), ``"midpoint"`` (the reference
            implementation's rule) or ``"left"`` (left endpoint; with ``nodes=1`` TracIn's
            gradient at θ_{s−1}). Default: "gauss"
        nodes (int): nodes of the rule on each (sub-)interval. Default: 4
        error_control (bool or None): refine steps whose integrated total misses the exact change
            ``f(θ_s) − f(θ_{s−1})`` by more than the tolerance; ``None``: on for ``"gauss"``,
            off for the fixed-grid rules. Default: None
        rtol (float): per-step tolerance relative to the step's change of the checked outputs.
            Default: 1e-10
        atol (float): absolute per-step tolerance added to it. Default: 0
        max_depth (int): maximum refinement levels of one step. Default: 40
        max_evaluations (int or None): work budget: integrand evaluations per input and step
            beyond which that input's refinement stops (the others go on); the error left is
            in the delta and the pairs above tolerance are counted (``stats.unconverged``) and
            warned about. ``None``: unbounded (up to ``max_depth`` levels, each of which can
            double the work).
            Default: 4096
        dtype (torch.dtype or None): compute precision; ``None``: the trajectory's. Default: float64
        device (torch.device, str or None): where to compute; ``None``: the model's device.
        batch_size (int or None): test inputs per chunk (memory control). Default: all at once
        train_batch_size (int or None): training samples per per-sample-gradient call (data and
            similarity views); ``None``: calls of ~24 MiB of gradients.
        per_sample (str): per-example gradients by ``"vmap"``, by a ``"loop"`` over examples,
            or ``"auto"`` (vmap, falling back to the loop once — with one warning — for models
            vmap cannot handle, e.g. Hugging Face attention masks). Default: "auto"
        train_grads (str): per-sample training gradients of the data and similarity views:
            ``"independent"`` (each sample alone, evaluation-mode model), ``"coupled"`` (each
            recorded micro-batch forwarded as training did — train-mode BatchNorm statistics,
            replayed dropout — and differentiated per sample through them) or ``"auto"``
            (coupled exactly when the recording shows train-mode normalization or replayable
            dropout; see :mod:`~captum_explaind.epk.train_grads`). Default: "auto"
        show_progress (bool): tqdm progress bars over steps. Default: False
        max_memory (str, int or None): a memory budget for every sweep, e.g. ``"2GiB"``,
            ``"500MB"`` or bytes: the test inputs per chunk, the rows per refinement call and the
            training samples per per-sample-gradient call are chosen so the estimated peak stays
            under it (:mod:`.memory`); results equal the unbatched ones. Needs a bounded
            refinement (``max_evaluations``). ``None``: no budget. Default: None
        train_jvp (bool or None): the data view's training side by forward mode
            (:mod:`.train_jvp`: ``∇ℓ_k·T`` as a jvp of the batch's per-sample losses, never the
            ``[m, P]`` per-sample gradients); ``None``: only when a step's per-sample gradients
            do not fit (the 256 MiB chunk, or the ``max_memory`` plan). Default: None
        distributed (bool): inside an initialized ``torch.distributed`` process group, split the
            work over the ranks and give every rank the full result (the ranks must then ask the
            same question, which is checked); ``False``: each rank computes alone. Default: True
        polyline (bool): the data view on a ``keep_every=k`` recording (only every k-th
            checkpoint stored): ``False`` refuses it with a named error; ``True`` runs it on the
            polyline through the kept checkpoints — an approximation whose error is the data
            view's ``residual``, never folded into the scores
            (:class:`~captum_explaind.epk.data_view.PolylineDataView`).
            No effect on a recording of every step, or on the other views (exact on the polyline). Default: False
    """

    quadrature: str = "gauss"
    nodes: int = 4
    error_control: Optional[bool] = None
    rtol: float = 1e-10
    atol: float = 0.0
    max_depth: int = 40
    max_evaluations: Optional[int] = 4096
    dtype: Optional[torch.dtype] = torch.float64
    device: Union[torch.device, str, None] = None
    batch_size: Optional[int] = None
    train_batch_size: Optional[int] = None
    per_sample: str = "auto"
    train_grads: str = "auto"
    show_progress: bool = False
    max_memory: Union[str, int, None] = None
    train_jvp: Optional[bool] = None
    distributed: bool = True
    polyline: bool = False

    def __post_init__(self) -> None:
        if self.quadrature not in RULES:
            raise ValueError(f"unknown quadrature {self.quadrature!r}; choose one of {RULES}")
        _check_int("nodes", self.nodes, 1)
        if self.nodes > MAX_NODES[self.quadrature]:  # before building the rule: leggauss(n) is an n×n eigenproblem
            raise ValueError(
                f"nodes={self.nodes} is more than {MAX_NODES[self.quadrature]} for quadrature={self.quadrature!r}; "
                "use error control (refinement splits steps where they need it) instead of more fixed nodes"
            )
        quadrature_rule(self.quadrature, self.nodes)  # validates nodes for the rule
        if self.error_control is not None and not isinstance(self.error_control, bool):
            raise TypeError(f"error_control must be a bool or None, got {self.error_control!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
            object.__setattr__(self, name, float(v))
        _check_int("max_depth", self.max_depth, 0)
        for name in ("max_evaluations", "batch_size", "train_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        if self.device is not None:
            try:
                object.__setattr__(self, "device", torch.device(self.device))
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device {self.device!r} is not a torch device: {err}") from None
        if self.per_sample not in PER_SAMPLE:
            raise ValueError(f"per_sample must be one of {PER_SAMPLE}, got {self.per_sample!r}")
        if self.train_grads not in TRAIN_GRADS:
            raise ValueError(f"train_grads must be one of {TRAIN_GRADS}, got {self.train_grads!r}")
        if not isinstance(self.show_progress, bool):
            raise TypeError(f"show_progress must be a bool, got {self.show_progress!r}")
        if not isinstance(self.distributed, bool):
            raise TypeError(f"distributed must be a bool, got {self.distributed!r}")
        if not isinstance(self.polyline, bool):
            raise TypeError(f"polyline must be a bool, got {self.polyline!r}")
        if self.train_jvp is not None and not isinstance(self.train_jvp, bool):
            raise TypeError(f"train_jvp must be a bool or None, got {self.train_jvp!r}")
        object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))
        if self.max_memory is not None and self.max_evaluations is None and self.refine:
            raise ValueError("max_memory needs a bounded refinement: set max_evaluations (the memory refinement may "
                             "hold grows with it), or turn error_control off")

    @property
    def refine(self) -> bool:
        """Whether steps are refined: ``error_control``, or by default only for ``"gauss"``."""
        return (self.quadrature == "gauss") if self.error_control is None else self.error_control

    # ------------------------------------------------------------------ presets and copies
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EPKOptions":
        """A named preset (``"exact"``, ``"balanced"``, ``"fast"``), optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESETS)}")
        return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    def replace(self, **changes: Any) -> "EPKOptions":
        """A copy with some options changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; valid: {[f.name for f in fields(self)]}")
        return replace(self, **changes)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-able values (dtype and device as strings)."""
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        d["device"] = None if self.device is None else str(self.device)
        d["refine"] = self.refine  # the effective choice, for readers of saved results
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EPKOptions":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d.pop("refine", None)
        if d.get("dtype") is not None:
            dt = getattr(torch, str(d["dtype"]), None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {d['dtype']!r}")
            d["dtype"] = dt
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}")
        return cls(**d)


PRESETS: Dict[str, EPKOptions] = {
    "exact": EPKOptions(),
    "balanced": EPKOptions(rtol=1e-6),
    "fast": EPKOptions(nodes=2, error_control=False, dtype=torch.float32),
}


def resolve_options(options: Union[EPKOptions, str, None] = None, **overrides: Any) -> EPKOptions:
    """Options from a preset name or an :class:`EPKOptions`, with keyword overrides.

    Raises:
        TypeError: an unknown option name.
        ValueError: an invalid value.
    """
    if options is None:
        base = PRESETS["exact"]
    elif isinstance(options, str):
        base = EPKOptions.preset(options)
    elif isinstance(options, EPKOptions):
        base = options
    else:
        raise TypeError(f"options must be an EPKOptions, a preset name or None, got {type(options).__name__}")
    return base.replace(**overrides) if overrides else base
