"""Independent brute-force reference for the ExPLAIND / Exact Path Kernel decomposition.

Written from ``/work/shared/MATH.md`` alone, for tiny models in float64. It deliberately does not
import anything from ``captum_explaind.epk`` or ``captum_explaind.attr`` (the code under test); it
only reads recorded data through :class:`captum_explaind.Trajectory`.

Conventions (MATH.md §1–§4):

* Steps ``s = 1..N``; every array indexed by step uses position ``s - 1``.
* ``θ`` is flattened over ``traj.trainable`` in that order (see :func:`param_slices`).
* ``Δ_s^{(k)}`` is the part of the update of step ``s`` that comes from training sample ``k``;
  the descent minus sign sits inside it. Scores ``Γ = φ_s(x)[j, p] · Δ_s^{(k)}[p]`` are signed
  contributions to the model output, so ``f_N = f_0 + ΣΓ + ΣReg + ΣRes``.
* Momentum sums are explicit double sums over (application step s, gradient step i) with
  closed-form weights ``w_{s,i}`` (products of the per-step β's), never a recursive buffer. A
  separate line-by-line mimic of ``torch.optim`` gives ``delta_replayed`` and Adam's second moment.
"""

from __future__ import annotations

import copy
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev

from captum_explaind import Trajectory

DTYPE = torch.float64
LOSSES = ("nll", "ce", "mse")
VARIANTS = (
    "exact",
    "lr_next",  # η_{s+1} instead of η_s (MATH §12 P1)
    "no_clip",  # c_i := 1 (only meaningful as a control for runs without accumulation)
    "damp_first",  # SGD: dampening also on the first momentum step
    "indicator_at_application",  # a_{s,k} of the application step on every momentum term (P4)
    "batch_size_of_application",  # 1/|B_s| of the application step for all momentum terms (R1)
    "uniform_batch",  # a = n_k/|B_i| over the whole step, ignoring unequal micro-batches
    "loss_grad_outside",  # dL/df taken at the application step s, outside the momentum sum (P5)
)

IndexSel = Union[None, int, slice, Sequence[int], torch.Tensor]


# ----------------------------------------------------------------------------- losses
def per_sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss ``[n]`` for outputs ``out [n, O]`` and integer labels ``y [n]``.

    ``"nll"``: outputs are log-probabilities, ``-out[y]``; ``"ce"``: outputs are logits,
    ``-log_softmax(out)[y]``; ``"mse"``: ``Σ_j (out_j - onehot(y)_j)²``.
    """
    if loss == "nll":
        return -out.gather(1, y.view(-1, 1)).squeeze(1)
    if loss == "ce":
        return -out.log_softmax(-1).gather(1, y.view(-1, 1)).squeeze(1)
    if loss == "mse":
        target = torch.zeros_like(out)
        target[torch.arange(out.shape[0]), y] = 1.0
        return ((out - target) ** 2).sum(-1)
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


# ----------------------------------------------------------------------------- parameters
def param_slices(traj: Trajectory) -> Dict[str, slice]:
    """Position of each trainable parameter tensor in the flat vector θ ∈ R^P."""
    out, start = {}, 0
    for name in traj.trainable:
        n = traj.spec[name].numel
        out[name] = slice(start, start + n)
        start += n
    return out


def num_params(traj: Trajectory) -> int:
    """P: number of trainable scalars."""
    return sum(traj.spec[n].numel for n in traj.trainable)


def flat_params(traj: Trajectory, s: int) -> torch.Tensor:
    """θ_s flattened to ``[P]`` in float64 (``s = 0`` is θ_0)."""
    p = traj.params(s, dtype=DTYPE)
    return torch.cat([p[n].reshape(-1) for n in traj.trainable])


def all_flat_params(traj: Trajectory) -> torch.Tensor:
    """``[N+1, P]``: θ_0 … θ_N."""
    return torch.stack([flat_params(traj, s) for s in range(traj.num_steps + 1)])


def unflatten(traj: Trajectory, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Split a flat ``[P]`` vector into named tensors of the recorded shapes (views keep autograd)."""
    return {name: theta[sl].view(traj.spec[name].shape) for name, sl in param_slices(traj).items()}


