"""ONNX export: decoder with explicit fixed-capacity KV buffers and `kvconvert::KVAttention` nodes
(`kvconvert::KVLatentAttention` over latent buffers for latent-KV models).

`export_onnx(model, OnnxExportConfig(...), out)`; `OrtGenerator(out).generate(ids, n)` runs it greedily in
ONNX Runtime. Layout, names and attributes: docs/architecture.md "ONNX export".
"""

from .config import OnnxExportConfig

__all__ = ["OnnxExportConfig", "OrtGenerator", "export_onnx"]


def __getattr__(name: str):
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "OrtGenerator":
        from .ort_generate import OrtGenerator

        return OrtGenerator
    raise AttributeError(name)
