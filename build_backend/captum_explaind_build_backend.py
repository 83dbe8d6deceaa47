"""PEP 517 build backend: setuptools, plus the torchvision import hook's ``.pth`` file.

Every wheel setuptools builds for this project, regular (``pip install .``) and editable
(``pip install -e .``), gets one extra file at its root, ``captum_explaind_torchvision_hook.pth``,
which pip installs into site-packages (and ``pip uninstall`` removes). At interpreter start it
installs the lazy ``sys.meta_path`` finder of ``_captum_explaind_torchvision_hook`` (imports only
``sys``; see that module). setuptools has no option that puts a ``.pth`` file into an editable
wheel, so the file is added to the finished wheel and its RECORD, which the wheel format defines.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every other PEP 517/660 hook unchanged)

PTH_NAME = "captum_explaind_torchvision_hook.pth"
# Silently does nothing when the hook module is gone (e.g. an editable checkout was deleted).
PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('_captum_explaind_torchvision_hook') is not None"
    " and __import__('_captum_explaind_torchvision_hook').install()\n"
)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_pth(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_pth(os.path.join(wheel_directory, name))
    return name


def add_pth(wheel_path: str) -> None:
    """Add :data:`PTH_NAME` to the root of a built wheel and to its RECORD (idempotent)."""
    data = PTH_LINE.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp_path = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src:
        if PTH_NAME in src.namelist():
            return
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        record_info = src.getinfo(record)
        with zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename != record:
                    dst.writestr(info, src.read(info))
            pth_info = zipfile.ZipInfo(PTH_NAME, date_time=record_info.date_time)  # reproducible
            pth_info.external_attr = 0o644 << 16
            pth_info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(pth_info, data)
            rows = [f"{PTH_NAME},sha256={digest},{len(data)}", *src.read(record).decode().splitlines()]
            dst.writestr(record_info, "\n".join(rows) + "\n")  # RECORD stays the last member
    os.replace(tmp_path, wheel_path)
