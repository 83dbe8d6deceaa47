"""The CUDA tests themselves, run on the CPU (``EXPLAIND_TEST_DEVICE=cpu``).

CI has no GPU, so ``tests/test_cuda.py`` skips there; without this dry run its code (fixtures,
helpers, the calls it makes into the library) could break unnoticed until a GPU machine is lent.
Run in a subprocess: the module reads its device once, at import.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cuda_module_passes_on_the_cpu():
    env = dict(os.environ, EXPLAIND_TEST_DEVICE="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_cuda.py")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    summary = [line for line in run.stdout.splitlines() if " passed" in line][-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 9 and "skipped" not in summary and "failed" not in summary, summary  # it really ran
