"""Guards of the analysis side: bad calls, non-finite numbers, a model that drifted from its
recording, and a data view whose replay does not explain the recorded updates.

Every check here ends in a named error (:mod:`captum_explaind.errors`) or a named warning,
never a silent wrong number. The call sites in the engine and the views are one line each:

* :func:`as_tensors` — numpy arrays in the inputs become tensors (accepted, not rejected);
* :func:`check_inputs_finite`, :func:`probe_inputs` — NaN/inf test inputs, inputs the model
  cannot be called with (its raw error is wrapped, naming the argument), and non-finite
  outputs at θ_0 and θ_N — all before any integration;
* :func:`check_step_outputs`, :func:`check_integrand` — NaN/inf arising mid-path, before the
  step is refined (refinement cannot converge on NaN and would spend its whole budget);
* :func:`unconverged_message` — which (step, input) pairs refinement left above tolerance;
* :func:`check_device`, :func:`check_trajectory_arg`, :func:`check_model_state` — constructor
  arguments, and the live model against θ_N;
* :func:`note_replay`, :func:`check_data_result` — the data view's replayed gradients against
  the recorded per-parameter gradient norms, and its residual against the change.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..errors import (
    ConvergenceWarning,
    ExplaindError,
    InvalidInputError,
    ModelMismatchWarning,
    NonFiniteError,
    ResidualWarning,
)
from .outputs import default_output_fn

if TYPE_CHECKING:
    from ..recording.format import StepRecord
    from ..recording.trajectory import Trajectory
    from .batch import Batch
    from .engine import ExactPathKernel
    from .results import DataDecomposition

__all__ = [
    "RESIDUAL_WARN_RATIO",
    "as_tensors",
    "check_inputs_finite",
    "probe_inputs",
    "check_step_outputs",
    "check_integrand",
    "IntegrandNonFinite",
    "unconverged_message",
    "check_device",
    "check_trajectory_arg",
    "check_model_state",
    "note_replay",
    "check_data_result",
    "named_errors",
    "check_loss_arg",
    "warn",
]

#: The data view warns when ``|residual| > RESIDUAL_WARN_RATIO · |change|`` for a test input. A
#: faithful replay leaves round-off (1e-8 relative in float32 training, 1e-15 in float64); a
#: wrong training set or loss leaves a residual of the order of the change itself.
RESIDUAL_WARN_RATIO = 1e-2

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def warn(message: str, category: type) -> None:
    """``warnings.warn`` pointing at the user's call: the first frame outside this package and
    Captum (whose ``log_usage`` decorator wraps the public methods)."""
    captum = getattr(sys.modules.get("captum"), "__file__", None)  # looked up now: imported after us
    skip = (_PKG_DIR, os.path.dirname(os.path.abspath(captum)) + os.sep) if captum else (_PKG_DIR,)
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn()
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
_SHOW = 8  # how many indices a message lists


def _list(idx: Sequence[int]) -> str:
    idx = list(idx)
    more = f" … ({len(idx)} in all)" if len(idx) > _SHOW else ""
    return "[" + ", ".join(str(int(i)) for i in idx[:_SHOW]) + "]" + more


# ---------------------------------------------------------------------------- inputs
def _is_numpy(x: Any) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "dtype") and hasattr(x, "shape")


def as_tensors(x: Any) -> Any:
    """``x`` with every numpy array (and numpy scalar) turned into a tensor; the rest unchanged.

    numpy inputs are accepted by converting them (``torch.as_tensor``): the floating ones then
    take the compute dtype like any tensor.
    """
    if _is_numpy(x):
        return torch.as_tensor(x)
    if isinstance(x, (dict, list, tuple)) or (hasattr(x, "keys") and hasattr(x, "__getitem__")):
        plain = _plain(x)
        if any(_is_numpy(v) for _, v in _leaves(plain, "")):
            return tree_map(lambda v: torch.as_tensor(v) if _is_numpy(v) else v, plain)
    return x


def _plain(x: Any) -> Any:
    """Mappings that are no pytree node (``BatchEncoding``) as dicts, recursively."""
    if isinstance(x, dict) or (hasattr(x, "keys") and hasattr(x, "__getitem__") and not isinstance(x, torch.Tensor)):
        return {k: _plain(x[k]) for k in x.keys()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_plain(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


def _leaves(x: Any, prefix: str) -> List[Tuple[str, Any]]:
    if isinstance(x, dict):
        return [leaf for k, v in x.items() for leaf in _leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, x)]


def check_inputs_finite(batch: "Batch", what: str = "inputs") -> None:
    """Raise :class:`NonFiniteError` if a floating tensor of ``batch`` holds NaN or inf.

    Names the tensor and the examples (rows) that hold them.
    """
    named = _leaves(list(batch.args), what) + _leaves(dict(batch.kwargs), what)
    for name, v in named:
        if not (isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())):
            continue
        bad = ~torch.isfinite(v)
        if not bool(bad.any()):
            continue
        if v.dim() > 0 and v.shape[0] == batch.n:
            rows = bad.reshape(v.shape[0], -1).any(dim=1).nonzero().reshape(-1).tolist()
            where = f"example(s) {_list(rows)}"
        else:
            where = "a tensor held fixed for all examples"
        kind = "NaN" if bool(torch.isnan(v).any()) else "infinite values"
        if len(named) == 1 and not batch.kwargs:
            name = what
        raise NonFiniteError(
            f"{name} holds {kind} in {where}: no exact decomposition of a non-finite output exists (and refinement "
            "would spend its whole work budget on it); drop or repair those examples"
        )


def _raised_by_library(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is this package's code (then its message is ours)."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(_PKG_DIR)


def _shapes(batch: "Batch") -> str:
    parts = []
    for name, v in _leaves(list(batch.args), "arg") + _leaves(dict(batch.kwargs), "kw"):
        if isinstance(v, torch.Tensor):
            parts.append(f"{name}: {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}")
    return ", ".join(parts[:6])


def probe_inputs(epk: "ExactPathKernel", batch: "Batch", what: str = "inputs") -> None:
    """Call the model on ``batch`` at θ_0 and θ_N before any integration.

    Raises:
        InvalidInputError: the model raised (wrong feature dimension, shape, dtype, missing
            keyword ...): its error is quoted and chained, and the argument is named.
        NonFiniteError: the explained output is NaN or infinite at θ_0 or θ_N for some example.
    """
    for step, label in ((0, "θ_0 (the start of training)"), (epk.num_steps, f"θ_{epk.num_steps} (the end)")):
        try:
            out = epk._forward_all(step, batch)
        except ExplaindError:  # a diverged θ names its first non-finite step itself
            raise
        except Exception as err:
            if isinstance(err, ValueError) and "one row per example" in str(err):
                raise InvalidInputError(
                    f"{what}: {err}. If {what} is a single example, give it its example axis (e.g. "
                    f"x.unsqueeze(0)); otherwise output_fn drops the example axis"
                ) from err
            if _raised_by_library(err):
                raise
            raise InvalidInputError(
                f"{what} do not fit the model: calling {type(epk.model).__name__} on {what} ({_shapes(batch)}) "
                f"{'' if epk.output_fn is default_output_fn else '(then output_fn) '}raised "
                f"{type(err).__name__}: {str(err).strip()[:400]} — check the feature dimension, shape, "
                f"dtype and keys of {what} (the example axis comes first)"
            ) from err
        low = "" if epk.dtype == torch.float64 else f" (computed in {str(epk.dtype).replace('torch.', '')})"
        _check_rows(out, f"the model's output at {label}{low}", what)


def _check_rows(out: torch.Tensor, where: str, what: str, offset: int = 0) -> None:
    flat = out.reshape(out.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        rows = (bad.nonzero().reshape(-1) + offset).tolist()
        raise NonFiniteError(
            f"{where} is NaN or infinite for {what} example(s) {_list(rows)}: the prediction itself is not "
            "finite, so no decomposition of it exists; check those examples (and output_fn)"
        )


# ---------------------------------------------------------------------------- along the path
def check_step_outputs(step: int, offset: int, c0: torch.Tensor, c1: torch.Tensor) -> None:
    """Explained outputs at both ends of step ``step`` for a chunk starting at ``offset``."""
    for c, at in ((c0, f"θ_{step - 1}"), (c1, f"θ_{step}")):
        _check_rows(c, f"the model's output at {at} (step {step})", "input", offset)


class IntegrandNonFinite(NonFiniteError):
    """Raised inside :func:`~captum_explaind.epk.integrator.integrate_step`; the engine re-raises
    it as a :class:`NonFiniteError` naming the step and the inputs."""

    def __init__(self, rows: torch.Tensor, t: Any) -> None:
        self.rows, self.t = rows, t
        super().__init__(f"the path integrand is NaN or infinite at t={t} for chunk rows {_list(rows.tolist())}")


def check_integrand(total: torch.Tensor, rows: torch.Tensor, t: Any) -> None:
    """Raise :class:`IntegrandNonFinite` where the integrated totals ``total`` [p, C] are not finite."""
    bad = ~torch.isfinite(total).all(dim=1)
    if bool(bad.any()):
        sel = bad.nonzero().reshape(-1)
        tt = t if not isinstance(t, torch.Tensor) else [round(float(v), 6) for v in t[sel][:_SHOW]]
        raise IntegrandNonFinite(torch.unique(rows[sel]), tt)


def integrand_error(err: IntegrandNonFinite, step: int, offset: int) -> NonFiniteError:
    """The engine's message for a non-finite integrand in ``step`` (chunk at ``offset``)."""
    rows = (err.rows.cpu() + offset).tolist()
    return NonFiniteError(
        f"step {step}: the path integrand (the model's gradient along the update) is NaN or infinite at "
        f"t={err.t} of the step for input(s) {_list(rows)}, although the outputs at both ends are finite: the "
        "model has a singularity between θ_{s-1} and θ_s for them (e.g. a log or a division), so the step "
        "cannot be integrated"
    )


