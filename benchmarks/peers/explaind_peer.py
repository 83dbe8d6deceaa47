"""Drive the authors' reference implementation ``explaind==0.1.0`` on a run recorded by this library.

The reference package keeps its own histories: a ``ModelPath`` (list of state dicts θ_0..θ_N),
an ``AdamWOptimizerPath`` (entry 0 zeros; entry s: ``{"exp_avg_sq": {"model." + name: v_s},
"lr": η_s, ...}`` — its ``id2param`` enumerates the *wrapped* ``ModelPath.state_dict()``, hence
the ``"model."`` prefix it later looks up in ``train_feature_map``) and a ``DataPath`` (entry
s − 1: the batch ``{"X", "y", "indices"}`` of step s). :class:`ExplaindPeer` builds exactly
these lists from a recorded :class:`~captum_explaind.Trajectory` — so both libraries explain the
very same weights — and calls ``ExactPathKernelModel.predict`` through the package's public
classes. Nothing of the package is copied or patched. :meth:`ExplaindPeer.verify_path` trains the
authors' model through the authors' own wrappers from the recorded θ_0 and checks that the θ
path, ``exp_avg_sq`` and learning rates it logs equal the lists built here, bit for bit.

Settings passed to ``ExactPathKernelModel`` (and why):

* ``integral_eps = early_integral_eps = 1/n``: the n-point midpoint rule on every step
  (``early_steps=0``; with equal epsilons the "early" phase changes nothing).
* ``kernel_store_interval=nan``: in 0.1.0, ``predict`` stores a per-step kernel summary into
  ``prev_eval`` at every step divisible by the interval, *including step 0, where prev_eval is
  still None* unless ``keep_param_wise_kernel=True`` (which materializes a
  test × target × train × parameter tensor). ``0 % nan`` is ``nan ≠ 0``, so that bookkeeping
  branch is never taken; the prediction itself is unaffected.
* ``evaluate_predictions=False``: skips its per-step diagnostic forward passes and prints.
* ``device="cpu"`` explicitly (the package picks ``cuda:0`` by module globals when present).

Importing :mod:`explaind` is never required by the library or its tests; :func:`ensure_explaind`
installs it into the running interpreter on demand (``pip install --no-deps
--ignore-requires-python explaind==0.1.0``; its modules import only torch, numpy and tqdm).

Memory is measured as the **peak resident-set-size increase** of this process during the call:
the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before
the call, and the peak is ``VmHWM − VmRSS`` read before it (after ``gc.collect()`` and
``malloc_trim``). This counts every allocation (torch's CPU allocator, numpy, Python), unlike
``tracemalloc``; it is reported as unavailable where ``/proc`` does not allow the reset. The same
helper records how much CPU *other* processes used meanwhile (from ``/proc/stat``), so timings
taken on a shared machine can be flagged.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import io
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn

from captum_explaind import Trajectory

from ..modadd import ModAddConfig, ModAddData, ModAddTransformer, forward_at

__all__ = [
    "EXPLAIND_SPEC",
    "ensure_explaind",
    "Usage",
    "measure",
    "foreign_load",
    "wait_for_quiet",
    "PathCheck",
    "PeerResult",
    "ExplaindPeer",
]

EXPLAIND_SPEC = "explaind==0.1.0"
#: The authors' model owns this parameter but never uses it in ``forward``.
UNUSED_REFERENCE_PARAMS = ("positional_encoding.pe",)


# ----------------------------------------------------------------------------- installation
def ensure_explaind(install: bool = True) -> str:
    """Import :mod:`explaind`, installing ``explaind==0.1.0`` into this interpreter if needed.

    Args:
        install (bool): run ``python -m pip install --no-deps --ignore-requires-python
            explaind==0.1.0`` when the import fails. Default: True

    Returns:
        *str*: the installed version.

    Raises:
        ImportError: if it is missing and ``install`` is False, or the install failed.
    """
    try:
        import explaind.epk_model  # noqa: F401
    except ImportError:
        if not install:
            raise
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python", EXPLAIND_SPEC]
        print(f"[explaind peer] `import explaind` failed; installing it: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        # The package imports only torch, numpy and tqdm (its accelerated/ subpackage, which
        # needs tensordict, is not used here); report anything else that is missing.
        for module in ("torch", "numpy", "tqdm"):
            importlib.import_module(module)
        import explaind.epk_model  # noqa: F401
    from importlib.metadata import version

    return version("explaind")


# ----------------------------------------------------------------------------- measurement
@dataclass
class Usage:
    """Wall time, peak RSS increase and CPU contention of one measured block (filled on exit).

    ``foreign_cpu`` is the CPU time *other* processes used during the block, as a fraction of the
    whole machine (all cores × wall time): a timing taken while it is well above 0 was slowed by
    something else running on the machine. ``None`` where ``/proc/stat`` is unreadable.
    """

    seconds: float = float("nan")
    peak_rss_bytes: Optional[int] = None  # None: the peak could not be measured honestly here
    cpu_seconds: float = float("nan")  # CPU time of this process (all threads) during the block
    foreign_cpu: Optional[float] = None


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _machine_busy_ticks() -> Optional[int]:
    """Busy clock ticks of all CPUs since boot (``/proc/stat``: everything but idle and iowait)."""
    try:
        with open("/proc/stat", "r", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user/nice)
    return sum(fields[:8]) - fields[3] - fields[4]


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def foreign_load(window: float = 2.0) -> Optional[float]:
    """Share of the machine's CPU that *other* processes use, sampled over ``window`` seconds."""
    busy0, cpu0, t0 = _machine_busy_ticks(), time.process_time(), time.perf_counter()
    time.sleep(window)
    busy1, cpu1, t1 = _machine_busy_ticks(), time.process_time(), time.perf_counter()
    if busy0 is None or busy1 is None:
        return None
    foreign = (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - (cpu1 - cpu0)
    return min(1.0, max(0.0, foreign / ((t1 - t0) * (os.cpu_count() or 1))))


def wait_for_quiet(threshold: float = 0.1, max_wait: float = 120.0, window: float = 2.0) -> Optional[float]:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` of the CPU.

    Returns the last sampled foreign load (``None`` where ``/proc/stat`` is unreadable).
    """
    deadline = time.perf_counter() + max_wait
    load = foreign_load(window)
    while load is not None and load > threshold and time.perf_counter() < deadline:
        load = foreign_load(window)
    return load


@contextlib.contextmanager
def measure() -> Iterator[Usage]:
    """Measure wall time and peak RSS increase of the enclosed block (see module docstring)."""
    usage = Usage()
    _release_free_memory()
    ok = _reset_peak_rss()
    base = _proc_status_kib("VmRSS") if ok else None
    busy0 = _machine_busy_ticks()
    cpu0 = time.process_time()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - start
        usage.cpu_seconds = time.process_time() - cpu0
        busy1 = _machine_busy_ticks()
        peak = _proc_status_kib("VmHWM") if base is not None else None
        usage.peak_rss_bytes = None if peak is None or base is None else max(0, peak - base) * 1024
        if busy0 is not None and busy1 is not None and usage.seconds > 0:
            tick = os.sysconf("SC_CLK_TCK")
            ncpu = os.cpu_count() or 1
            foreign = (busy1 - busy0) / tick - usage.cpu_seconds
            usage.foreign_cpu = min(1.0, max(0.0, foreign / (usage.seconds * ncpu)))


# ----------------------------------------------------------------------------- results
@dataclass
class PathCheck:
    """Outcome of :meth:`ExplaindPeer.verify_path`.

    Attributes:
        steps (int): steps trained through the authors' wrappers.
        params_equal (bool): every logged θ_s equals the recorded one bit for bit.
        exp_avg_sq_equal (bool): every logged ``exp_avg_sq`` entry (keys and values) equals the
            list built from the trajectory, bit for bit.
        lr_equal (bool): every logged learning rate equals the recorded one.
        forward_equal (bool): the authors' model and :class:`ModAddTransformer` give bitwise
            equal float32 outputs at θ_N on the test inputs.
        max_param_diff (float): largest |difference| over all parameters and steps.
        seconds (float): wall time of the check.
    """

    steps: int
    params_equal: bool
    exp_avg_sq_equal: bool
    lr_equal: bool
    forward_equal: bool
    max_param_diff: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.params_equal and self.exp_avg_sq_equal and self.lr_equal and self.forward_equal

    def summary(self) -> str:
        verdict = "IDENTICAL (bit for bit)" if self.ok else "MISMATCH"
        return (
            f"explaind path check over {self.steps} steps: {verdict} — θ_s equal: {self.params_equal}, "
            f"exp_avg_sq equal: {self.exp_avg_sq_equal}, lr equal: {self.lr_equal}, "
            f"forward at θ_N equal: {self.forward_equal}, max |Δθ| = {self.max_param_diff:.3g} "
            f"({self.seconds:.1f} s)"
        )


@dataclass
class PeerResult:
    """One ``ExactPathKernelModel.predict`` call.

    Attributes:
        points (int): midpoint-rule points per step.
        steps (int): training steps integrated.
        n_inputs (int): test inputs explained.
        prediction (Tensor): ``[n, n_outputs]`` reconstructed outputs (float32, as returned).
        initial (Tensor): ``[n, n_outputs]`` f(θ_0) as computed by the package.
        seconds (float): wall time of ``predict``.
        peak_rss_bytes (int, optional): peak RSS increase during ``predict``.
        foreign_cpu (float, optional): share of the machine other processes used meanwhile.
    """

    points: int
    steps: int
    n_inputs: int
    prediction: torch.Tensor
    initial: torch.Tensor
    seconds: float
    peak_rss_bytes: Optional[int]
    foreign_cpu: Optional[float] = None
    log: str = field(default="", repr=False)


@dataclass
class KernelResult:
    """explaind's ``predict(..., keep_kernel_matrices=True)`` on one prefix of steps."""

    scores: torch.Tensor  # [n, n_train] per-sample contribution to the label output (our sign)
    change: torch.Tensor  # [n] its reconstructed change of the label output over the steps
    seconds: float
    peak_rss: Optional[int]
    foreign: Optional[float]
    steps: int
    n_inputs: int
    batch_sizes: List[int]


def _integral_eps(points: int) -> float:
    """The ``integral_eps`` for which the package uses exactly ``points`` midpoints."""
    if points < 1:
        raise ValueError(f"points must be ≥ 1, got {points}")
    eps = 1.0 / points
    # The package computes int(max(1, 1/eps)); nudge eps down if 1/eps rounds below points.
    while int(max(1, 1 / eps)) < points:
        eps = math.nextafter(eps, 0.0)
    if int(max(1, 1 / eps)) != points:
        raise ValueError(f"no integral_eps gives exactly {points} points")
    return eps


class _TargetsDataset(torch.utils.data.Dataset):
    """The minimal dataset ``DataPath`` needs: a ``targets`` list and a length."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.data = x
        self.targets: List[Any] = [int(v) for v in y]

    def __getitem__(self, index: int) -> Any:
        return self.data[index], self.targets[index]

    def __len__(self) -> int:
        return len(self.targets)


# ----------------------------------------------------------------------------- the peer
class ExplaindPeer:
    """The authors' ``ExactPathKernelModel`` on a trajectory recorded by this library.

    Args:
        trajectory (Trajectory): a full-batch (or mini-batch) AdamW run of
            :class:`~benchmarks.modadd.ModAddTransformer` recorded by ``TrajectoryRecorder``.
        data (ModAddData): the training data whose indices the trajectory's batches refer to.
        config (ModAddConfig): architecture and optimizer settings of the run.
        install (bool): install ``explaind==0.1.0`` if it is missing. Default: True
    """

    def __init__(self, trajectory: Trajectory, data: ModAddData, config: ModAddConfig, *, install: bool = True) -> None:
        self.version = ensure_explaind(install)
        if trajectory.family != "adamw":
            raise ValueError(f"the reference package is driven here for AdamW runs only, got {trajectory.family!r}")
        if trajectory.n_groups != 1:
            raise ValueError("the reference package reads hyperparameters of parameter group 0 only")
        self.trajectory = trajectory
        self.data = data
        self.config = config
        self.device = torch.device("cpu")
        self.num_steps = trajectory.num_steps

        probe = self.reference_model()
        self.unused = {n: probe.state_dict()[n].detach().clone() for n in UNUSED_REFERENCE_PARAMS}
        self.keys = list(probe.state_dict().keys())
        missing = set(self.keys) - set(trajectory.trainable) - set(self.unused)
        if missing:
            raise ValueError(f"the trajectory lacks the reference model's parameters {sorted(missing)}")

        self.model_checkpoints = [self.reference_state_dict(trajectory.params(s)) for s in range(self.num_steps + 1)]
        zero = {"model." + k: torch.zeros_like(v) for k, v in self.model_checkpoints[0].items()}
        self.optimizer_checkpoints: List[Dict[str, Any]] = [{"exp_avg_sq": zero, "exp_avg": dict(zero)}]
        self.data_checkpoints: List[Dict[str, torch.Tensor]] = []
        for s in range(1, self.num_steps + 1):
            rec = trajectory.record(s)
            state = trajectory.state(s, "exp_avg_sq")
            entry: Dict[str, Any] = {
                # torch's own state_dict order (the package keys it by parameter index → name)
                "exp_avg_sq": {"model." + k: state[k] for k in self.keys if k in state},
                "exp_avg": {},  # never read by predict
                "lr": float(rec.lr[0]),
            }
            if "weight_decay" in rec.groups[0]:
                entry["weight_decay"] = float(rec.groups[0]["weight_decay"])
            self.optimizer_checkpoints.append(entry)
            idx = torch.cat([b.indices for b in rec.batches])
            self.data_checkpoints.append({"X": data.train_x[idx], "y": data.train_y[idx], "indices": idx})

    # ------------------------------------------------------------------ the authors' objects
    def reference_model(self) -> nn.Module:
        """A fresh ``SingleLayerTransformerClassifier`` of the run's shape (float32, CPU)."""
        from explaind.modulo_model.model import SingleLayerTransformerClassifier

        c = self.config
        if c.n_heads != 4:
            raise ValueError("the authors' model has exactly 4 heads")
        return SingleLayerTransformerClassifier(c.n_token, d_model=c.d_model, nhead=c.n_heads, dim_mlp=c.d_mlp, dropout=0.0)

    def reference_state_dict(self, params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Our parameters as a state dict of the authors' model (same keys, plus its unused ``pe``)."""
        return {k: (self.unused[k] if k in self.unused else params[k]).detach().clone() for k in self.keys}

    def _model_path(self, checkpoints: Optional[List[Dict[str, torch.Tensor]]] = None) -> Any:
        from explaind.model_paths import ModelPath

        model = self.reference_model()
        return ModelPath(
            model,
            device=self.device,
            checkpoints=self.model_checkpoints if checkpoints is None else checkpoints,
            output_dim=self.config.n_token,
        )

    def _optimizer_path(self, model_path: Any, checkpoints: List[Dict[str, Any]], **kw: Any) -> Any:
        from explaind.optimizer_paths import AdamWOptimizerPath

        c = self.config
        return AdamWOptimizerPath(
            model_path,
            lr=c.lr,
            betas=c.betas,
            eps=c.eps,
            weight_decay=c.weight_decay,
            checkpoints=checkpoints,
            device=self.device,
            **kw,
        )

    def _data_path(self, steps: int) -> Any:
        from explaind.data_paths import DataPath

        loader = torch.utils.data.DataLoader(_TargetsDataset(self.data.train_x, self.data.train_y), batch_size=self.data.n_train)
        dp = DataPath(loader, checkpoint_path=None, full_batch=True)
        dp.checkpoints = list(self.data_checkpoints[:steps])
        return dp

    # ------------------------------------------------------------------ the package's model
    def epk_model(self, points: int, steps: Optional[int] = None, **extra: Any) -> Any:
        """explaind's ``ExactPathKernelModel`` over the first ``steps`` steps, n-point midpoint rule.

        Args:
            points (int): midpoints per step (``integral_eps = early_integral_eps = 1/points``).
            steps (int, optional): steps to integrate. Default: all
            **extra: further constructor arguments (e.g. ``keep_param_wise_kernel=True``).

        Returns:
            *ExactPathKernelModel*
        """
        from explaind.epk_model import ExactPathKernelModel
        from explaind.modulo_model.loss import RegularizedCrossEntropyLoss

        steps = self.num_steps if steps is None else int(steps)
        eps = _integral_eps(points)
        model_path = self._model_path(self.model_checkpoints[: steps + 1])
        optimizer_path = self._optimizer_path(model_path, self.optimizer_checkpoints[: steps + 1])
        options = dict(
            integral_eps=eps,
            early_integral_eps=eps,
            early_steps=0,
            train_set_size=self.data.n_train,
            features_to_cpu=False,
            device=self.device,
            evaluate_predictions=False,
            kernel_store_interval=float("nan"),
        )
        options.update(extra)
        return ExactPathKernelModel(
            model=model_path,
            optimizer=optimizer_path,
            loss_fn=RegularizedCrossEntropyLoss(alpha=0.0),
            data_path=self._data_path(steps),
            **options,
        )

    def predict_kernels(self, inputs: torch.Tensor, labels: torch.Tensor, points: int, *,
                        steps: Optional[int] = None) -> KernelResult:
        """The authors' data view: ``predict(x, keep_kernel_matrices=True)``, n-point midpoint rule.

        Its ``train_feature_map`` keeps a momentum buffer ``[1, n_train, P_name]`` per parameter
        (one row per training sample) and every step's kernel covers all training samples. The
        returned ``kernel`` (name → ``[n, 1, n_outputs, n_train]``) holds Σ_s η_s · kernel_s; the
        package's prediction is ``f(θ_0) + Σ_s η_s Σ_k kernel_s[k] / |B_s| + regularization`` (its
        train features are gradients of the label's log-probability, i.e. −∇L), so sample k's
        contribution to the label output is ``Σ_name kernel[name][:, 0, y, k] / |B|`` — exact only
        when every step has the same batch size |B| (MATH.md §12 R1).
        """
        steps = self.num_steps if steps is None else int(steps)
        batch_sizes = [int(self.data_checkpoints[s]["indices"].numel()) for s in range(steps)]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            epk = self.epk_model(points, steps)
            gc.collect()
            with measure() as usage:
                prediction, initial, kernel, _reg, _ = epk.predict(inputs, is_train=False, keep_kernel_matrices=True)
        n = int(inputs.shape[0])
        total = sum(v.detach().double() for v in kernel.values())  # [n, 1, O, n_train]
        idx = labels.view(-1, 1, 1).expand(n, 1, total.shape[-1])
        scores = total[:, 0].gather(1, idx)[:, 0] / batch_sizes[0]
        change = (prediction - initial).detach().double().gather(1, labels.view(-1, 1))[:, 0]
        return KernelResult(scores, change, usage.seconds, usage.peak_rss_bytes, usage.foreign_cpu, steps, n,
                            batch_sizes)

    # ------------------------------------------------------------------ prediction
    def predict(self, inputs: torch.Tensor, points: int, *, steps: Optional[int] = None, quiet: bool = True) -> PeerResult:
        """Run ``ExactPathKernelModel.predict`` with an n-point midpoint rule.

        Args:
            inputs (Tensor): ``[n, 4]`` test tokens.
            points (int): midpoints per step (``integral_eps = 1/points``).
            steps (int, optional): integrate only the first ``steps`` training steps (the
                prediction is then of f(θ_steps)); used to time long settings on a prefix of
                the run. Default: all
            quiet (bool): swallow the package's prints (its progress bar, on stderr, stays).

        Returns:
            *PeerResult*
        """
        steps = self.num_steps if steps is None else int(steps)
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in 1..{self.num_steps}, got {steps}")
        log = io.StringIO()
        with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
            epk = self.epk_model(points, steps)
            x = inputs.to(self.device)
            with measure() as usage:
                prediction, initial, *_ = epk.predict(x, is_train=False, keep_kernel_matrices=False)
        return PeerResult(
            points=points,
            steps=steps,
            n_inputs=int(inputs.shape[0]),
            prediction=prediction.detach().cpu(),
            initial=initial.detach().cpu(),
            seconds=usage.seconds,
            peak_rss_bytes=usage.peak_rss_bytes,
            foreign_cpu=usage.foreign_cpu,
            log=log.getvalue(),
        )

    # ------------------------------------------------------------------ verification
    def verify_path(self, our_model: ModAddTransformer, *, steps: Optional[int] = None) -> PathCheck:
        """Retrain through the authors' wrappers from the recorded θ_0 and compare bit for bit.

        Trains ``SingleLayerTransformerClassifier`` wrapped in ``ModelPath`` with
        ``AdamWOptimizerPath`` (``track_lr=True``) on the recorded batches, exactly as the
        authors' training script does (``optimizer.step()``, then ``model.log_checkpoint()`` and
        ``optimizer.log_checkpoint()``), then compares what those wrappers logged with the lists
        :meth:`predict` uses, and the two models' float32 outputs at θ_N.
        """
        from explaind.modulo_model.loss import RegularizedCrossEntropyLoss

        steps = self.num_steps if steps is None else int(steps)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            reference = self.reference_model()
            reference.load_state_dict(self.model_checkpoints[0])
            model_path = self._model_path_training(reference)
            optimizer_path = self._optimizer_path(model_path, [], track_lr=True)
            loss_fn = RegularizedCrossEntropyLoss(alpha=0.0, device="cpu")
            for s in range(1, steps + 1):
                batch = self.data_checkpoints[s - 1]
                optimizer_path.zero_grad()
                output = model_path.forward(batch["X"])
                loss, _ = loss_fn(output, batch["y"], params=model_path.parameters(), output_reg=True)
                loss.backward()
                optimizer_path.step()
                model_path.log_checkpoint()
                optimizer_path.log_checkpoint()

        params_equal, max_diff = True, 0.0
        for s in range(steps + 1):
            theirs, ours = model_path.checkpoints[s], self.model_checkpoints[s]
            if set(theirs) != set(ours):
                params_equal = False
                continue
            for k in ours:
                if not torch.equal(theirs[k], ours[k]):
                    params_equal = False
                    max_diff = max(max_diff, float((theirs[k].double() - ours[k].double()).abs().max()))
        state_equal = lr_equal = True
        for s in range(1, steps + 1):
            theirs_s, ours_s = optimizer_path.checkpoints[s], self.optimizer_checkpoints[s]
            a, b = theirs_s["exp_avg_sq"], ours_s["exp_avg_sq"]
            if list(a) != list(b) or not all(torch.equal(a[k], b[k]) for k in b):
                state_equal = False
            if theirs_s.get("lr") != ours_s["lr"]:
                lr_equal = False
        z_theirs, z_ours = optimizer_path.checkpoints[0]["exp_avg_sq"], self.optimizer_checkpoints[0]["exp_avg_sq"]
        if list(z_theirs) != list(z_ours) or not all(torch.equal(z_theirs[k], z_ours[k]) for k in z_ours):
            state_equal = False

        final = self.model_checkpoints[steps]
        reference.load_state_dict(final)
        reference.eval()
        with torch.no_grad():
            out_theirs = reference(self.data.test_x)
        out_ours = forward_at(our_model, {k: v for k, v in final.items() if k not in self.unused}, self.data.test_x, torch.float32)
        return PathCheck(
            steps=steps,
            params_equal=params_equal,
            exp_avg_sq_equal=state_equal,
            lr_equal=lr_equal,
            forward_equal=bool(torch.equal(out_theirs, out_ours)),
            max_param_diff=max_diff,
            seconds=time.perf_counter() - start,
        )

    def _model_path_training(self, model: nn.Module) -> Any:
        """A ``ModelPath`` that logs its own history from ``model``'s current weights (θ_0)."""
        from explaind.model_paths import ModelPath

        return ModelPath(model, device=self.device, checkpoints=None, output_dim=self.config.n_token)
