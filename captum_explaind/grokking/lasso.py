"""Lasso fit of a similarity matrix on periodic features of ``a + b`` (the paper's Table 2 / Fig. 9).

For two predictions ``i, j`` with sums ``s_i = a_i + b_i`` and ``s_j``, the features are
``cos(2π d / k)`` and ``sin(2π d / k)`` of the difference ``d = s_i − s_j`` for every period
``k = 2..p`` (the paper's "frequencies"). A similarity that depends only on ``(a + b) mod p`` is
periodic in ``d`` with period ``p``, so its fit is led by ``k = p``; a similarity that depends on
``a + b`` itself is not periodic and spreads over long periods.

The solver is plain cyclic coordinate descent on standardized features (no dependency beyond
torch), minimizing ``1/(2n) ‖y − Xw − c‖² + α ‖w‖₁`` like scikit-learn's ``Lasso``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["periodic_features", "lasso", "LassoFit", "fit_similarity"]


def periodic_features(sums: torch.Tensor, periods: Sequence[int], others: Optional[torch.Tensor] = None):
    """Features ``cos(2π d/k), sin(2π d/k)`` of all pairwise differences ``d = sums_i − others_j``.

    Args:
        sums (Tensor): ``[n]`` integer sums ``a + b`` of the rows.
        periods (sequence of int): the periods ``k`` (each ≥ 2).
        others (Tensor, optional): ``[m]`` sums of the columns; ``None``: ``sums``.

    Returns:
        *tuple[Tensor, list[str]]*: the ``[n·m, 2·len(periods)]`` float64 feature matrix (row-major
        over ``(i, j)``) and its column names (``"cos 113"``, ``"sin 113"``, ...).
    """
    if any(int(k) < 2 for k in periods):
        raise ValueError(f"periods must be >= 2, got {list(periods)}")
    others = sums if others is None else others
    d = (sums.reshape(-1, 1).double() - others.reshape(1, -1).double()).reshape(-1, 1)
    k = torch.tensor([float(k) for k in periods], dtype=torch.float64).reshape(1, -1)
    angle = 2 * math.pi * d / k
    names = [f"cos {int(p)}" for p in periods] + [f"sin {int(p)}" for p in periods]
    return torch.cat([angle.cos(), angle.sin()], dim=1), names


def lasso(X: torch.Tensor, y: torch.Tensor, alpha: float, max_iter: int = 1000, tol: float = 1e-8):
    """Lasso by cyclic coordinate descent: ``argmin 1/(2n)‖y − Xw − c‖² + α‖w‖₁``.

    Args:
        X (Tensor): ``[n, F]`` features. y (Tensor): ``[n]`` targets.
        alpha (float): the L1 weight (≥ 0).
        max_iter (int): sweeps over the features. tol (float): stop when no coefficient moved by
            more than ``tol`` (relative to the largest) in a sweep.

    Returns:
        *tuple[Tensor, float, int]*: coefficients ``w`` ``[F]`` (in the units of ``X``), the
        intercept ``c``, and the sweeps used.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    X, y = X.double(), y.double().reshape(-1)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but y has {y.shape[0]} entries")
    n = X.shape[0]
    mu, y_mu = X.mean(0), y.mean()
    Xc = X - mu
    # Covariance form: each coordinate update costs O(F), whatever the number of rows.
    gram = (Xc.T @ Xc / n).numpy()
    xty = (Xc.T @ (y - y_mu) / n).numpy()
    w_np = np.zeros(X.shape[1])
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        biggest = 0.0
        for f in range(X.shape[1]):
            curv = gram[f, f]
            if curv <= 1e-14:  # a constant feature carries nothing
                continue
            old = w_np[f]
            rho = xty[f] - gram[f] @ w_np + curv * old
            new = math.copysign(max(abs(rho) - alpha, 0.0), rho) / curv
            if new != old:
                w_np[f] = new
                biggest = max(biggest, abs(new - old))
        if biggest <= tol * max(1.0, float(np.abs(w_np).max())):
            break
    w = torch.from_numpy(w_np)
    intercept = float(y_mu - mu @ w)
    return w, intercept, sweeps


@dataclass
class LassoFit:
    """A Lasso fit of a similarity matrix on periodic features.

    Attributes:
        coefficients (dict[str, float]): feature name → coefficient (zeros dropped), largest
            absolute value first.
        intercept (float), alpha (float), r2 (float): the fit's intercept, L1 weight and R².
        periods (list[int]): the periods used.
    """

    coefficients: Dict[str, float]
    intercept: float
    alpha: float
    r2: float
    periods: List[int]

    def top(self, k: int = 10) -> List[tuple]:
        """The ``k`` largest coefficients as ``(name, value)``."""
        return list(self.coefficients.items())[:k]

    @property
    def leading_period(self) -> Optional[int]:
        """The period of the largest coefficient (``None`` if all are zero)."""
        if not self.coefficients:
            return None
        return int(next(iter(self.coefficients)).split()[1])

    def plot(self, k: int = 15, ax: Any = None) -> Any:
        from .plots import plot_lasso

        return plot_lasso(self, k=k, ax=ax)

    def table(self, k: int = 10) -> str:
        """A markdown table of the ``k`` largest coefficients (the paper's Table 2)."""
        rows = ["| feature | coefficient |", "|---|---|"]
        rows += [f"| {name} | {value:+.4f} |" for name, value in self.top(k)]
        return "\n".join(rows)


def fit_similarity(similarity: torch.Tensor, sums: torch.Tensor, p: int, alpha: float = 1e-3,
                   other_sums: Optional[torch.Tensor] = None, periods: Optional[Sequence[int]] = None,
                   exclude_diagonal: bool = True) -> LassoFit:
    """Fit ``similarity[i, j] ≈ c + Σ_k w_k cos(2π d_ij/k) + v_k sin(2π d_ij/k)`` with the Lasso.

    Args:
        similarity (Tensor): ``[n, m]`` similarities (e.g. :class:`PredictionSimilarity`).
        sums (Tensor): ``[n]`` sums ``a + b`` of the rows. p (int): the modulus (periods 2..p).
        alpha (float): L1 weight. Default: 1e-3
        other_sums (Tensor, optional): ``[m]`` sums of the columns; ``None``: ``sums``.
        periods (sequence of int, optional): periods; ``None``: ``2..p``.
        exclude_diagonal (bool): leave out ``i == j`` (always 1) for a square matrix. Default: True

    Returns:
        *LassoFit*
    """
    periods = list(range(2, p + 1)) if periods is None else [int(k) for k in periods]
    X, names = periodic_features(sums, periods, other_sums)
    y = similarity.detach().cpu().double().reshape(-1)
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"similarity has {y.shape[0]} entries but the sums give {X.shape[0]} pairs")
    if exclude_diagonal and other_sums is None and similarity.shape[0] == similarity.shape[-1]:
        keep = ~torch.eye(similarity.shape[0], dtype=torch.bool).reshape(-1)
        X, y = X[keep], y[keep]
    # Standardize so that one alpha means the same for every feature (sklearn's habit with scaled inputs).
    scale = X.std(0)
    scale = torch.where(scale > 1e-9, scale, torch.ones_like(scale))
    w, c, _ = lasso(X / scale, y, alpha)
    w = w / scale
    c = float(c)
    pred = X @ w + c
    r2 = float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-300))
    order = torch.argsort(w.abs(), descending=True)
    coefs = {names[int(i)]: float(w[int(i)]) for i in order if float(w[int(i)]) != 0.0}
    return LassoFit(coefficients=coefs, intercept=c, alpha=alpha, r2=r2, periods=periods)
