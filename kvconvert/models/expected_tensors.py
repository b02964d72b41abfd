"""The tensors a checkpoint of an architecture must hold: names and shapes, from its config alone.

The transformers class is instantiated from the config on the meta device (no memory, no weights) and its
state dict is the expectation; tied output embeddings may be absent, extra tensors are allowed (transformers
ignores them). Checked against safetensors headers, so nothing is decoded.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from .registry import describe

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2",
                "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16",
                "torch.float8_e4m3fn", "torch.float8_e5m2"}
_SHOWN = 3


def expected_tensors(config: dict[str, Any], trust_remote_code: bool = False) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({name: shape} of the transformers causal-LM class built from `config`, {names that may be absent})."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers rejects bad configs with many exception types
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"config.json does not describe a valid {model_type} model (transformers: {first}); "
                        "restore config.json from the original model") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {name for name in shapes if _tied(model, name)}
    return shapes, optional


def _tied(model, name: str) -> bool:
    """Output embeddings tied to the input embeddings: checkpoints usually omit them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and name.startswith("lm_head.")


def check_tensors(config: dict[str, Any], shapes: dict[str, tuple[list[int], str]], where: str,
                  trust_remote_code: bool = False) -> None:
    """`UserError` unless the checkpoint (`shapes`: name -> (shape, dtype) from its headers) holds every
    tensor the architecture of `config` needs, each of the expected shape and of a floating-point dtype."""
    view = describe(config)
    last = view.layer_prefix(view.num_layers - 1) if view.attn_prefix else ""
    if last and not any(n.startswith(last + ".") for n in shapes):
        raise UserError(f"{where}: config.json says {view.num_layers} layers but the weights have no tensors under "
                        f"'{last}'; the config and the weights do not belong together")
    expected, optional = expected_tensors(config, trust_remote_code)
    missing = [n for n in expected if n not in shapes and n not in optional]
    if missing:
        more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        raise UserError(f"{where}: the checkpoint lacks {len(missing)} of the {len(expected)} tensors a "
                        f"{view.model_type} model needs ({', '.join(missing[:_SHOWN])}{more}); re-download or "
                        "re-export the model")
    wrong = [(n, tuple(shapes[n][0]), want) for n, want in expected.items()
             if n in shapes and tuple(shapes[n][0]) != want]
    if wrong:
        name, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise UserError(f"{where}: tensor '{name}' has shape {list(got)} but config.json needs {list(want)}{more}; "
                        "the config and the weights do not belong together")
    ints = [n for n in expected if n in shapes and shapes[n][1] not in FLOAT_DTYPES]
    if ints:
        raise UserError(f"{where}: tensor '{ints[0]}' is stored as {shapes[ints[0]][1]}, not a floating-point "
                        "type; re-export the model (quantized checkpoints are not supported)")
