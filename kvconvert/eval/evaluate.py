"""`kvconvert eval`: perplexity, KV bytes/token and parameter count, optionally beside a baseline."""

from __future__ import annotations

import math
import time
from typing import Any

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


def evaluate_source(source, cfg: EvalConfig, progress: bool = False) -> dict[str, Any]:
    model = source.load_model()
    return {"model": source.spec, **evaluate_model(model, source.load_tokenizer(), cfg, progress)}


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
