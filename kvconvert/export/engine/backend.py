"""Import the TensorRT flavour asked for (one code path: their Python APIs are near-identical)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from ...errors import UserError

log = logging.getLogger(__name__)

MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
INSTALL_HINT = {
    "tensorrt-rtx": "pip install 'kvconvert[tensorrt]' (the tensorrt-rtx-cu13 wheels from PyPI; "
                    "bash scripts/install.sh dev does it)",
    "tensorrt": "install NVIDIA TensorRT >= 10.8 for your CUDA (pip install tensorrt from NVIDIA's index, "
                "or the TensorRT container), or use --backend tensorrt-rtx",
}


def import_backend(backend: str) -> ModuleType:
    """The `tensorrt` or `tensorrt_rtx` module; UserError with the install command when it is absent."""
    if backend not in MODULES:
        raise UserError(f"unknown engine backend '{backend}'; choose one of {', '.join(MODULES)}")
    try:
        trt = importlib.import_module(MODULES[backend])
    except ImportError as exc:
        raise UserError(f"the {backend} backend is not installed ({exc}); {INSTALL_HINT[backend]}") from None
    if backend == "tensorrt-rtx":
        ensure_unversioned_library(trt)
    return trt


def ensure_unversioned_library(trt: ModuleType) -> None:
    """The RTX ONNX parser dlopens `libtensorrt_rtx.so` for plugin nodes and aborts the process if it is
    missing; the wheel ships only `libtensorrt_rtx.so.1`, so add the link (or say how)."""
    try:
        libs = Path(importlib.import_module("tensorrt_rtx_libs").__file__).parent
    except ImportError:
        return
    link, target = libs / "libtensorrt_rtx.so", libs / "libtensorrt_rtx.so.1"
    if link.exists() or not target.exists():
        return
    try:
        link.symlink_to(target.name)
        log.info("created %s -> %s", link, target.name)
    except OSError as exc:
        raise UserError(f"TensorRT-RTX needs {link} (cannot create it: {exc}); run: ln -s {target.name} {link}") \
            from None


def version(trt: ModuleType) -> str:
    return str(trt.__version__)
