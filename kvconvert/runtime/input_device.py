"""Where a model's inputs go, whether it sits on one device or is spread by an `accelerate` device map."""

from __future__ import annotations

import torch


def input_device(model: torch.nn.Module) -> torch.device:
    """The device token ids must be on for `model(ids)`.

    A dispatched model (`device_map=...`) has an `accelerate` hook on its embedding that names the execution
    device; its offloaded weights sit on `meta`, so the weight's own device would be wrong there.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    param = emb.weight if emb is not None else next(model.parameters())
    return torch.device("cpu") if param.device.type == "meta" else param.device
