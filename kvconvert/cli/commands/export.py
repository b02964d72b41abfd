"""kvconvert export {onnx,engine,triton}: targets are discovered in kvconvert/cli/export_targets/."""

from __future__ import annotations

import importlib
import pkgutil

ORDER = ["onnx", "engine", "triton"]


def _targets():
    from .. import export_targets

    names = [m.name for m in pkgutil.iter_modules(export_targets.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [importlib.import_module(f"{export_targets.__name__}.{n}") for n in names]


def register(sub, common) -> None:
    targets = _targets()
    if not targets:
        return
    p = sub.add_parser("export", parents=[common], help="export to ONNX / TensorRT engine / Triton repository",
                       description="Export a model for deployment.")
    tsub = p.add_subparsers(dest="target", metavar="TARGET", parser_class=sub._parser_class)
    for module in targets:
        module.register(tsub, common)
