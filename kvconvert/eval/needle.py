"""Needle in a haystack: a passkey planted at chosen depths in filler text of chosen lengths.

For each (length, depth) the haystack (instruction + filler with the needle) is prefilled, then the
question is fed one token at a time (decode steps, where decode policies act) and the answer is
generated greedily. Score = the passkey appears as a whole number in the answer (exact retrieval).
Dense attention and each policy see the same prompts; a policy whose prefill is dense reuses the
dense prefill's cache.
"""

from __future__ import annotations

import copy
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..config import StrictConfig
from ..errors import UserError
from ..runtime.cache_io import cache_of, with_cache
from ..runtime.input_device import input_device
from ..runtime.sparse.policies import DensePolicy, PageTopKPolicy, SparsePolicy, parse_policy_spec

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


class NeedleConfig(StrictConfig):
    """Prompt lengths (tokens, within the model's trained length), needle depths (0 = start, 1 = end)."""

    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    trials: int = Field(1, ge=1)
    max_new_tokens: int = Field(12, ge=1)
    seed: int = 0


def build_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(haystack ids, question ids) with len(haystack) + len(question) == length tokens."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids
    head, needle, question, unit = enc(INSTRUCTION), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    body = length - len(head) - len(needle) - len(question)
    if body < len(unit):
        raise UserError(f"needle length {length} is too short: it needs more than "
                        f"{length - body + len(unit)} tokens")
    filler = (unit * (body // len(unit) + 1))[:body]
    cut = round(body * depth)
    return head + filler[:cut] + needle + filler[cut:], question


def _check(model, cfg: NeedleConfig, policies: list[SparsePolicy]) -> None:
    trained = getattr(model.config, "max_position_embeddings", None)
    for n in cfg.lengths:
        if trained and n + cfg.max_new_tokens > trained:
            raise UserError(f"needle length {n} exceeds the model's trained length {trained}; lower lengths")
    for d in cfg.depths:
        if not 0.0 <= d <= 1.0:
            raise UserError(f"needle depth {d} must lie in [0, 1]")
    for p in policies:
        dec = p.decode
        if isinstance(dec, PageTopKPolicy) and dec.budget is not None and dec.budget > min(cfg.lengths):
            raise UserError(f"page_topk.budget={dec.budget} tokens is larger than the shortest needle context "
                            f"({min(cfg.lengths)} tokens); lower budget or the lengths")


@torch.no_grad()
def _answer(model, cache, question: list[int], max_new: int, device) -> list[int]:
    out = None
    for t in question:
        out = model(torch.tensor([[t]], device=device), **with_cache(model, cache), use_cache=True)
        cache = cache_of(out)
    tokens = []
    for _ in range(max_new):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), **with_cache(model, cache), use_cache=True)
        cache = cache_of(out)
    return tokens


def retrieved(text: str, key: str) -> bool:
    """The passkey appears as a whole number in the answer."""
    return key in re.findall(r"\d+", text)


@torch.no_grad()
def run_needle(model, tokenizer, cfg: NeedleConfig, policies=(), progress: bool = True) -> dict[str, Any]:
    """Scores of dense attention and each policy.

    Returns {"lengths", "depths", "policies": [names], "specs": [resolved dumps], "scores": {name:
    [[fraction retrieved per depth] per length]}, "kv_read_fraction": {name: decode fraction}, "seconds"}.
    """
    from ..runtime.sparse.attention import sparse

    resolved = [SparsePolicy()] + [parse_policy_spec(p) for p in policies]
    _check(model, cfg, resolved)
    names = _names(["dense", *policies], resolved)
    device = input_device(model)
    rng = random.Random(cfg.seed)
    scores = {n: [[0.0] * len(cfg.depths) for _ in cfg.lengths] for n in names}
    read = {n: [] for n in names}
    answers = []
    t0 = time.perf_counter()
    cells = [(i, j, t) for i in range(len(cfg.lengths)) for j in range(len(cfg.depths)) for t in range(cfg.trials)]
    for i, j, _ in tqdm(cells, desc="needle", disable=not progress, leave=False):
        key = str(rng.randint(10000, 99999))
        hay, question = build_prompt(tokenizer, cfg.lengths[i], cfg.depths[j], key)
        hay_t = torch.tensor([hay], device=device)
        dense_cache = None
        for name, pol in zip(names, resolved):
            with sparse(model, pol) as session:
                if isinstance(pol.prefill, DensePolicy) and dense_cache is not None:
                    cache = copy.deepcopy(dense_cache)
                else:
                    cache = cache_of(model(hay_t, use_cache=True))
                    if isinstance(pol.prefill, DensePolicy):
                        dense_cache = copy.deepcopy(cache)
                tokens = _answer(model, cache, question, cfg.max_new_tokens, device)
            text = tokenizer.decode(tokens)
            ok = retrieved(text, key)
            scores[name][i][j] += ok / cfg.trials
            frac = session.stats()["decode"]["kv_read_fraction"]
            read[name].append(frac if frac is not None else 1.0)
            answers.append({"policy": name, "length": cfg.lengths[i], "depth": cfg.depths[j], "key": key,
                            "answer": text, "ok": ok})
    return {"lengths": cfg.lengths, "depths": cfg.depths, "policies": names,
            "specs": {n: p.model_dump() for n, p in zip(names, resolved)},
            "scores": scores, "retrieval": {n: _mean(scores[n]) for n in names},
            "kv_read_fraction": {n: round(sum(v) / len(v), 4) for n, v in read.items()},
            "answers": answers, "seconds": round(time.perf_counter() - t0, 1)}


