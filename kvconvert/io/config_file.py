"""`config.json` as a file: a JSON object whose common Hugging Face fields have plausible types and sizes.

Only the generic `PretrainedConfig` conventions are checked here (counts are positive integers, `model_type`
is a name); what an architecture needs from its config is checked by `kvconvert.models`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError

SMALL_COUNTS = ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "n_head", "n_layer",
                "num_heads", "num_layers")
SIZES = ("hidden_size", "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "n_embd",
         "n_positions", "n_inner", "ffn_dim", "word_embed_proj_dim", "sliding_window")
NUMBERS = ("rope_theta", "partial_rotary_factor", "rms_norm_eps", "layer_norm_eps", "rotary_pct")
MAPPINGS = ("rope_parameters", "rope_scaling", "kvconvert_latent", "auto_map")
NAME_LISTS = ("architectures",)
MAX_SMALL = 2**16
MAX_SIZE = 2**31


def read_config(path: Path, spec: str = "") -> dict[str, Any]:
    """The parsed config.json at `path`; `UserError` naming the field when it is not a usable config."""
    where = f"{spec or path.parent}: config.json"
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8 text; restore it from the original model") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        "restore it from the original model") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply to be a model config") from None
    check_config(data, where)
    return data


def check_config(data: Any, where: str = "config.json") -> None:
    if not isinstance(data, dict):
        raise UserError(f"{where} is a JSON {type(data).__name__}, not an object; restore it from the original model")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"{where} has no 'model_type' name; is this a Hugging Face causal LM config.json?")
    for key, limit in [(k, MAX_SMALL) for k in SMALL_COUNTS] + [(k, MAX_SIZE) for k in SIZES]:
        value = data.get(key)
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= limit:
            raise UserError(f"{where}: '{key}' is {value!r}; it must be a positive integer (at most {limit:,})")
    for key in NUMBERS:
        value = data.get(key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value) or value < 0):
            raise UserError(f"{where}: '{key}' is {value!r}; it must be a non-negative number")
    for key in NAME_LISTS:
        value = data.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise UserError(f"{where}: '{key}' is {value!r}; it must be a list of class names")
    for key in MAPPINGS:
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"{where}: '{key}' is {value!r}; it must be a mapping (or absent)")
