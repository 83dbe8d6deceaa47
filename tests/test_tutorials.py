"""Every tutorial notebook runs top to bottom (each asserts its own exactness checks)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))

# The executed kernel's environment: offline, and a non-interactive matplotlib backend. The
# notebooks themselves must not choose a backend, so that Jupyter shows their figures inline.
# EXPLAIND_GROKKING_SIZE=tiny runs the Grokking tutorial at its tiny size (seconds, does not grok).
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "EXPLAIND_GROKKING_SIZE": "tiny"}


def test_there_are_tutorials():
    assert TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_leaves_the_backend_to_jupyter(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not re.search(r"matplotlib\.use\(|%matplotlib|MPLBACKEND", cell.source), cell.source


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, **KERNEL_ENV})  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors
