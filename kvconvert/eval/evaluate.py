"""`kvconvert eval`: perplexity, KV bytes/token and parameter count, optionally beside a baseline."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from pydantic import Field

from ..config import StrictConfig
from ..data.calibration import DEFAULT_EVAL, load_text, token_stream
from ..models import describe
from .perplexity import perplexity


class EvalConfig(StrictConfig):
    """Held-out perplexity settings (defaults differ from the calibration text on purpose)."""

    text: str = DEFAULT_EVAL
    max_tokens: int = Field(2048, ge=16)
    chunk: int = Field(512, ge=8)
    kv_dtype: str = "bf16"
    device: str = "auto"
    tokenizer: str | None = None


def evaluate_model(model, tokenizer, cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    """Figures for an already-loaded model: `perplexity`, `kv_bytes_per_token`, `parameters`, `seconds`."""
    t0 = time.perf_counter()
    ids = token_stream(tokenizer, load_text(cfg.text))
    ppl = perplexity(model, ids, chunk=cfg.chunk, max_tokens=cfg.max_tokens, progress=progress)
    if not math.isfinite(ppl):
        _non_finite(model, ppl, cfg.text)
    view = describe(model.config)
    return {
        "perplexity": ppl,
        "eval_text": cfg.text,
        "eval_tokens": min(ids.numel(), cfg.max_tokens),
        "kv_bytes_per_token": view.kv_bytes_per_token(cfg.kv_dtype),
        "kv_dtype": cfg.kv_dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _non_finite(model, ppl: float, text: str) -> None:
    """A perplexity of nan/inf is a damaged model, not a measurement: name the likely cause."""
    import torch

    from ..errors import PassFailed, UserError

    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad:
        raise UserError(f"perplexity on {text} is {ppl}: tensor '{bad}' holds NaN/Inf values, so the checkpoint is "
                        "damaged; re-download or re-export it")
    raise PassFailed(f"perplexity on {text} is {ppl}: the logits overflow although no weight is NaN/Inf; evaluate "
                     "in fp32 or check how the model was trained or converted")


def _non_finite_source(source, ppl: float, text: str) -> None:
    """`_non_finite` for a checkpoint read tensor by tensor (never the whole model in memory)."""
    from ..errors import PassFailed
    from ..io.reader import check_finite

    for name, t in source.reader().iter_tensors():
        check_finite(name, t)
    raise PassFailed(f"perplexity on {text} is {ppl}: the logits overflow although no weight is NaN/Inf; evaluate "
                     "in fp32 or check how the model was trained or converted")


def load_eval_tokenizer(source, cfg: EvalConfig):
    """`cfg.tokenizer` (a folder or hub id) when given, else the checkpoint's own; UserError when neither exists."""
    from ..errors import UserError

    where = cfg.tokenizer or source.path
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where, trust_remote_code=source.trust_remote_code)
    except Exception:  # noqa: BLE001 - missing files, bad folder: one line for the user
        raise UserError(f"no tokenizer in {where}; pass --tokenizer PATH (a folder holding tokenizer.json)") from None


