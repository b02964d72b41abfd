"""Run a checkpoint on data one decoder layer at a time, reading each layer's weights from the checkpoint.

`LayerwiseModel(source, device="auto")` builds the transformers model of the checkpoint with its parameters on
`meta` (buffers such as RoPE frequencies are real), so every registered architecture runs its own code:
1. `start(batches)`: the model's own forward runs with every decoder layer replaced by a stub that records the
   layer's call (the hidden state and the keyword arguments the model computed for it: masks per layer type,
   position embeddings, ...). Only the modules outside the decoder layers are materialised for this.
2. `run_layer(i, states)`: layer i's tensors are read from the checkpoint (`CheckpointReader.get`, one shard's
   file at a time, never the whole model), the batch's hidden states go through it, then it is freed.
   Hooks registered on `self.model`'s modules (attention input Grams, K/V outputs) fire as usual.
3. `head(hidden, ids)`: final norm + LM head (+ the model's logit soft-capping) by the model's own forward, in
   chunks of `head_chunk` tokens, so [tokens, vocab] fp32 never exists for more than one chunk.
Peak memory: one decoder layer + the non-layer modules + the batches' hidden states [N, S, hidden].

Precision: on CUDA the weights keep the checkpoint's dtype (bf16/fp16 stay bf16/fp16); on CPU they are
upcast to fp32 per layer (CPU bf16 matmuls without AVX512-BF16/AMX run ~300x slower than fp32 here). The
statistics hooks accumulate in fp32/fp64 whatever the weight dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "torch.float32": torch.float32, "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


class _Stop(Exception):
    pass


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer `index`: records (hidden, kwargs) of the call, passes the hidden on."""

    def __init__(self, index: int, last: bool, sink: list, replace: torch.Tensor | None = None):
        super().__init__()
        self.index, self.last, self.sink, self.replace = index, last, sink, replace

    def forward(self, hidden_states, *args, **kwargs):
        if self.replace is not None:  # head pass: the first layer hands the final hidden state to the norm
            return self.replace if self.index == 0 else hidden_states
        self.sink.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class BatchState:
    """One batch moving through the model: its ids, current hidden state and each layer's call arguments."""

    ids: torch.Tensor                                   # LongTensor[1, S]
    hidden: torch.Tensor                                # [1, S, hidden] (compute dtype, on the device)
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # per layer (args, kwargs) without hidden


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        from ...errors import UserError

        raise UserError("--device cuda was asked but no CUDA device is visible; use --device cpu (or auto)")
    return torch.device(device)


def checkpoint_dtype(reader) -> torch.dtype:
    """The dtype most of the checkpoint's elements have."""
    counts: dict[str, int] = {}
    for shape, dt in reader.shapes().values():
        n = 1
        for s in shape:
            n *= s
        counts[str(dt)] = counts.get(str(dt), 0) + n
    return DTYPES.get(max(counts, key=counts.get), torch.float32) if counts else torch.float32


