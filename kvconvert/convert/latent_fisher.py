"""Loss-aware metric for fit-latent: the empirical Fisher of each layer's K/V outputs.

F_l = (1/N) sum_t g_t g_t^T with g_t = d(total next-token NLL)/d[k_t; v_t] at layer l (pre-RoPE, pre-QK-norm
projection outputs, Tensor[2 * kv_width]). For an error e_t on those outputs the loss grows by about
(N/2) E[e^T F e], so a PCA weighted by F minimises the loss increase itself and its eigenvalues are in loss
units for every layer, K and V alike: one global budget can be allocated by them without probing.
One forward + backward per calibration sequence; parameters get no gradients (only the embedding output is
made to require grad, so every path from a K/V output to the loss is differentiated).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..models import AttentionView
from ..runtime.input_device import input_device


def _kv_modules(model, view: AttentionView, layer: int):
    pre = view.layer_prefix(layer)
    if view.fused_qkv:
        return [(model.get_submodule(f"{pre}.{view.names.qkv}"), "qkv")]
    return [(model.get_submodule(f"{pre}.{view.names.k}"), "k"), (model.get_submodule(f"{pre}.{view.names.v}"), "v")]


def kv_output_fishers(model, view: AttentionView, batches: Iterable[torch.Tensor], progress: bool = True
                      ) -> tuple[list[torch.Tensor], int]:
    """Per layer F [2*kv_width, 2*kv_width] (fp64, rows/cols [K | V]) and the number of scored tokens."""
    kvw = view.kv_width
    hq = view.q_width
    fishers = [torch.zeros(2 * kvw, 2 * kvw, dtype=torch.float64) for _ in range(view.num_layers)]
    grads: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def hook(layer: int, part: str):
        def fn(module, args, out):
            out.register_hook(lambda g: grads.__setitem__((layer, part), g.detach()))
        return fn

    def embeddings_require_grad(module, args, out):
        return out.detach().requires_grad_(True)

    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_require_grad))
    for layer in range(view.num_layers):
        for module, part in _kv_modules(model, view, layer):
            handles.append(module.register_forward_hook(hook(layer, part)))
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    device = input_device(model)
    count = 0
    try:
        for ids in tqdm(list(batches), desc="fisher", disable=not progress, leave=False):
            ids = ids.to(device)
            with torch.enable_grad():
                logits = model(ids, use_cache=False).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                loss.backward()
            count += ids.shape[-1] - 1
            for layer in range(view.num_layers):
                if view.fused_qkv:
                    g = grads.pop((layer, "qkv"))[..., hq:]
                else:
                    g = torch.cat([grads.pop((layer, "k")), grads.pop((layer, "v"))], dim=-1)
                g = g.reshape(-1, 2 * kvw).double().cpu()
                fishers[layer].addmm_(g.T, g)
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return [f / max(count, 1) for f in fishers], count


def kv_output_fishers_layerwise(runner, view: AttentionView, batches: Iterable[torch.Tensor], progress: bool = True
                                ) -> tuple[list[torch.Tensor], int]:
    """`kv_output_fishers` for a `runtime.layerwise.LayerwiseModel`: a forward pass that keeps each layer's input
    hidden states ([N, S, hidden] per layer), the loss gradient at the final hidden state, then a backward pass
    one layer at a time in reverse (each layer re-read and re-run on its saved input, its K/V output gradients
    folded into that layer's Fisher). Same figures as the whole-model backward."""
    kvw, hq = view.kv_width, view.q_width
    states = runner.start(list(batches))
    inputs: list[list[torch.Tensor] | None] = []
    for layer in tqdm(range(view.num_layers), desc="fisher forward", disable=not progress, leave=False):
        inputs.append([s.hidden for s in states])
        runner.run_layer(layer, states)
    grads_out, count = [], 0
    with runner.head_context(), torch.enable_grad():
        for s in states:
            s.hidden = s.hidden.detach().requires_grad_(True)
            loss, n = runner.nll(s)
            grads_out.append(torch.autograd.grad(loss, s.hidden)[0])
            s.hidden = s.hidden.detach()
            count += n
    fishers: list[torch.Tensor | None] = [None] * view.num_layers
    tree = runner.model
    for layer in tqdm(reversed(range(view.num_layers)), total=view.num_layers, desc="fisher backward",
                      disable=not progress, leave=False):
        grads: dict[str, torch.Tensor] = {}

        def hook(part: str):
            def fn(module, args, out):
                out.register_hook(lambda g: grads.__setitem__(part, g.detach()))
            return fn

        handles = [m.register_forward_hook(hook(part)) for m, part in _kv_modules(tree, view, layer)]
        slots = runner.load_layer(layer)
        fisher = torch.zeros(2 * kvw, 2 * kvw, dtype=torch.float64)
        try:
            for b, s in enumerate(states):
                x = inputs[layer][b].detach().requires_grad_(True)
                with torch.enable_grad():
                    y = runner.call_layer(layer, s, x)
                    torch.autograd.backward(y, grads_out[b])
                g = grads.pop("qkv")[..., hq:] if view.fused_qkv else torch.cat([grads.pop("k"), grads.pop("v")], -1)
                g = g.reshape(-1, 2 * kvw).double().cpu()
                fisher.addmm_(g.T, g)
                grads_out[b] = x.grad.detach()
        finally:
            runner._unload(slots)
            for h in handles:
                h.remove()
        inputs[layer] = None
        fishers[layer] = fisher / max(count, 1)
    return fishers, count
