"""Training-step selections and windows.

Steps are 1-based: step ``s`` is the s-th ``optimizer.step()``, and a score "at step s" is the
contribution of the update applied by that step (the paper's application-step indexing).

Accepted forms:

* ``None`` — all steps ``1..N``;
* an ``int`` ``s`` — that one step;
* a ``range`` (``range(1, 51)`` = steps 1..50) or a ``slice`` (``slice(a, b)`` = steps a..b−1;
  open ends mean the first/last step);
* a list of those — several windows, one result each.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

from ..errors import TrajectoryError

__all__ = ["StepsType", "parse_windows", "fixed_windows", "is_window_list"]

StepsType = Union[None, int, range, slice, Sequence[Union[int, range, slice]]]


def _one(spec: Any, n_steps: int) -> range:
    if isinstance(spec, bool):
        raise TypeError("steps must be ints, ranges or slices, not bool")
    if isinstance(spec, int):
        r = range(spec, spec + 1)
    elif isinstance(spec, range):
        if spec.step != 1:
            raise ValueError(f"step windows must be contiguous (step 1), got {spec}")
        r = spec
    elif isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise ValueError(f"step windows must be contiguous, got {spec}")
        r = range(1 if spec.start is None else spec.start, n_steps + 1 if spec.stop is None else spec.stop)
    else:
        raise TypeError(f"cannot read a step window from {type(spec).__name__}; use an int, range or slice")
    if len(r) == 0:
        raise ValueError(f"step window {spec!r} is empty")
    if r.start < 1 or r.stop - 1 > n_steps:
        raise TrajectoryError(
            f"steps {r.start}..{r.stop - 1} are outside the trajectory (valid steps: 1..{n_steps})"
        )
    return r


def parse_windows(steps: StepsType, n_steps: int) -> Tuple[List[range], bool]:
    """Windows selected by ``steps`` and whether the caller asked for several (a list).

    Returns:
        *tuple[list[range], bool]*: the windows, and True when ``steps`` was a list (so results
        carry a window axis).
    """
    if steps is None:
        return [range(1, n_steps + 1)], False
    if isinstance(steps, (list, tuple)):
        if not steps:
            raise ValueError("steps is an empty list")
        return [_one(s, n_steps) for s in steps], True
    return [_one(steps, n_steps)], False


def fixed_windows(window: Any, n_steps: int, within: Optional[range] = None) -> List[range]:
    """Consecutive windows of ``window`` steps covering ``within`` (default: the whole run).

    ``window`` is what the user passed (typed ``Any``): it is checked here to be a positive int.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    span = within if within is not None else range(1, n_steps + 1)
    return [range(a, min(a + window, span.stop)) for a in range(span.start, span.stop, window)]


def is_window_list(steps: Any) -> bool:
    """Whether ``steps`` gives several windows (a list/tuple), so results keep a window axis."""
    return isinstance(steps, (list, tuple))
