"""kvconvert: make an LLM's KV cache small (MHA->GQA, latent KV, sparse attention) and ship it.

Every pass is one call of one shape, `kvconvert.<pass>(model, cfg, out, ...) -> PassResult`:
`mha_to_gqa` (`GQAConfig`), `fit_latent` (`LatentConfig`), `heal_model` (`HealPassConfig`), `evaluate`
(`EvalConfig`), `export_onnx` (`OnnxExportConfig`), `export_engine` (`EngineConfig`), `export_triton`
(`TritonRepoConfig`); beside them `sparse(model, policy)`, `load_latent(path)`, `resolve_source(spec)` and
`describe(config)` and `heal_memory_plan(config, world_size, parallel)`. Each name is imported on first use, so `import kvconvert` loads neither torch nor
transformers, ONNX or TensorRT. The `kvconvert_latent` model type is registered with transformers' Auto
classes when transformers is imported (at once if it already is), so `AutoModelForCausalLM.from_pretrained`
loads a fit-latent folder after `import kvconvert`.
"""

import importlib

from ._version import __version__
from .errors import PassFailed, UserError
from .runtime.latent.autoregister import install as _register_latent_model_type

_LAZY = {
    "mha_to_gqa": "kvconvert.convert.gqa",
    "GQAConfig": "kvconvert.convert.gqa",
    "fit_latent": "kvconvert.convert.latent",
    "LatentConfig": "kvconvert.convert.latent",
    "heal_model": "kvconvert.convert.heal_pass",
    "HealPassConfig": "kvconvert.convert.heal_pass",
    "heal_memory_plan": "kvconvert.convert.heal_plan",
    "evaluate": "kvconvert.eval.evaluate",
    "EvalConfig": "kvconvert.eval.evaluate",
    "export_onnx": "kvconvert.export.onnx",
    "OnnxExportConfig": "kvconvert.export.onnx",
    "export_engine": "kvconvert.export.engine",
    "EngineConfig": "kvconvert.export.engine",
    "export_triton": "kvconvert.export.triton",
    "TritonRepoConfig": "kvconvert.export.triton",
    "sparse": "kvconvert.runtime.sparse",
    "load_latent": "kvconvert.runtime.latent",
    "resolve_source": "kvconvert.io.sources",
    "describe": "kvconvert.models",
    "PassResult": "kvconvert.io.result",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


_register_latent_model_type()

__all__ = ["PassFailed", "UserError", "__version__", *_LAZY]
