"""TensorRT / TensorRT-RTX engines from an exported ONNX folder: builder, KVAttention plugin, runner."""

from .config import EngineConfig

__all__ = ["EngineConfig", "export_engine", "Runner"]


def __getattr__(name):
    if name == "export_engine":
        from .build import export_engine

        return export_engine
    if name == "Runner":
        from .runner import Runner

        return Runner
    raise AttributeError(name)