def as_float64(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (the caller's model is left untouched)."""
    return copy.deepcopy(model).to(DTYPE)


_FROZEN: "weakref.WeakKeyDictionary[Trajectory, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def frozen_params(traj: Trajectory) -> Dict[str, torch.Tensor]:
    """``traj.frozen_params()`` in float64, read once per trajectory object."""
    if traj not in _FROZEN:
        _FROZEN[traj] = traj.frozen_params(dtype=DTYPE)
    return _FROZEN[traj]


def call_model(model: nn.Module, traj: Trajectory, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Model output ``[n, O]`` at flat trainable parameters ``theta``; frozen ones from θ_0."""
    params = dict(frozen_params(traj))
    params.update(unflatten(traj, theta))
    if x.is_floating_point():
        x = x.to(DTYPE)
    return functional_call(model, params, (x,))


# ----------------------------------------------------------------------------- recorded data
def sample_weights(record, num_train: int) -> torch.Tensor:
    """``a_s [M]``: Σ over micro-batches of the recorded weight of each sample (duplicates add)."""
    a = torch.zeros(num_train, dtype=DTYPE)
    for mb in record.batches:
        a.index_add_(0, mb.indices.long(), mb.weights.to(DTYPE))
    return a


def per_sample_grads(model: nn.Module, traj: Trajectory, theta: torch.Tensor, X: torch.Tensor,
                     Y: torch.Tensor, loss: str) -> torch.Tensor:
    """``G [M, P]``: ∇_θ L(f(θ; x_k), y_k), one sample at a time with ``torch.autograd``."""
    rows = []
    for k in range(X.shape[0]):
        th = theta.detach().clone().requires_grad_(True)
        value = per_sample_loss(call_model(model, traj, th, X[k:k + 1]), Y[k:k + 1], loss).sum()
        (g,) = torch.autograd.grad(value, th, allow_unused=True)
        rows.append(torch.zeros_like(theta) if g is None else g)
    return torch.stack(rows)


def _group_hyper(record, group: int) -> Dict:
    """Hyperparameters of one param group at one step, with ``lr`` included."""
    h = dict(record.groups[group])
    h["lr"] = float(record.lr[group])
    return h


# ----------------------------------------------------------------------------- closed-form weights
def momentum_weights(traj: Trajectory, records: List, damp_first: bool = False) -> torch.Tensor:
    """``W [N, N, P]`` with ``W[s-1, i-1, p] = w_{s,i}`` (MATH §3 table), per scalar parameter.

    Built from explicit products of the per-step hyperparameters (so schedules that change
    momentum / β1, e.g. OneCycleLR, are covered):

    * SGD, step s with μ_s = 0: ``w_{s,i} = [i=s]``.
    * SGD, μ_s > 0: let ``S`` = active steps j ≤ s with μ_j > 0 (the steps that touched the buffer).
      For i ∈ S: ``h_i = 1`` for the first element of S (the undamped clone), else ``1 − τ_i``;
      ``b-weight = h_i · Π_{j∈S, i<j≤s} μ_j``; plain: ``w = b-weight``; nesterov:
      ``w = [i=s] + μ_s · b-weight``.
    * Adam/AdamW: with t_s the parameter's Adam step count at s (number of active steps ≤ s),
      ``w_{s,i} = (1−β1_i) Π_{active j, i<j≤s} β1_j / (1 − β1_s^{t_s})``.

    Rows of steps where a parameter was inactive (no ``.grad``; torch skips it) are zero, and
    inactive steps are not momentum steps.
    """
    N, P = traj.num_steps, num_params(traj)
    W = torch.zeros(N, N, P, dtype=DTYPE)
    for name, sl in param_slices(traj).items():
        group = traj.spec[name].group
        active = [name not in rec.inactive for rec in records]
        hyp = [_group_hyper(rec, group) for rec in records]
        for s in range(1, N + 1):
            if not active[s - 1]:
                continue
            hs = hyp[s - 1]
            if traj.family == "sgd":
                mu_s = float(hs.get("momentum", 0.0))
                if mu_s == 0.0:
                    W[s - 1, s - 1, sl] = 1.0
                    continue
                S = [j for j in range(1, s + 1) if active[j - 1] and float(hyp[j - 1].get("momentum", 0.0)) != 0.0]
                for i in S:
                    tau_i = float(hyp[i - 1].get("dampening", 0.0))
                    h_i = 1.0 if (i == S[0] and not damp_first) else 1.0 - tau_i
                    prod = 1.0
                    for j in S:
                        if i < j <= s:
                            prod *= float(hyp[j - 1]["momentum"])
                    b_weight = h_i * prod
                    if hs.get("nesterov", False):
                        W[s - 1, i - 1, sl] += mu_s * b_weight
                    else:
                        W[s - 1, i - 1, sl] += b_weight
                if hs.get("nesterov", False):
                    W[s - 1, s - 1, sl] += 1.0
            elif traj.family in ("adam", "adamw"):
                t_s = sum(active[:s])
                beta1_s = float(hs["betas"][0])
                bc1 = 1.0 - beta1_s ** t_s
                for i in range(1, s + 1):
                    if not active[i - 1]:
                        continue
                    prod = 1.0
                    for j in range(i + 1, s + 1):
                        if active[j - 1]:
                            prod *= float(hyp[j - 1]["betas"][0])
                    W[s - 1, i - 1, sl] = (1.0 - float(hyp[i - 1]["betas"][0])) * prod / bc1
            else:
                raise ValueError(f"no exact update model for optimizer family {traj.family!r}")
    return W


# ----------------------------------------------------------------------------- torch mimic
def _torch_mimic(traj: Trajectory, records: List, theta: torch.Tensor, grads: torch.Tensor,
                 scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Line-by-line forward replay of ``torch.optim`` (teacher-forced at the recorded θ_{s−1}).

    Args:
        theta: ``[N+1, P]`` recorded parameters; grads: ``[N, P]`` batch gradients g_s;
        scale: ``[N]`` global scale c_s.

    Returns:
        ``(delta [N, P], D [N, P], v [N, P])``: replayed update, preconditioner ``1/d_s`` (ones for
        SGD, zeros where inactive) and Adam's ``exp_avg_sq`` after each step (zeros for SGD).
    """
    N, P = grads.shape
    delta = torch.zeros(N, P, dtype=DTYPE)
    D = torch.zeros(N, P, dtype=DTYPE)
    v_out = torch.zeros(N, P, dtype=DTYPE)
    decoupled = traj.family == "adamw"
    for name, sl in param_slices(traj).items():
        group = traj.spec[name].group
        buf = None  # SGD momentum buffer
        m = v = vmax = None
        t = 0
        for s in range(1, N + 1):
            rec = records[s - 1]
            if name in rec.inactive:
                if v is not None:
                    v_out[s - 1, sl] = v
                continue
            h = _group_hyper(rec, group)
            p_prev = theta[s - 1, sl]
            grad = scale[s - 1] * grads[s - 1, sl]
            if h.get("maximize", False):
                grad = -grad
            wd = float(h.get("weight_decay", 0.0))
            lr = h["lr"]
            if traj.family == "sgd":
                if wd != 0.0:
                    grad = grad + wd * p_prev
                mu = float(h.get("momentum", 0.0))
                if mu != 0.0:
                    if buf is None:
                        buf = grad.clone()
                    else:
                        buf = mu * buf + (1.0 - float(h.get("dampening", 0.0))) * grad
                    grad = grad + mu * buf if h.get("nesterov", False) else buf
                delta[s - 1, sl] = -lr * grad
                D[s - 1, sl] = 1.0
            else:
                beta1, beta2 = (float(b) for b in h["betas"])
                eps = float(h["eps"])
                t += 1
                new_p = p_prev.clone()
                if wd != 0.0:
                    if decoupled:
                        new_p = new_p * (1.0 - lr * wd)
                    else:
                        grad = grad + wd * p_prev
                if m is None:
                    m = torch.zeros_like(grad)
                    v = torch.zeros_like(grad)
                    vmax = torch.zeros_like(grad)
                m = beta1 * m + (1.0 - beta1) * grad
                v = beta2 * v + (1.0 - beta2) * grad * grad
                if h.get("amsgrad", False):
                    vmax = torch.maximum(vmax, v)
                    vbar = vmax
                else:
                    vbar = v
                bc1 = 1.0 - beta1 ** t
                bc2 = 1.0 - beta2 ** t
                d = vbar.sqrt() / bc2 ** 0.5 + eps
                new_p = new_p - (lr / bc1) * m / d
                delta[s - 1, sl] = new_p - p_prev
                D[s - 1, sl] = 1.0 / d
                v_out[s - 1, sl] = v
    return delta, D, v_out


# ----------------------------------------------------------------------------- replay
def replay(model: nn.Module, traj: Trajectory, X: torch.Tensor, Y: torch.Tensor, loss: str) -> Dict:
    """Replay a recorded run from per-sample loss gradients and split every update exactly.

    No recorded optimizer state is used: the batch gradient of step s is rebuilt as
    ``g_s = Σ_k a_{s,k} G_{s,k}`` from the recorded micro-batches and per-sample gradients at the
    recorded θ_{s−1}; the global scale is ``c_s = record.grad_norm / ‖g_s‖`` (clipping and the
    1/n_micro accumulation factor); hyperparameters and lr are the ones recorded for step s.

    Returns a dict (step-indexed arrays use position s−1; P = trainable scalars, M = len(X)):

    * ``theta`` [N+1, P]: recorded θ_0..θ_N.
    * ``delta_actual`` [N, P]: θ_s − θ_{s−1} from the trajectory.
    * ``delta_replayed`` [N, P]: the full update of a line-by-line torch mimic.
    * ``per_sample`` [N, M, P]: Δ_s^{(k)} (MATH §3, loss gradient inside the momentum sum; the
      descent minus sign included).
    * ``reg`` [N, P]: Δ_s^{(reg)}.
    * ``residual`` [N, P]: delta_actual − Σ_k per_sample − reg.
    * ingredients: ``G`` [N, M, P] per-sample gradients at θ_{s−1} (every sample, every step),
      ``a`` [N, M] recorded weights, ``c`` [N], ``grad`` [N, P] = g_s, ``eta`` [N, P],
      ``sign`` [N, P] (−1 where ``maximize``), ``lam_coupled`` / ``lam_decoupled`` [N, P],
      ``active`` [N, P] bool, ``D`` [N, P] (1/d_s for Adam, 1 for SGD), ``v`` [N, P] replayed
      ``exp_avg_sq``, ``W`` [N, N, P] closed-form momentum weights, ``batch_size`` [N] (entries
      over all micro-batches), ``micro_sizes`` list of lists, ``records``.
    """
    model = as_float64(model)
    N, M, P = traj.num_steps, X.shape[0], num_params(traj)
    records = [traj.record(s) for s in range(1, N + 1)]
    theta = all_flat_params(traj)
    slices = param_slices(traj)

    G = torch.zeros(N, M, P, dtype=DTYPE)
    a = torch.zeros(N, M, dtype=DTYPE)
    grad = torch.zeros(N, P, dtype=DTYPE)
    c = torch.ones(N, dtype=DTYPE)
    eta = torch.zeros(N, P, dtype=DTYPE)
    sign = torch.ones(N, P, dtype=DTYPE)
    lam_c = torch.zeros(N, P, dtype=DTYPE)
    lam_d = torch.zeros(N, P, dtype=DTYPE)
    active = torch.zeros(N, P, dtype=torch.bool)
    for s in range(1, N + 1):
        rec = records[s - 1]
        for name, sl in slices.items():
            h = _group_hyper(rec, traj.spec[name].group)
            active[s - 1, sl] = name not in rec.inactive
            eta[s - 1, sl] = h["lr"]
            sign[s - 1, sl] = -1.0 if h.get("maximize", False) else 1.0
            wd = float(h.get("weight_decay", 0.0))
            if traj.family == "adamw":
                lam_d[s - 1, sl] = wd
            else:
                lam_c[s - 1, sl] = wd
        G[s - 1] = per_sample_grads(model, traj, theta[s - 1], X, Y, loss) * active[s - 1]
        a[s - 1] = sample_weights(rec, M)
        grad[s - 1] = a[s - 1] @ G[s - 1]
        norm = float(grad[s - 1].norm())
        c[s - 1] = rec.grad_norm / norm if norm > 0 else 1.0

    delta_replayed, D, v = _torch_mimic(traj, records, theta, grad, c)
    rep = {
        "theta": theta,
        "delta_actual": theta[1:] - theta[:-1],
        "delta_replayed": delta_replayed,
        "G": G, "a": a, "c": c, "grad": grad, "eta": eta, "sign": sign,
        "lam_coupled": lam_c, "lam_decoupled": lam_d, "active": active, "D": D, "v": v,
        "W": momentum_weights(traj, records),
        "batch_size": torch.tensor([sum(len(mb.indices) for mb in r.batches) for r in records], dtype=DTYPE),
        "micro_sizes": [[len(mb.indices) for mb in r.batches] for r in records],
        "records": records,
        "family": traj.family,
        "traj": traj,
        "model": model, "X": X, "Y": Y, "loss": loss,
    }
    per_sample, reg = split_update(rep)
    rep["per_sample"] = per_sample
    rep["reg"] = reg
    rep["residual"] = rep["delta_actual"] - per_sample.sum(1) - reg
    return rep


def split_update(rep: Dict, variant: str = "exact") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(per_sample [N, M, P], reg [N, P])`` by the explicit double sum of MATH §3.

    ``Δ_s^{(k)} = −η_s ⊙ D_s ⊙ Σ_{i≤s} w_{s,i} · σ_i c_i a_{i,k} G_{i,k}`` and
    ``Δ_s^{(reg)} = −η_s ⊙ D_s ⊙ Σ_{i≤s} w_{s,i} λ^C_i ⊙ θ_{i−1} − η_s ⊙ λ^D_s ⊙ θ_{s−1}``.
    ``variant`` (see :data:`VARIANTS`) deliberately applies one of the wrong formulas of MATH §11
    so that tests can show the reference detects them; ``"exact"`` is the correct one.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    G, a, c, theta = rep["G"], rep["a"], rep["c"], rep["theta"]
    N, M, P = G.shape
    eta, D, sign, act = rep["eta"], rep["D"], rep["sign"], rep["active"].to(DTYPE)
    W = rep["W"]
    if variant == "lr_next":
        eta = torch.cat([eta[1:], eta[-1:]])
    if variant == "no_clip":
        c = torch.ones_like(c)
    if variant == "damp_first":
        W = momentum_weights(rep["traj"], rep["records"], damp_first=True)
    if variant == "batch_size_of_application":
        # a_{i,k} · |B_i| is the multiplicity (runs without accumulation); divided by |B_s| below.
        counts = a * rep["batch_size"][:, None]
    if variant == "uniform_batch":
        # n_{i,k}/|B_i| over the whole step instead of Σ_m n_{m,k}/(A·|m|). The recorded weights
        # lack the 1/A accumulation factor (c_i absorbs it), so express the wrong weight in the
        # same units: multiply by A = number of micro-batches.
        counts = torch.zeros(N, M, dtype=DTYPE)
        n_micro = torch.zeros(N, dtype=DTYPE)
        for s, rec in enumerate(rep["records"]):
            n_micro[s] = len(rec.batches)
            for mb in rec.batches:
                counts[s].index_add_(0, mb.indices.long(), torch.ones(len(mb.indices), dtype=DTYPE))
        a = counts / rep["batch_size"][:, None] * n_micro[:, None]
    if variant == "loss_grad_outside":
        Jk, dLdf = _sample_jacobians_and_loss_grads(rep)

    per_sample = torch.zeros(N, M, P, dtype=DTYPE)
    reg = torch.zeros(N, P, dtype=DTYPE)
    for s in range(1, N + 1):
        pre = -eta[s - 1] * D[s - 1]  # [P]
        for i in range(1, s + 1):
            w = W[s - 1, i - 1]  # [P]
            if variant == "indicator_at_application":
                weight_ik = a[s - 1]  # membership/weight of the application step (wrong)
            elif variant == "batch_size_of_application":
                weight_ik = counts[i - 1] / rep["batch_size"][s - 1]
            else:
                weight_ik = a[i - 1]
            if variant == "loss_grad_outside":
                # J_f(θ_{i−1}; x_k)ᵀ · ∂L/∂f at θ_{s−1}: the loss derivative of the application step
                G_ik = torch.einsum("kop,ko->kp", Jk[i - 1], dLdf[s - 1]) * act[i - 1]
            else:
                G_ik = G[i - 1]
            per_sample[s - 1] += pre * w * sign[i - 1] * act[i - 1] * c[i - 1] * weight_ik[:, None] * G_ik
            reg[s - 1] += pre * w * act[i - 1] * rep["lam_coupled"][i - 1] * theta[i - 1]
        reg[s - 1] += -eta[s - 1] * act[s - 1] * rep["lam_decoupled"][s - 1] * theta[s - 1]
    return per_sample, reg


def _sample_jacobians_and_loss_grads(rep: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(J [N, M, O, P], dL/df [N, M, O])`` of every training sample at every θ_{s−1}."""
    model, traj, X, Y, loss = rep["model"], rep["traj"], rep["X"], rep["Y"], rep["loss"]
    Js, dLs = [], []
    for s in range(1, traj.num_steps + 1):
        theta = rep["theta"][s - 1]
        Js.append(jacobian(model, traj, theta, X))
        out = call_model(model, traj, theta, X).detach().requires_grad_(True)
        (dL,) = torch.autograd.grad(per_sample_loss(out, Y, loss).sum(), out)
        dLs.append(dL)
    return torch.stack(Js), torch.stack(dLs)


# ----------------------------------------------------------------------------- quadrature
def gauss_legendre(nodes: int = 16, panels: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Composite Gauss–Legendre rule on [0, 1]: ``panels`` equal pieces, ``nodes`` points each."""
    xi, wt = np.polynomial.legendre.leggauss(nodes)
    ts, ws = [], []
    h = 1.0 / panels
    for p in range(panels):
        ts.append((p + (xi + 1.0) / 2.0) * h)
        ws.append(wt / 2.0 * h)
    return torch.tensor(np.concatenate(ts), dtype=DTYPE), torch.tensor(np.concatenate(ws), dtype=DTYPE)


def jacobian(model: nn.Module, traj: Trajectory, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``J [Q, O, P]``: ∂f(θ; x_q)_j / ∂θ_p, explicit (``torch.func.jacrev``)."""
    return jacrev(lambda th: call_model(model, traj, th, x))(theta.detach())


def phi(model: nn.Module, traj: Trajectory, x_test: torch.Tensor, s: int, nodes: int = 16,
        panels: int = 1) -> torch.Tensor:
    """``Φ_s(x) [Q, O, P] = ∫_0^1 J_f(θ_{s−1} + tΔ_s; x) dt`` (recorded endpoints, composite GL)."""
    model = as_float64(model)
    th0, th1 = flat_params(traj, s - 1), flat_params(traj, s)
    t, w = gauss_legendre(nodes, panels)
    out = 0.0
    for tn, wn in zip(t, w):
        out = out + wn * jacobian(model, traj, th0 + tn * (th1 - th0), x_test)
    return out


# ----------------------------------------------------------------------------- dense tensor
def dense_influence(model: nn.Module, traj: Trajectory, X: torch.Tensor, Y: torch.Tensor,
                    x_test: torch.Tensor, loss: str, nodes: int = 16, panels: int = 1,
                    rep: Optional[Dict] = None, variant: str = "exact") -> Dict:
    """The full influence tensor of MATH §4.

    Returns a dict:

    * ``Gamma`` [N, P, Q, M, O]: ``Γ[s,p,q,k,j] = Φ_s(x_q)[j,p] · Δ_s^{(k)}[p]``.
    * ``Reg`` [N, P, Q, O]: ``Φ_s(x_q)[j,p] · Δ_s^{(reg)}[p]``.
    * ``Res`` [N, P, Q, O]: ``Φ_s(x_q)[j,p] · residual_s[p]``.
    * ``f0``, ``fN`` [Q, O]: model outputs at θ_0 and θ_N; ``f`` [N+1, Q, O] at every θ_s.
    * ``phi`` [N, Q, O, P], ``replay`` (the :func:`replay` dict), ``per_sample`` and ``reg`` used.

    ``variant != "exact"`` builds Γ/Reg from a deliberately wrong split (negative controls); the
    residual is then whatever that split leaves unexplained.
    """
    if rep is None:
        rep = replay(model, traj, X, Y, loss)
    if variant == "exact":
        per_sample, reg = rep["per_sample"], rep["reg"]
    else:
        per_sample, reg = split_update(rep, variant)
    residual = rep["delta_actual"] - per_sample.sum(1) - reg
    N = traj.num_steps
    phis = torch.stack([phi(model, traj, x_test, s, nodes, panels) for s in range(1, N + 1)])
    Gamma = torch.einsum("sqjp,skp->spqkj", phis, per_sample)
    Reg = torch.einsum("sqjp,sp->spqj", phis, reg)
    Res = torch.einsum("sqjp,sp->spqj", phis, residual)
    m64 = as_float64(model)
    with torch.no_grad():
        f = torch.stack([call_model(m64, traj, rep["theta"][s], x_test) for s in range(N + 1)])
    return {"Gamma": Gamma, "Reg": Reg, "Res": Res, "f0": f[0], "fN": f[-1], "f": f, "phi": phis,
            "replay": rep, "per_sample": per_sample, "reg": reg, "residual": residual}


# ----------------------------------------------------------------------------- reducers
def kernel_total(dense: Dict) -> torch.Tensor:
    """``[Q, O]``: Σ over steps, parameters and training samples of Γ."""
    return dense["Gamma"].sum(dim=(0, 1, 3))


def reg_total(dense: Dict) -> torch.Tensor:
    """``[Q, O]``: Σ over steps and parameters of Reg."""
    return dense["Reg"].sum(dim=(0, 1))


def residual_total(dense: Dict) -> torch.Tensor:
    """``[Q, O]``: Σ over steps and parameters of Res."""
    return dense["Res"].sum(dim=(0, 1))


def completeness_error(dense: Dict, include_residual: bool = True) -> float:
    """``max |f_0 + ΣΓ + ΣReg (+ ΣRes) − f_N|``."""
    total = dense["f0"] + kernel_total(dense) + reg_total(dense)
    if include_residual:
        total = total + residual_total(dense)
    return float((total - dense["fN"]).abs().max())


def per_param_tensor_totals(dense: Dict, traj: Trajectory, part: str = "kernel") -> Dict[str, torch.Tensor]:
    """``{name: [Q, O]}``: the part (``"kernel"``, ``"reg"``, ``"res"`` or ``"all"``) summed over
    steps, the parameter tensor's scalars and (kernel) training samples."""
    out = {}
    for name, sl in param_slices(traj).items():
        total = 0.0
        if part in ("kernel", "all"):
            total = total + dense["Gamma"][:, sl].sum(dim=(0, 1, 3))
        if part in ("reg", "all"):
            total = total + dense["Reg"][:, sl].sum(dim=(0, 1))
        if part in ("res", "all"):
            total = total + dense["Res"][:, sl].sum(dim=(0, 1))
        out[name] = total
    return out


def per_step_totals(dense: Dict, part: str = "kernel") -> torch.Tensor:
    """``[N, Q, O]``: the part summed over parameters (and training samples), per application step."""
    total = 0.0
    if part in ("kernel", "all"):
        total = total + dense["Gamma"].sum(dim=(1, 3))
    if part in ("reg", "all"):
        total = total + dense["Reg"].sum(dim=1)
    if part in ("res", "all"):
        total = total + dense["Res"].sum(dim=1)
    return total


def per_train_sample_totals(dense: Dict) -> torch.Tensor:
    """``[Q, M, O]``: Γ summed over steps and parameters."""
    return dense["Gamma"].sum(dim=(0, 1))


def window_per_sample(dense: Dict, a: int, b: int) -> torch.Tensor:
    """``[Q, M, O]``: Σ_{s=a}^{b} Σ_p Γ (application steps, 1-based, inclusive)."""
    return dense["Gamma"][a - 1:b].sum(dim=(0, 1))


def window_totals(dense: Dict, a: int, b: int, part: str = "kernel") -> torch.Tensor:
    """``[Q, O]``: the part summed over application steps a..b (1-based, inclusive)."""
    return per_step_totals(dense, part)[a - 1:b].sum(0)


# ----------------------------------------------------------------------------- similarity
def _sel(n: int, idx: IndexSel) -> torch.Tensor:
    if idx is None:
        return torch.arange(n)
    if isinstance(idx, int):
        return torch.tensor([idx])
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    return torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)


def train_stat_D(rep: Dict, samples: IndexSel = None) -> torch.Tensor:
    """``D [N, P]``: ``D_{s,p} = Σ_{k∈samples} (Δ_s^{(k)}[p])²`` (default: every training sample)."""
    ps = rep["per_sample"]
    k = _sel(ps.shape[1], samples)
    return (ps[:, k] ** 2).sum(1)


def flat_gamma(dense: Dict, q: int, steps: IndexSel = None, params: IndexSel = None,
               samples: IndexSel = None, outputs: IndexSel = None) -> torch.Tensor:
    """Flattened ``Γ_S(Θ, x_q, X_train)_J``. ``steps`` are 0-based positions (s−1)."""
    G = dense["Gamma"]
    N, P, Q, M, O = G.shape
    sub = G[_sel(N, steps)][:, _sel(P, params)][:, :, q][:, :, _sel(M, samples)][..., _sel(O, outputs)]
    return sub.reshape(-1)


def cosine_similarity(dense: Dict, q1: int, q2: int, steps: IndexSel = None, params: IndexSel = None,
                      samples: IndexSel = None, outputs: IndexSel = None) -> float:
    """Brute-force cosine of the flattened Γ tensors of test inputs ``q1`` and ``q2`` (Def. 4.4)."""
    u = flat_gamma(dense, q1, steps, params, samples, outputs)
    v = flat_gamma(dense, q2, steps, params, samples, outputs)
    return float(u @ v / (u.norm() * v.norm()))


def cosine_similarity_factorized(dense: Dict, q1: int, q2: int, steps: IndexSel = None,
                                 params: IndexSel = None, samples: IndexSel = None,
                                 outputs: IndexSel = None) -> float:
    """The same cosine via ``⟨Γ(x),Γ(x')⟩ = Σ_{s,j,p} Φ_s(x)_{jp} Φ_s(x')_{jp} D_{s,p}`` (DESIGN §2)."""
    phis = dense["phi"]
    N, Q, O, P = phis.shape
    D = train_stat_D({"per_sample": dense["per_sample"]}, samples)
    si, pi, oi = _sel(N, steps), _sel(P, params), _sel(O, outputs)
    f = phis[si][:, :, oi][..., pi]  # [S, Q, J, Pp]
    Dm = D[si][:, pi]  # [S, Pp]

    def inner(a: int, b: int) -> torch.Tensor:
        return (f[:, a] * f[:, b] * Dm[:, None, :]).sum()

    return float(inner(q1, q2) / (inner(q1, q1).sqrt() * inner(q2, q2).sqrt()))


# ----------------------------------------------------------------------------- gradient-step indexing
def gradient_step_influence(dense: Dict) -> torch.Tensor:
    """``Γ̃ [N, P, Q, M, O]`` indexed by the **gradient step** i (MATH §9 "Indexing trap").

    ``Γ̃[i, p, q, k, j] = Σ_{s≥i} Φ_s(x_q)[j,p] · (−η_s D_s w_{s,i} σ_i c_i a_{i,k} G_{i,k})[p]``,
    i.e. everything sample k's gradient from step i contributes, over all later application steps,
    credited to step i (equals ``−c_i a_{i,k} G_{i,k} ⊙ T_i``). Summed over i it equals Γ summed
    over s. Only the exact split is supported.
    """
    rep, phis = dense["replay"], dense["phi"]
    G, a, c = rep["G"], rep["a"], rep["c"]
    N, M, P = G.shape
    _, Q, O, _ = phis.shape
    out = torch.zeros(N, P, Q, M, O, dtype=DTYPE)
    act = rep["active"].to(DTYPE)
    for i in range(1, N + 1):
        grad_ik = rep["sign"][i - 1] * act[i - 1] * c[i - 1] * a[i - 1][:, None] * G[i - 1]  # [M, P]
        for s in range(i, N + 1):
            contrib = -rep["eta"][s - 1] * rep["D"][s - 1] * rep["W"][s - 1, i - 1] * grad_ik  # [M, P]
            out[i - 1] += torch.einsum("qjp,kp->pqkj", phis[s - 1], contrib)
    return out