def _model_names(model, checkpoint_names: set[str]) -> dict[str, str]:
    """model parameter name -> checkpoint name, through transformers' own load-time renamings
    (e.g. gpt_neox's `embed_out.` -> `lm_head.`)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if type(t) is WeightRenaming]
    except Exception:  # noqa: BLE001 - an older transformers without the mapping: names are used as they are
        renamings = []
    return {apply_renamings(n, renamings) if renamings else n: n for n in checkpoint_names}


class LayerwiseModel:
    """A checkpoint run layer by layer (see the module docstring). `model` is the meta-device skeleton:
    register hooks on its modules by name, read `.config`, `.scaling`, RoPE buffers from it."""

    def __init__(self, source, device: str | torch.device | None = "auto", dtype: torch.dtype | None = None,
                 head_chunk: int = 512, progress: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        import kvconvert  # noqa: F401  (registers the latent model type)

        from ...models import describe

        self.source = source
        self.reader = source.reader()
        self.device = resolve_device(device)
        self.weight_dtype = checkpoint_dtype(self.reader)
        self.dtype = dtype or (self.weight_dtype if self.device.type == "cuda" else torch.float32)
        self.head_chunk = head_chunk
        self.progress = progress
        config = source.load_config()
        self.view = describe(source.config_dict())
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model = model.eval().to(self.device) if self.device.type != "cpu" else model.eval()
        self._names = _model_names(self.model, set(self.reader.shapes()))
        prefix = self.view.attn_prefix.split("{layer}")[0].rstrip(".")
        self.layer_list_name = prefix
        self.layers = self.model.get_submodule(prefix)
        self.num_layers = len(self.layers)
        self._layer_names = {f"{prefix}.{i}" for i in range(self.num_layers)}
        emb = self.model.get_input_embeddings().weight
        self._tied_to_embedding = emb is self._output_weight()
        self._embedding_name = next(n for n, p in self.model.named_parameters() if p is emb)

    # weights --------------------------------------------------------------------------------------------
    def _output_weight(self):
        head = self.model.get_output_embeddings()
        return None if head is None else head.weight

    def _slots(self, module: torch.nn.Module, prefix: str) -> dict[int, list[tuple[torch.nn.Module, str, str]]]:
        """id(param) -> [(owner module, attribute, checkpoint name)], shared (tied) parameters grouped."""
        slots: dict[int, list] = {}
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for pname, p in mod._parameters.items():
                if p is None:
                    continue
                full = ".".join(x for x in (prefix, mod_name, pname) if x)
                slots.setdefault(id(p), []).append((mod, pname, full))
        return slots

    def _load(self, slots) -> None:
        for entries in slots.values():
            name = next((full for _, _, full in entries if full in self._names), None)
            if name is None and any(getattr(m, n) is self._output_weight() for m, n, _ in entries):
                name = self._embedding_name  # tied LM head saved once, under the input embedding's name
            if name is None:
                raise RuntimeError(f"{entries[0][2]} is not in the checkpoint {self.source.path}")
            t = self.reader.get(self._names[name])
            ref = getattr(entries[0][0], entries[0][1])
            if tuple(t.shape) != tuple(ref.shape):
                raise RuntimeError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(ref.shape)}")
            param = torch.nn.Parameter(t.to(device=self.device, dtype=self.dtype), requires_grad=False)
            for mod, pname, _ in entries:
                mod._parameters[pname] = param

    @staticmethod
    def _unload(slots) -> None:
        for entries in slots.values():
            ref = getattr(entries[0][0], entries[0][1])
            empty = torch.nn.Parameter(torch.empty(ref.shape, dtype=ref.dtype, device="meta"), requires_grad=False)
            for mod, pname, _ in entries:
                mod._parameters[pname] = empty

    def _outer_slots(self, skip_input_embedding: bool, skip_output: bool = False):
        """Parameters outside the decoder layers (embeddings, final norm, LM head, ...)."""
        emb = self.model.get_input_embeddings().weight
        out = {}
        for key, entries in self._slots(self.model, "").items():
            entries = [e for e in entries if not any(e[2].startswith(n + ".") for n in self._layer_names)]
            if not entries:
                continue
            if skip_input_embedding and key == id(emb) and not self._tied_to_embedding:
                continue
            if skip_output and key == id(self._output_weight()) and not self._tied_to_embedding:
                continue
            out[key] = entries
        return out

    def layer_slots(self, i: int):
        return self._slots(self.layers[i], f"{self.layer_list_name}.{i}")

    # running ----------------------------------------------------------------------------------------------
    def _with_stubs(self, make: Callable[[int], torch.nn.Module], fn: Callable[[], Any]) -> Any:
        originals = list(self.layers)
        try:
            for i in range(self.num_layers):
                self.layers[i] = make(i)
            return fn()
        finally:
            for i, m in enumerate(originals):
                self.layers[i] = m

    @torch.no_grad()
    def start(self, batches: Iterable[torch.Tensor]) -> list[BatchState]:
        """Embed every batch (LongTensor[1, S]) and record each layer's call arguments."""
        slots = self._outer_slots(skip_input_embedding=False, skip_output=True)
        self._load(slots)
        states = []
        try:
            for ids in batches:
                ids = torch.as_tensor(ids).long().reshape(1, -1).to(self.device)
                sink: list = []

                def run():
                    try:
                        self.model(input_ids=ids, use_cache=False)
                    except _Stop:
                        pass

                self._with_stubs(lambda i: _Recorder(i, i == self.num_layers - 1, sink), run)
                if len(sink) != self.num_layers:
                    raise RuntimeError(f"the model called {len(sink)} of its {self.num_layers} decoder layers")
                hidden = sink[0][0].to(self.dtype)
                states.append(BatchState(ids, hidden, [(a, k) for _, a, k in sink]))
        finally:
            self._unload(slots)
        return states

    def load_layer(self, i: int):
        slots = self.layer_slots(i)
        self._load(slots)
        return slots

    def call_layer(self, i: int, state: BatchState, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i (already loaded) on `hidden` (default: the state's current hidden state)."""
        args, kwargs = state.calls[i]
        out = self.layers[i](state.hidden if hidden is None else hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_layer(self, i: int, states: list[BatchState]) -> None:
        slots = self.load_layer(i)
        try:
            for s in states:
                s.hidden = self.call_layer(i, s)
        finally:
            self._unload(slots)

    def forward(self, batches: Iterable[torch.Tensor], after_layer: Callable[[int, list[BatchState]], None] | None = None,
                desc: str = "layers") -> list[BatchState]:
        """All batches through all decoder layers (layer-major); `after_layer(i, states)` after each layer."""
        states = self.start(batches)
        for i in tqdm(range(self.num_layers), desc=desc, disable=not self.progress, leave=False):
            self.run_layer(i, states)
            if after_layer is not None:
                after_layer(i, states)
        return states

    def head_context(self):
        """Context manager: the final norm / LM head materialised for `logits`."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            slots = self._outer_slots(skip_input_embedding=True)
            self._load(slots)
            try:
                yield
            finally:
                self._unload(slots)
        return ctx()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head of `hidden` [1, S, hidden] (inside `head_context`) -> logits [1, S, vocab] fp32.
        Differentiable in `hidden` (parameters need no grad)."""
        n = hidden.shape[1]
        emb = torch.zeros(1, n, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
        out = self._with_stubs(lambda i: _Recorder(i, False, [], replace=hidden),
                               lambda: self.model(inputs_embeds=emb, use_cache=False))
        return out.logits.float()

    def nll(self, state: BatchState) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL of one finished batch (fp32 scalar) and the number of scored tokens,
        computed `head_chunk` tokens at a time (inside `head_context`)."""
        ids = state.ids[0]
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        n = ids.numel() - 1
        for s in range(0, n, self.head_chunk):
            e = min(s + self.head_chunk, n)
            logits = self.logits(state.hidden[:, s:e])[0]
            total = total + torch.nn.functional.cross_entropy(logits, ids[s + 1:e + 1], reduction="sum")
        return total, n
