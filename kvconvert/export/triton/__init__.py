"""Triton Inference Server model repository from an engine or ONNX export folder."""

from .config import TritonRepoConfig

__all__ = ["TritonRepoConfig", "export_triton"]


def __getattr__(name):
    if name == "export_triton":
        from .repo import export_triton

        return export_triton
    raise AttributeError(name)
