"""Greedy generation with an exported decoder in ONNX Runtime, the KV buffers fed back every step.

Needs only numpy + onnxruntime (no torch), so a serving process can use it as is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .graph import MODEL_FILE


def _session(path: Path, providers: Sequence[Any] | None, session_options=None):
    import onnxruntime as ort

    opts = session_options or ort.SessionOptions()
    if session_options is None:
        opts.log_severity_level = 3
    if providers is None:
        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def _numpy_dtype(onnx_type: str):
    if "bfloat16" in onnx_type:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float16 if "float16" in onnx_type else np.float32


class OrtGenerator:
    """`OrtGenerator(folder).generate(input_ids, max_new_tokens)`; `folder` holds model.onnx from export_onnx.

    `session_options`: an `onnxruntime.SessionOptions` (threads, graph optimisation, ...; None: defaults, warnings
    off); `providers`: ONNX Runtime providers, names or (name, options) pairs (None: CUDA when available, then
    CPU). `in_place` (None: on the CPU provider): every step binds each present_* output to its past_* buffer
    (IOBinding), so no step copies the cache (see docs/architecture.md for what each opset costs)."""

    def __init__(self, folder: str | Path, providers: Sequence[Any] | None = None, in_place: bool | None = None,
                 session_options=None):
        self.folder = Path(folder)
        self.session = _session(self.folder / MODEL_FILE, providers, session_options)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, Any] = json.loads(meta["kvconvert"])
        self.num_layers = int(self.meta["num_layers"])
        self.max_context = int(self.meta["max_context"])
        self.last_only = self.meta.get("logits") == "last"
        self.past_names = list(self.meta["inputs"][3:])
        self.present_names = list(self.meta["outputs"][1:])
        past = {i.name: i for i in self.session.get_inputs()}
        self._cache_shapes = [tuple(past[name].shape[1:]) for name in self.past_names]
        self._cache_dtype = _numpy_dtype(past[self.past_names[0]].type)
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self.in_place = on_cpu if in_place is None else in_place

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Zeroed cache buffers in graph order (`past_names`): past_key_0, past_value_0, ... each
        [batch, kv_heads, max_context, head_dim], or a latent model's [batch, 1, max_context, width] latents."""
        return [np.zeros((batch, *shape), dtype=self._cache_dtype) for shape in self._cache_shapes]

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_length: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: logits [B, S|1, V] and the updated cache buffers (new arrays; `cache` is unchanged).
        With `in_place` the new buffers are copies of `cache` that the graph updates in place (so slots no row
        reaches keep their contents with every lowering)."""
        if self.in_place:
            cache = [np.array(c, order="C", copy=True) for c in cache]
            return self.step_in_place(input_ids, position_ids, cache_length, self.to_ort_values(cache)), cache
        feed = {"input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64),
                "cache_length": np.asarray(cache_length, np.int64)}
        feed.update(zip(self.past_names, cache))
        outs = self.session.run(None, feed)
        return outs[0], list(outs[1:])

    def step_in_place(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_length: np.ndarray,
                      cache: list) -> np.ndarray:
        """One graph call with each present_* output bound to its past_* buffer (`cache`: OrtValues from
        `to_ort_values`), so the cache is updated in place. Returns logits."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        binding.bind_cpu_input("cache_length", np.ascontiguousarray(cache_length, np.int64))
        binding.bind_output("logits")
        for past, present, value in zip(self.past_names, self.present_names, cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # only the logits: copy_outputs_to_cpu would copy every cache buffer

    @staticmethod
    def to_ort_values(cache: list[np.ndarray]) -> list:
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(c)) for c in cache]

    def _advance(self, ids, pos, cache_length, cache):
        if self.in_place:
            return self.step_in_place(ids, pos, cache_length, cache), cache
        return self.step(ids, pos, cache_length, cache)

    def prefill(self, prompts: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the prompts (right-padded into one batch); returns each one's last logits [B, V] and the cache."""
        lengths = np.array([len(p) for p in prompts], np.int64)
        batch, width = len(prompts), int(lengths.max())
        cache = self.empty_cache(batch)
        if self.last_only and len(set(lengths.tolist())) > 1:
            last = []
            for b, p in enumerate(prompts):
                logits, one = self.step(p[None], np.arange(len(p))[None], np.zeros(1, np.int64), self.empty_cache(1))
                last.append(logits[0, -1])
                for buf, new in zip(cache, one):
                    buf[b] = new[0]
            return np.stack(last), (self.to_ort_values(cache) if self.in_place else cache)
        ids = np.zeros((batch, width), np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        pos = np.broadcast_to(np.arange(width), (batch, width))
        if self.in_place:
            cache = self.to_ort_values(cache)
        logits, cache = self._advance(ids, pos, np.zeros(batch, np.int64), cache)
        last = logits[:, -1] if self.last_only else logits[np.arange(batch), lengths - 1]
        return last, cache

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = "default"):
        """Greedy decoding. `input_ids`: [B, P] array/tensor or a list of token lists (ragged allowed).

        Returns the prompts followed by the generated tokens: an int64 array [B, P + n] for rectangular
        input, else a list of arrays. A sequence stops after an EOS token (`eos_token_id`: "default" = the
        model's, None = never stop).
        """
        rectangular = hasattr(input_ids, "shape")
        prompts = [np.asarray(p, np.int64).reshape(-1) for p in (np.asarray(input_ids) if rectangular else input_ids)]
        lengths = np.array([len(p) for p in prompts], np.int64)
        if int(lengths.max()) + max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({int(lengths.max())}) + {max_new_tokens} new tokens exceed the exported "
                             f"cache capacity max_context={self.max_context}; re-export with a larger --max-context")
        eos = self.meta.get("eos_token_id") if eos_token_id == "default" else eos_token_id
        eos_set = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        last, cache = self.prefill(prompts)
        generated: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        for t in range(max_new_tokens):
            nxt = last.argmax(-1)
            for b, tok in enumerate(nxt):
                if not done[b]:
                    generated[b].append(int(tok))
                    done[b] = int(tok) in eos_set
            if done.all() or t == max_new_tokens - 1:
                break
            length = lengths + t
            logits, cache = self._advance(nxt[:, None], length[:, None], length, cache)
            last = logits[:, -1]
        out = [np.concatenate([p, np.array(g, np.int64)]) for p, g in zip(prompts, generated)]
        if rectangular and len({len(o) for o in out}) == 1:
            return np.stack(out)
        return out