def unconverged_message(pairs: Dict[int, List[int]], errors: Dict[int, torch.Tensor], n_pairs: int,
                        max_depth: int, max_evaluations: Optional[int]) -> Tuple[str, type]:
    """The warning (message, category) for the (step → inputs) pairs left above tolerance."""
    listed = []
    for s in sorted(pairs)[:_SHOW]:
        rows = pairs[s]
        worst = float(errors[s][rows].max()) if len(rows) else 0.0
        listed.append(f"step {s}: input(s) {_list(rows)} (error up to {worst:.3g})")
    more = f"; … ({len(pairs)} steps in all)" if len(pairs) > _SHOW else ""
    msg = (
        f"{n_pairs} (step, input) pair(s) did not reach the tolerance within max_depth={max_depth} refinements / "
        f"max_evaluations={max_evaluations} per input and step — {'; '.join(listed)}{more}; the remaining "
        "error is in the convergence delta (raise max_evaluations; for a quicker look at ReLU networks with "
        "many kinks, a looser rtol — options='balanced' is 1e-6 — or 'fast'; an error at the round-off of the "
        "model's internals, e.g. of a log-probability near 0, cannot be refined away)"
    )
    return msg, ConvergenceWarning


# ---------------------------------------------------------------------------- constructor arguments
def check_device(device: torch.device) -> None:
    """Raise ValueError if tensors cannot be placed on ``device`` (``'cuda'`` on a CPU build, a
    GPU index that does not exist, ...)."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(device)!r}, but CUDA is not available here (torch {torch.__version__}, built "
                f"{'without CUDA' if torch.version.cuda is None else 'with CUDA ' + str(torch.version.cuda)}, "
                f"{torch.cuda.device_count()} GPU(s) visible); use device='cpu' or None (the model's device)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
        return
    try:
        torch.empty(1, device=device)
    except Exception as err:
        raise ValueError(f"device={str(device)!r} cannot be used here: {type(err).__name__}: {err}") from None


def check_trajectory_arg(trajectory: Any) -> None:
    """``trajectory`` must be a Trajectory or a directory path (TypeError naming it otherwise)."""
    from ..recording.trajectory import Trajectory

    if not isinstance(trajectory, (Trajectory, str, os.PathLike)):
        raise TypeError(
            f"trajectory must be a Trajectory or the path of a recorded run's directory, got "
            f"{type(trajectory).__name__}"
        )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not (a.is_floating_point() or b.is_floating_point()):
        return 0.0 if torch.equal(a.cpu(), b.cpu()) else float("inf")
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))  # equal infinities and NaNs: no difference
    d = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs().nan_to_num(nan=float("inf")))
    return float(d.max()) if d.numel() else 0.0


def _tol(live: torch.Tensor, rec: torch.Tensor) -> float:
    """What rounding between the stored and the live dtype can explain (0 for the same dtype)."""
    if live.dtype == rec.dtype or not live.is_floating_point():
        return 0.0
    low = min((live.dtype, rec.dtype), key=lambda d: torch.finfo(d).bits if d.is_floating_point else 64)
    scale = float(rec.detach().abs().max()) if rec.numel() else 0.0
    return torch.finfo(low).eps * max(scale, 1.0)


def _moved(live: Mapping[str, torch.Tensor], recorded: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Tensors of ``live`` that differ from ``recorded`` beyond rounding, with the max |difference|."""
    out = {}
    for n, r in recorded.items():
        if n in live:
            d = _max_diff(live[n], r)
            if d > _tol(live[n], r):
                out[n] = d
    return out