def evaluate_source(source, cfg: EvalConfig, progress: bool = False, tokenizer=None) -> dict[str, Any]:
    """`evaluate_model`'s figures for a checkpoint, run one decoder layer at a time (`runtime.layerwise`)."""
    from .perplexity import perplexity_layerwise

    t0 = time.perf_counter()
    tokenizer = tokenizer or load_eval_tokenizer(source, cfg)
    ids = token_stream(tokenizer, load_text(cfg.text))
    vocab = source.config_dict().get("vocab_size")
    if vocab and ids.numel() and int(ids.max()) >= vocab:
        from ..errors import UserError

        raise UserError(f"the tokenizer gives token id {int(ids.max())} but {source.spec} has {vocab} embeddings; "
                        "pass the model's own tokenizer with --tokenizer PATH")
    ppl = perplexity_layerwise(source, ids, chunk=cfg.chunk, max_tokens=cfg.max_tokens, device=cfg.device,
                               progress=progress)
    if not math.isfinite(ppl):
        _non_finite_source(source, ppl, cfg.text)
    view = describe(source.config_dict())
    return {
        "model": source.spec,
        "perplexity": ppl,
        "eval_text": cfg.text,
        "eval_tokens": min(ids.numel(), cfg.max_tokens),
        "kv_bytes_per_token": view.kv_bytes_per_token(cfg.kv_dtype),
        "kv_dtype": cfg.kv_dtype,
        "parameters": source.reader().num_parameters(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def eval_room(source, cfg: EvalConfig) -> str | None:
    """Why a layer-by-layer evaluation of `source` cannot run here (None when it can)."""
    from .. import resources
    from ..runtime.layerwise import layerwise_bytes, resolve_device

    if resolve_device(cfg.device).type != "cpu":
        return None
    need = layerwise_bytes(source.reader(), describe(source.config_dict()), cfg.max_tokens)
    free = resources.available_ram()
    if free is not None and need > free:
        return f"it needs {need / 2**30:.1f} GiB of RAM, {free / 2**30:.1f} GiB is available"
    return None


def evaluate(model, cfg: EvalConfig | None = None, out=None, *, calib=None, progress: bool = True):
    """The pass-shaped evaluation: `model` (spec, path or ModelSource) -> PassResult(out, metrics, record).

    `calib`: token ids to score instead of `cfg.text` (LongTensor[N] or an iterable of LongTensor[1, S]).
    The input is never written to; with `out`, `out/eval.json` gets the metrics and the provenance record."""
    import json
    from pathlib import Path

    from ..io import ModelSource, PassResult, provenance, resolve_source

    cfg = cfg or EvalConfig()
    source = model if isinstance(model, ModelSource) else resolve_source(model)
    if calib is not None:
        from ..data.calibration import iterate
        from .perplexity import perplexity_layerwise

        t0 = time.perf_counter()
        ids = torch.cat([torch.as_tensor(x).long().flatten() for x in iterate(calib)])
        metrics = {"model": source.spec, "perplexity": perplexity_layerwise(
            source, ids, cfg.chunk, cfg.max_tokens, cfg.device, progress), "eval_text": "calib",
            "eval_tokens": min(ids.numel(), cfg.max_tokens),
            "kv_bytes_per_token": describe(source.config_dict()).kv_bytes_per_token(cfg.kv_dtype),
            "kv_dtype": cfg.kv_dtype, "parameters": source.reader().num_parameters(),
            "seconds": round(time.perf_counter() - t0, 2)}
    else:
        metrics = evaluate_source(source, cfg, progress)
    record = provenance.new_record(source.provenance(), parent=provenance.read(source.path))
    provenance.add_pass(record, "eval", cfg.model_dump(), metrics["seconds"], {"eval": metrics})
    target = None
    if out is not None:
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        (target / "eval.json").write_text(json.dumps({"metrics": {"eval": metrics}, "record": record}, indent=2))
        target = target.resolve()
    return PassResult(target, {"eval": metrics}, record)


def format_eval(rows: list[dict[str, Any]]) -> str:
    base = rows[-1] if len(rows) > 1 else None
    head = f"{'model':<40}{'perplexity':>12}{'KV B/token':>12}{'params (M)':>12}"
    lines = [head + ("   vs baseline" if base else "")]
    for r in rows:
        line = (f"{str(r['model'])[-40:]:<40}{r['perplexity']:>12.3f}{r['kv_bytes_per_token']:>12,}"
                f"{r['parameters'] / 1e6:>12.1f}")
        if base and r is not base:
            line += (f"   ppl x{r['perplexity'] / base['perplexity']:.3f}, "
                     f"KV x{r['kv_bytes_per_token'] / base['kv_bytes_per_token']:.3f}")
        lines.append(line)
    return "\n".join(lines)
