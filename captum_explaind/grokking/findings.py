"""The paper's Grokking findings, each stated next to the number a run produced.

:func:`findings` reads the results of :mod:`.analysis`, :mod:`.lasso` and :mod:`.swap` and
returns one :class:`Finding` per claim of the paper's Sec. 5. The verdict is computed from the
numbers with a fixed rule stated in the finding, never adjusted to agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

__all__ = ["Finding", "findings", "format_findings"]

MIDDLE = ("attention encoder", "attention decoder", "linear 1", "linear 2")


@dataclass
class Finding:
    """One claim of the paper, the number this run produced, and whether they agree."""

    claim: str
    measured: str
    agrees: Optional[bool]  # None: the run cannot tell (e.g. it did not grok)
    rule: str

    def line(self) -> str:
        verdict = {True: "agrees", False: "does not agree", None: "cannot tell"}[self.agrees]
        return f"* {self.claim}\n  this run: {self.measured} -> {verdict} (rule: {self.rule})"


def _windows_in(windows: List[range], lo: int, hi: int) -> List[int]:
    """Indices of the windows whose last step lies in [lo, hi]."""
    return [w for w, r in enumerate(windows) if lo <= r.stop - 1 <= hi] or [min(len(windows) - 1, 0)]


def findings(run: Any, balance: Any = None, layers: Any = None, samples: Any = None, lasso: Any = None,
             swap: Any = None, retrain: Any = None) -> List[Finding]:
    """The paper's findings with this run's numbers (any result may be ``None`` and is then skipped).

    Args:
        run (GrokRun): the recorded run (its accuracy curves give the phases).
        balance (TrainingBalance), layers (LayerBalance), samples (SampleInfluence), lasso (LassoFit),
        swap (SwapResult), retrain (RetrainResult): results of the analyses.

    Returns:
        *list[Finding]*
    """
    out: List[Finding] = []
    h, N, p = run.history, run.steps, run.data.p
    mem = h.first_step("train_acc", 1.0) or N
    grok = h.first_step("test_acc", 0.99) or N
    out.append(Finding(
        "Grokking: the training set is memorized long before the test set is solved.",
        f"train accuracy 100 % at step {h.first_step('train_acc', 1.0)}, test accuracy ≥ 99 % at step "
        f"{h.first_step('test_acc', 0.99)} (final {h.test_acc[-1]:.1%})",
        None if h.first_step("test_acc", 0.99) is None or h.first_step("train_acc", 1.0) is None else grok >= 2 * mem,
        "test ≥ 99 % at least twice as late as train 100 %"))
    if layers is not None:
        share = layers.shares()
        names = layers.layers
        early = _windows_in(layers.windows, 1, mem)
        dec = float(share[early, names.index("decoder")].mean())
        leader = names[int(share[early].mean(0).argmax())]
        out.append(Finding(
            "Memorization is led by the decoder layer (Fig. 3a right).",
            f"decoder share of the importance up to step {mem}"
            f"{'' if h.first_step('train_acc', 1.0) else ' (training accuracy never reached 100 %: the whole run)'}"
            f": {dec:.1%}; leading layer there: {leader}",
            leader == "decoder", "the decoder has the largest mean share in the windows up to memorization"))
        mid = _windows_in(layers.windows, mem, grok)
        mids = [i for i, n in enumerate(names) if n in MIDDLE]
        leaders = [names[mids[int(share[w, mids].argmax())]] for w in mid]
        switches = sum(1 for a, b in zip(leaders, leaders[1:]) if a != b)
        out.append(Finding(
            "Between memorization and generalization the middle layers (attention, linear 1/2) alternate "
            "in importance.",
            f"leader among the middle layers changes {switches} times over {len(mid)} windows "
            f"(steps {mem}–{grok}: {', '.join(dict.fromkeys(leaders))})",
            switches >= 2 if len(mid) >= 3 else None, "at least two changes of the leading middle layer"))
        late = list(range(max(0, len(layers.windows) - max(1, len(layers.windows) // 5)), len(layers.windows)))
        emb = float(share[late, names.index("embedding")].mean())
        late_leader = names[int(share[late].mean(0).argmax())]
        out.append(Finding(
            "Late in training the embedding dominates the importance.",
            f"embedding share over the last {len(late)} windows: {emb:.1%}; leading layer: {late_leader}",
            late_leader == "embedding", "the embedding has the largest mean share in the last fifth of the windows"))
    if balance is not None:
        n_last = max(1, len(balance.windows) // 5)
        r = balance.final_share(n_last)
        out.append(Finding(
            "Regularization dominates the final phase (Ψ^reg > Ψ, Fig. 3a left).",
            f"Ψ^reg / (Ψ + Ψ^reg) over the last {n_last} windows: {r:.1%}",
            r > 0.5, "the regularization share exceeds 50 %"))
    if samples is not None:
        last = len(samples.stages) - 1
        share = samples.same_label_share(last)
        first = samples.same_label_share(0)
        out.append(Finding(
            "Once grokked, influence is cyclic: training pairs with the same (a + b) mod p carry the "
            "prediction (Fig. 4, ordered by (a + b) mod p).",
            f"share of |score| from same-label training pairs: {share:.1%} at '{samples.stages[last].name}' "
            f"vs {first:.1%} at '{samples.stages[0].name}' (chance {1 / p:.1%})",
            share > 2 / p, "the share at the last stage exceeds twice chance (1/p)"))
    if lasso is not None:
        top = lasso.top(3)
        out.append(Finding(
            f"The Lasso fit of the late similarity matrix is led by frequency {p} (= p; Table 2 / Fig. 9).",
            f"leading features: {', '.join(f'{n} ({v:+.3f})' for n, v in top)}; R² = {lasso.r2:.2f}",
            lasso.leading_period == p if lasso.coefficients else None, f"the largest coefficient has period {p}"))
    if swap is not None:
        at = len(swap.steps) // 2
        acc = swap.accuracy[at]
        best = swap.layers[int(acc.argmax())]
        swaps = ", ".join(f"{n} {float(a):.0%}" for n, a in zip(swap.layers, acc))
        out.append(Finding(
            "Swapping grokked layers into an earlier checkpoint restores generalization for some layers (Fig. 3b).",
            f"checkpoint {swap.steps[at]} (test {float(swap.baseline[at]):.1%} as is) with one layer of θ_N: "
            f"{swaps}; best: {best}",
            None, "descriptive: which layer carries the generalization"))
    if retrain is not None:
        parts = [f"{v}: {'not within budget' if s is None else f'{s} steps'}"
                 for v, s in zip(retrain.variants, retrain.steps_to_generalize)]
        base = retrain.steps_to_generalize[0]
        faster = [s for s in retrain.steps_to_generalize[1:] if s is not None]
        verdict = None if not faster else (base is None or min(faster) < base)
        out.append(Finding(
            "Retraining from random with the grokked attention (+ linear 1) layers generalizes faster (Fig. 7/8).",
            "; ".join(parts), verdict, "a variant with grokked layers reaches the level in fewer steps"))
    return out


def format_findings(items: List[Finding]) -> str:
    """The findings as text (one bullet each)."""
    return "\n".join(f.line() for f in items)