def check_model_state(model: nn.Module, traj: "Trajectory") -> None:
    """Warn (:class:`ModelMismatchWarning`) when the live model is not at θ_N of ``traj``.

    The explanation always uses the recorded θ_0..θ_N; a live model whose parameters or buffers
    differ from the last recorded step was trained (or changed) after the recording ended — or is
    another instance — and the numbers explain the recording, not it. A model still at θ_0 (an
    untrained instance of the architecture) is accepted silently.
    """
    live_p = {n: p for n, p in model.named_parameters()}
    live_b = {n: b for n, b in model.named_buffers()}  # names and shapes: Trajectory.validate checked them
    names = [n for n in traj.trainable if n in live_p]
    final = traj.params(traj.num_steps, names)
    final.update({n: t for n, t in traj.frozen_params().items() if n in live_p})  # stored once, with θ_0
    moved = _moved(live_p, final)
    bufs = traj.buffers(traj.num_steps) if traj.buffer_names else {}
    moved_b = _moved(live_b, bufs)
    if not moved and not moved_b:
        return
    initial = traj.params(0, names)
    initial.update({n: t for n, t in traj.frozen_params().items() if n in live_p})
    if not _moved(live_p, initial) and not _moved(live_b, traj.buffers(0) if traj.buffer_names else {}):
        return  # an untrained instance of the architecture (at θ_0): its weights are not used
    worst = sorted({**moved, **moved_b}.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{n} (max |diff| {d:.3g})" for n, d in worst[:_SHOW])
    warn(
        f"the model's current {'parameters' if moved else 'buffers'}{' and buffers' if moved and moved_b else ''} "
        f"differ from the last recorded step θ_{traj.num_steps} of {traj.path!r}: {listed}"
        f"{f' … ({len(worst)} tensors in all)' if len(worst) > _SHOW else ''}. The model was trained after the "
        "recording ended (an optimizer.step() or a train-mode forward outside the `with recorder:` block?) or is "
        "another instance; the explanation is of the recorded run θ_0..θ_N, not of these weights",
        ModelMismatchWarning,
    )


# ---------------------------------------------------------------------------- data view
def note_replay(view: Any, rec: "StepRecord", replayed: torch.Tensor, scale: float) -> None:
    """Compare step ``rec``'s replayed batch gradient (``scale ·`` ``replayed``) with the recorded
    per-parameter gradient norms; kept on ``view`` for :func:`check_data_result`.

    Raises:
        NonFiniteError: the training samples of the step give NaN/inf loss gradients.
    """
    if not bool(torch.isfinite(replayed).all()):
        idx = sorted({int(i) for b in rec.batches for i in b.indices.tolist()})
        raise NonFiniteError(
            f"step {rec.step}: the loss gradients of its training samples {_list(idx)} are NaN or infinite "
            "(train_dataset holds non-finite values there, or loss_fn is not finite on them)"
        )
    store: Dict[int, float] = view.__dict__.setdefault("_replay_mismatch", {})
    if not rec.grad_sq:
        return
    layout = view.epk.layout
    got, want = [], []
    for name, sq in rec.grad_sq.items():
        if name in layout:
            got.append(scale * float(torch.linalg.vector_norm(replayed[layout.slice(name)])))
            want.append(float(sq) ** 0.5)
    if want:
        g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
        store[rec.step] = float((g - w).norm() / w.norm().clamp_min(1e-300))


def _negative_loss(view: Any) -> Optional[float]:
    """The most negative per-sample loss on a few training samples at θ_N, or None if none is."""
    epk = view.epk
    k = min(8, view.train.n)
    try:
        batch, target = view.train.batch(torch.arange(k))
        with torch.no_grad():
            loss = view.loss_fn(epk.functional.raw(epk.theta(epk.num_steps), batch), target)
        low = float(loss.min())
    except Exception:  # a diagnostic only: never fail the result because of it
        return None
    return low if low < 0 else None


def _unreplayed_dropout(view: Any) -> List[str]:
    """Dropout modules that trained in train mode when the recording has no RNG state to replay them."""
    traj = view.epk.trajectory
    names = list((traj.manifest.get("training_modes") or {}).get("dropout") or [])
    if not names:
        return []
    try:
        batches = traj.record(1).batches
    except Exception:  # a diagnostic only
        return []
    return names if batches and getattr(batches[0], "rng_state", None) is None else []


def _groups_partition(view: Any) -> bool:
    """Whether the view's parameter groups (``layers=``) cover every trainable parameter at most
    once — then its residual is the part of the updates the replay does not explain (the data view
    reports the share of the parameters in no group apart, in ``other``)."""
    slices = [(sl.start, sl.stop) for group in getattr(view, "group_slices", [[slice(0, 0)]]) for sl in group]
    covered = sorted(slices)
    total = view.epk.layout.total
    disjoint = len(set(covered)) == len(covered)
    return disjoint and (hasattr(view, "other") or sum(b - a for a, b in covered) == total)


def check_data_result(view: Any, result: "DataDecomposition") -> None:
    """Non-finite scores are an error; a residual large against the change is a warning that
    names the inputs, the numbers and the likely cause."""
    for name in ("scores", "regularization", "residual"):
        t = getattr(result, name)
        if not bool(torch.isfinite(t).all()):
            rows = (~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)).nonzero().reshape(-1).tolist()
            raise NonFiniteError(f"the data view's {name} are NaN or infinite for input(s) {_list(rows)}")
    if not _groups_partition(view):
        return  # with layer groups that leave parameters out (or overlap), the residual holds those too
    res, change = result.residual.detach().cpu(), result.change.detach().cpu()
    floor = 1e-6 * (1.0 + float(change.abs().max()) if change.numel() else 1.0)
    bad = (res.abs() > RESIDUAL_WARN_RATIO * change.abs() + floor).nonzero().reshape(-1).tolist()
    if not bad:
        return
    nums = ", ".join(f"input {i}: residual {float(res[i]):.3g} vs change {float(change[i]):.3g}" for i in bad[:_SHOW])
    mismatch: Dict[int, float] = view.__dict__.get("_replay_mismatch", {})
    worst = sorted(mismatch.items(), key=lambda kv: -kv[1])[:3]
    grads_off = bool(worst) and worst[0][1] > 1e-3
    neg = _negative_loss(view)
    masks = _unreplayed_dropout(view)
    norms = list((view.epk.trajectory.manifest.get("training_modes") or {}).get("batch_norm") or [])
    if getattr(view, "polyline", False):
        k = view.epk.trajectory.keep_every
        cause = (f"the recording keeps one checkpoint per {k} optimizer steps (keep_every={k}) and the data view "
                 "ran on the polyline through them (polyline=True): each stored macro-step is attributed with "
                 "gradients at its start, and the residual is what that approximation misses — record every step "
                 "(keep_every=1) for exact scores")
    elif norms and getattr(getattr(view, "grads", None), "name", "") == "independent":
        cause = (f"normalization module(s) {norms[:_SHOW]} trained with batch statistics, but the per-sample "
                 "gradients were computed independently (train_grads='independent'): use the default, which "
                 "replays each recorded micro-batch as training saw it")
    elif masks:
        cause = (f"dropout module(s) {masks[:_SHOW]} trained in train mode and the recording holds no RNG states, so "
                 "their masks are not replayed (record with record_rng=True, or train without dropout)")
    elif neg is not None:
        cause = (f"The loss_fn returns negative losses (as low as {neg:.3g}) on training samples: most likely a "
                 "negative log-likelihood of raw logits (nll_loss on a model trained with cross_entropy) — pass "
                 "the loss training used")
    elif grads_off:
        steps = ", ".join(f"step {s}: {100 * v:.3g}%" for s, v in worst)
        cause = (f"the replayed training gradients disagree with the recorded per-parameter gradient norms ({steps}):"
                 " most likely, train_dataset is not the data the recorder's indices refer to (other samples, "
                 "permuted or changed labels, another order), or loss_fn is not the training loss (or its "
                 "log_batch weights differ from the loss normalization)")
    elif mismatch:
        cause = ("the replayed gradients match the recorded gradient norms, so the updates themselves are not "
                 "what the recorded optimizer settings produce: parameters changed outside optimizer.step(), "
                 "or optimizer records that differ from what ran")
    else:
        cause = ("most likely train_dataset is not the recorded training data (samples, labels, order) or "
                 "loss_fn is not the training loss")
    warn(
        f"the data view's residual is large relative to the prediction's change ({nums}"
        f"{f' … ({len(bad)} inputs)' if len(bad) > _SHOW else ''}; threshold {RESIDUAL_WARN_RATIO:g} of the "
        f"change): the per-sample scores do not explain the recorded updates and are not trustworthy. "
        f"{cause[0].upper()}{cause[1:]}",
        ResidualWarning,
    )


def check_loss_arg(loss_fn: Any) -> None:
    """A loss *class* (``nn.CrossEntropyLoss`` instead of ``nn.CrossEntropyLoss()``) is named."""
    if isinstance(loss_fn, type):
        raise TypeError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, e.g. "
            f"{loss_fn.__name__}(reduction='none'), or a function (outputs, labels) -> per-sample losses"
        )


class named_errors:
    """Context manager: errors raised by user code (a dataset, collate_fn, loss_fn or the model)
    inside it become :class:`InvalidInputError` naming ``what``; the library's own errors pass.

    Examples::

        >>> with named_errors("train_dataset / loss_fn"):
        ...     loss_fn = check_loss_fn(loss_fn, fm, theta, train)
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> "named_errors":
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> Literal[False]:
        if err is None or isinstance(err, ExplaindError) or not isinstance(err, Exception):
            return False
        if _raised_by_library(err):
            return False
        raise InvalidInputError(
            f"{self.what}: {type(err).__name__}: {str(err).strip()[:400]} — check that the training data, labels "
            "and loss_fn are those of the recorded run (feature dimension, label dtype, one loss per sample)"
        ) from err
