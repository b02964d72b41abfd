"""Calibration statistics of attention inputs, gathered with hooks so memory stays about one layer.

The closed-form fits (calibrated GQA, whitened-SVD latents) only need, per layer, the Gram matrix
G = sum_t x_t x_t^T of the attention block's input x (the normalized hidden state that feeds q/k/v):
for any linear map W the calibration error ||X (W - W')^T||^2 = tr((W - W') G (W - W')^T).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..models import AttentionView
from ..runtime.input_device import input_device


def is_layerwise(model) -> bool:
    from ..runtime.layerwise import LayerwiseModel

    return isinstance(model, LayerwiseModel)


def module_tree(model) -> torch.nn.Module:
    """The module tree hooks go on: the model itself, or a layer-by-layer runner's meta skeleton."""
    return model.model if is_layerwise(model) else model


def _attention_modules(model, view: AttentionView) -> list[torch.nn.Module]:
    modules = dict(module_tree(model).named_modules())
    return [modules[view.layer_prefix(i)] for i in range(view.num_layers)]


@torch.no_grad()
def attention_input_grams(model, view: AttentionView, batches: Iterable[torch.Tensor],
                          progress: bool = True, dtype: torch.dtype = torch.float64,
                          augment: bool = False,
                          after_layer: Callable[[int, list], None] | None = None) -> tuple[list[torch.Tensor], int]:
    """Per layer G[l] = sum over calibration tokens of x x^T (Tensor[hidden, hidden], `dtype`), and the token count.

    With `augment`, x is [x; 1] (Tensor[hidden+1, hidden+1]) so projection biases can be fitted like weights.
    `batches`: LongTensor[1, S] token ids. Runs the model forward once per batch; a hook on each attention
    block folds its input into that layer's Gram matrix, so no activations are kept.
    `model` may be a `runtime.layerwise.LayerwiseModel`: then the batches go through one layer at a time and
    `after_layer(i, grams)` is called once layer i's Gram is complete (it may set `grams[i] = None` to free it).
    """
    mods = _attention_modules(model, view)
    n = view.hidden_size + int(augment)
    layerwise = is_layerwise(model)
    grams = [None if layerwise else torch.zeros(n, n, dtype=dtype) for _ in mods]
    count = [0]

    def hook(layer: int):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.reshape(-1, x.shape[-1]).to(dtype=dtype, device="cpu")
            if augment:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            if grams[layer] is None:
                grams[layer] = torch.zeros(n, n, dtype=dtype)
            grams[layer].addmm_(x.T, x)
        return fn

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(mods)]
    if layerwise:
        batches = list(batches)
        try:
            model.forward(batches, after_layer=None if after_layer is None else lambda i, _: after_layer(i, grams),
                          desc="calibration")
        finally:
            for h in handles:
                h.remove()
        return grams, sum(int(b.numel()) for b in batches)
    device = input_device(model)
    try:
        for ids in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            model(ids.to(device), use_cache=False)
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return grams, count[0]


@torch.no_grad()
def attention_inputs(model, view: AttentionView, batches: Iterable[torch.Tensor], layers: list[int] | None = None,
                     progress: bool = False) -> dict[int, torch.Tensor]:
    """Raw attention inputs X[l]: Tensor[tokens, hidden] (fp32) for the chosen `layers`.

    For fits that are not linear in X (e.g. per-head QK-norm); memory grows with layers x tokens, so ask
    for few layers at a time.
    """
    mods = _attention_modules(model, view)
    wanted = list(range(view.num_layers)) if layers is None else layers
    acts: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}

    def hook(layer: int):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            acts[layer].append(x.reshape(-1, x.shape[-1]).float().cpu())
        return fn

    handles = [mods[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in wanted]
    device = input_device(model)
    try:
        for ids in tqdm(list(batches), desc="calibration", disable=not progress, leave=False):
            model(ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in acts.items()}
