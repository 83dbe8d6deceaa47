"""Imports work in any order in a fresh interpreter (the lazy torchvision import hook).

Each test starts a new Python process, so nothing this pytest process imported (conftest, other
tests) can help or hide a failure. On a CPU-only torch with the PyPI (CUDA) torchvision wheel,
``import torchvision`` and ``from transformers import BertForSequenceClassification`` fail
without the hook that ``captum_explaind_torchvision_hook.pth`` activates at interpreter start.
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

HOOK = "_captum_explaind_torchvision_hook"
ROOT = Path(__file__).resolve().parents[1]


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


needs_torchvision = _needs("torchvision")
needs_transformers = _needs("transformers")

# Where torchvision's compiled ops load, the hook must have defined nothing; where they cannot, it
# defined exactly the two schemas torchvision 0.28 registers fake kernels for unconditionally.
CHECK_HOOK_RESULT = f"""
import sys, torch, torchvision, {HOOK} as hook
if torchvision.extension._has_ops():
    assert hook.defined_ops == [], hook.defined_ops
else:
    assert sorted(hook.defined_ops) == ["torchvision::nms", "torchvision::qnms"], hook.defined_ops
"""


def run_python(code: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (outside the repository) and require success."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **(extra_env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def test_hook_is_active_at_start_and_imports_nothing(tmp_path):
    run_python(
        f"""
        import sys
        assert {HOOK!r} in sys.modules, "the .pth file did not run: reinstall with pip install -e '.[dev]'"
        assert sys.modules[{HOOK!r}].is_installed()
        heavy = sorted(m for m in ("torch", "torchvision", "transformers", "captum_explaind") if m in sys.modules)
        assert not heavy, heavy
        """,
        tmp_path,
    )


def test_pth_file_is_part_of_the_installed_distribution():
    # Look in site-packages only: `python -m pytest` from a checkout also sees its *.egg-info.
    site_dirs = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    dists = [d for d in metadata.distributions(path=site_dirs) if d.metadata["Name"] == "captum-explaind"]
    assert dists, f"captum-explaind is not installed in {site_dirs}"
    recorded = {str(f) for d in dists for f in d.files or []}
    assert "captum_explaind_torchvision_hook.pth" in recorded  # so pip uninstall removes it


@needs_torchvision
def test_import_torchvision_alone(tmp_path):
    run_python(
        CHECK_HOOK_RESULT
        + """
import torchvision.transforms, torchvision.models
out = torchvision.models.resnet18(num_classes=3).eval()(torch.zeros(1, 3, 32, 32))
assert out.shape == (1, 3)
assert type(torchvision.__loader__).__name__ != "_RetryingLoader"  # the hook leaves no trace
""",
        tmp_path,
    )


@needs_transformers
def test_import_transformers_model_alone(tmp_path):
    run_python(
        """
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         vocab_size=30)
        BertForSequenceClassification(cfg)
        """,
        tmp_path,
    )


@needs_transformers
def test_transformers_then_captum_explaind(tmp_path):
    run_python(
        """
        from transformers import BertForSequenceClassification, GPT2LMHeadModel
        import captum_explaind
        from captum_explaind import ExactPathKernel
        """,
        tmp_path,
    )


@needs_torchvision
def test_captum_explaind_then_torchvision(tmp_path):
    run_python(
        "import captum_explaind\n" + CHECK_HOOK_RESULT + "import torchvision.datasets, torchvision.transforms.v2\n",
        tmp_path,
    )


def test_import_captum_explaind_does_not_import_torchvision(tmp_path):
    run_python(
        f"""
        import sys, captum_explaind
        assert "torchvision" not in sys.modules, "import captum_explaind imported torchvision"
        assert sys.modules[{HOOK!r}].defined_ops == []  # patched nothing
        """,
        tmp_path,
    )


@needs_torchvision
def test_torchvision_adapter(tmp_path):
    run_python(
        """
        import sys
        from captum_explaind.adapters.torchvision import ensure_torchvision_importable
        assert "torchvision" in sys.modules
        assert ensure_torchvision_importable() is sys.modules["torchvision"]
        """,
        tmp_path,
    )


@needs_transformers
def test_recovers_after_a_failed_import_without_the_startup_hook(tmp_path):
    # An interpreter where the .pth did not run (e.g. `python -S` plus a path): transformers first may
    # fail; importing captum_explaind (or its torchvision adapter) afterwards must make it work.
    run_python(
        f"""
        import {HOOK} as hook
        hook.uninstall()
        try:
            from transformers import BertForSequenceClassification
        except Exception:
            pass  # expected on CPU torch with the CUDA torchvision wheel
        import captum_explaind
        from transformers import BertForSequenceClassification
        import torchvision.models
        """,
        tmp_path,
    )


# The hook on stand-in torchvision packages: no-op when the import works, recovery only for the
# missing-operator error, every other error untouched. Independent of the installed torchvision.
FAKE_TORCHVISION = {
    "works": "import torch\n",
    "missing_ops": textwrap.dedent(
        """
        import torch
        from . import _meta  # a submodule imported before the failure, as in torchvision
        if not hasattr(torch.ops.torchvision, "nms"):
            raise RuntimeError("operator torchvision::nms does not exist")
        """
    ),
    "other_error": 'raise RuntimeError("something unrelated")\n',
}


@pytest.mark.parametrize("kind", sorted(FAKE_TORCHVISION))
def test_hook_on_stand_in_torchvision(tmp_path, kind):
    pkg = tmp_path / "site" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_TORCHVISION[kind])
    (pkg / "_meta.py").write_text("")
    code = f"""
        import sys, torch, {HOOK} as hook
        try:
            import torchvision
        except RuntimeError as err:
            outcome = str(err)
        else:
            outcome = "imported"
        defined = hook.defined_ops
        nms = hasattr(torch.ops.torchvision, "nms")
        """
    expect = {
        "works": 'assert (outcome, defined, nms) == ("imported", [], False), (outcome, defined, nms)',
        "missing_ops": 'assert (outcome, nms) == ("imported", True) and len(defined) == 2, (outcome, defined)',
        "other_error": 'assert (outcome, defined) == ("something unrelated", []), (outcome, defined)',
    }[kind]
    run_python(code + expect, tmp_path, {"PYTHONPATH": str(tmp_path / "site")})


def test_build_backend_adds_pth_to_wheel(tmp_path):
    path = ROOT / "build_backend" / "captum_explaind_build_backend.py"
    spec = importlib.util.spec_from_file_location("backend", path)
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo.py", "")
        zf.writestr(
            "demo-1.0.dist-info/RECORD",
            "demo.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\ndemo-1.0.dist-info/RECORD,,\n",
        )
    backend.add_pth(str(wheel))
    backend.add_pth(str(wheel))  # idempotent
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        record = zf.read("demo-1.0.dist-info/RECORD").decode().splitlines()
        pth = zf.read(backend.PTH_NAME).decode()
    assert names[-1] == "demo-1.0.dist-info/RECORD" and names.count(backend.PTH_NAME) == 1
    assert sum(r.startswith(backend.PTH_NAME + ",sha256=") for r in record) == 1 and len(record) == 3
    assert pth.startswith("import ") and pth.count("\n") == 1 and HOOK in pth  # site.py runs one-line imports