def _mean(grid: list[list[float]]) -> float:
    flat = [x for row in grid for x in row]
    return round(sum(flat) / len(flat), 4)


def _names(raw: list, policies: list[SparsePolicy]) -> list[str]:
    """Labels: the spec string as given (a file's name, or the policy kinds for objects); unique."""
    names = []
    for r, p in zip(raw, policies):
        base = Path(r).name if isinstance(r, (str, Path)) and str(r).endswith((".yaml", ".yml")) else \
            (str(r) if isinstance(r, str) else p.name)
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def format_needle(result: dict[str, Any]) -> str:
    """Table: one row per policy and length, one column per depth, plus the mean and the KV fraction read."""
    depths = result["depths"]
    width = max(len(n) for n in result["policies"]) + 2
    head = f"{'policy':<{width}}{'length':>8}" + "".join(f"{d:>7.2f}" for d in depths) + f"{'mean':>7}{'KV read':>9}"
    lines = [head, "-" * len(head)]
    for name in result["policies"]:
        for i, n in enumerate(result["lengths"]):
            row = result["scores"][name][i]
            lines.append(f"{name:<{width}}{n:>8}" + "".join(f"{x:>7.2f}" for x in row)
                         + f"{sum(row) / len(row):>7.2f}" + f"{result['kv_read_fraction'][name]:>9.3f}")
    dense = result["retrieval"][result["policies"][0]]
    lines.append("")
    for name in result["policies"]:
        r = result["retrieval"][name]
        rel = f"{r / dense:.2f} of dense" if dense else "dense retrieved nothing"
        lines.append(f"{name}: retrieval {r:.2f} ({rel}), decode KV read {result['kv_read_fraction'][name]:.3f}")
    return "\n".join(lines)


def plot_needle(result: dict[str, Any], path: str | Path) -> Path:
    """Heatmap PNG: one panel per policy, depth (rows) x length (columns), colour = fraction retrieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["policies"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.4), squeeze=False)
    for n, (ax, name) in enumerate(zip(axes[0], names)):
        grid = torch.tensor(result["scores"][name]).T.numpy()
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
        ax.set_yticks(range(len(result["depths"])), [f"{d:.2f}" for d in result["depths"]] if n == 0 else [])
        ax.set_xlabel("context (tokens)")
        ax.set_title(f"{name[:40]}\nKV read {result['kv_read_fraction'][name]:.2f}", fontsize=8)
        for (r, c), v in __import__("numpy").ndenumerate(grid):
            ax.text(c, r, f"{v:.0f}" if v in (0, 1) else f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="retrieved")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def needle_ram_bytes(source, cfg: NeedleConfig) -> int:
    """RAM the needle test needs: it prefills and then decodes token by token with a KV cache, which a
    layer-by-layer run cannot do without re-reading every layer per token, so it holds the whole model (fp32)
    plus two caches (the shared dense prefill and its copy) of the longest prompt."""
    from ..models import describe

    view = describe(source.config_dict())
    longest = max(cfg.lengths) + cfg.max_new_tokens + 32
    cache = view.kv_bytes_per_token("fp32") * longest
    return source.reader().num_parameters() * 4 + 2 * cache


def check_needle_fits(source, cfg: NeedleConfig) -> None:
    """UserError before loading anything when the needle test cannot fit in this machine's RAM."""
    from .. import resources

    need, free = needle_ram_bytes(source, cfg), resources.available_ram()
    if free is not None and need > free:
        raise UserError(f"the needle test holds the whole model in fp32 with its KV cache: {need / 2**30:.1f} GiB "
                        f"of RAM, {free / 2**30:.1f} GiB is available; run it on a machine with more memory "
                        "(perplexity, `kvconvert eval MODEL`, runs layer by layer here)")
