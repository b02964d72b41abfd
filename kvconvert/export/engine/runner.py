"""Load a plan built by `export_engine` and run it: prefill + decode with the cache buffers fed back in place
(present_* bound to the past_* buffers), greedy generation. Needs a GPU and torch with CUDA."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...errors import UserError
from ...io import provenance
from .backend import import_backend, version

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32"}


def engine_record(engine_dir: Path) -> dict:
    rec = provenance.read(engine_dir)
    if not rec or "engine" not in rec:
        raise UserError(f"{engine_dir} is not a `kvconvert export engine` folder (no engine record in kvconvert.json)")
    return rec["engine"]


def check_version(trt, eng: dict, engine_dir: Path) -> None:
    if version(trt) != eng["tensorrt_version"]:
        raise UserError(f"{engine_dir / eng['plan']} was built with {eng['backend']} {eng['tensorrt_version']} but "
                        f"{version(trt)} is installed; rebuild it with kvconvert export engine, or install that version")


class Runner:
    """`Runner(engine_dir).generate(prompts, max_new_tokens)`; `step(...)` is one engine call."""

    def __init__(self, engine_dir: str | Path):
        import torch

        self.dir = Path(engine_dir)
        self.eng = engine_record(self.dir)
        trt = self.trt = import_backend(self.eng["backend"])
        check_version(trt, self.eng, self.dir)
        if self.eng["plugin"]["mode"] == "python":
            from .plugin import register

            register(trt)
        elif self.eng["plugin"]["mode"] == "aot":
            from .plugin_aot import register_aot, register_latent_aot

            meta = self.eng["onnx"]["metadata"]
            (register_latent_aot if self.eng["plugin"]["name"] == "KVLatentAttention" else register_aot)(trt, meta)
        if not torch.cuda.is_available():
            raise UserError("running a TensorRT engine needs a CUDA GPU")
        major, minor = torch.cuda.get_device_capability()
        ccs = self.eng.get("compute_capabilities") or []
        if ccs and f"SM{major}{minor}" not in ccs:
            raise UserError(f"this GPU is SM{major}{minor}; the plan was built for {', '.join(ccs)}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.dir / self.eng["plan"]).read_bytes())
        if self.engine is None:
            raise UserError(f"{self.dir / self.eng['plan']} could not be deserialized (see the TensorRT log)")
        self.context = self.engine.create_execution_context()
        self.meta = self.eng["onnx"]["metadata"]
        self.num_layers = int(self.meta["num_layers"])
        self.cache_names = list(self.meta.get("inputs", [])[3:]) or [
            f"past_{k}_{i}" for i in range(self.num_layers) for k in ("key", "value")]
        self.stream = torch.cuda.Stream()
        self._profile = -1

    def _dtype(self, name: str):
        import torch

        return getattr(torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name])

    def empty_cache(self, batch: int) -> list:
        """Zeroed device buffers in graph order (past_key_0, past_value_0, ... [batch, kv_heads, max_context,
        head_dim], or a latent model's past_key_latent_0, ... [batch, 1, max_context, rank])."""
        import torch

        out = []
        for name in self.cache_names:
            shape = (batch, *tuple(self.engine.get_tensor_shape(name))[1:])
            out.append(torch.zeros(shape, dtype=self._dtype(name), device="cuda"))
        return out

    def step(self, input_ids, position_ids, cache_length, cache: list):
        """One call: input_ids/position_ids [B, S], cache_length [B] (CUDA int64); returns logits [B, S|1, V].
        The cache buffers are updated in place (present_* share the past_* memory)."""
        import torch

        ctx = self.context
        profile = 1 if input_ids.shape[1] == 1 and self.engine.num_optimization_profiles > 1 else 0
        if profile != self._profile:
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        feeds = {"input_ids": input_ids, "position_ids": position_ids, "cache_length": cache_length}
        feeds.update(zip(self.cache_names, cache))
        for name, t in feeds.items():
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        logits = torch.empty(tuple(ctx.get_tensor_shape("logits")), dtype=self._dtype("logits"), device="cuda")
        ctx.set_tensor_address("logits", logits.data_ptr())
        for name, buf in zip(self.cache_names, cache):
            ctx.set_tensor_address(name.replace("past_", "present_", 1), buf.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the log)")
        self.stream.synchronize()
        return logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy decoding of a (ragged) batch of prompts; returns the new tokens of each."""
        import torch

        batch, lengths = len(prompts), [len(p) for p in prompts]
        if max(lengths) + max_new_tokens > int(self.meta["max_context"]):
            raise UserError(f"prompt + new tokens exceed the engine's max_context {self.meta['max_context']}")
        ids = torch.zeros((batch, max(lengths)), dtype=torch.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(list(p))
        pos = torch.arange(ids.shape[1]).expand(batch, -1)
        cache = self.empty_cache(batch)
        logits = self.step(ids.cuda(), pos.cuda().contiguous(), torch.zeros(batch, dtype=torch.int64, device="cuda"),
                           cache)
        lens = torch.as_tensor(lengths, device="cuda")
        last = logits[:, -1] if logits.shape[1] == 1 else logits[torch.arange(batch), lens - 1]
        out: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for _ in range(max_new_tokens):
            nxt = last.float().argmax(-1)
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(tok)
                    done[b] = eos_token_id is not None and tok == eos_token_id
            if all(done) or len(out[0]) == max_new_tokens:
                break
            logits = self.step(nxt[:, None].contiguous(), lens[:, None].clone(), lens.clone(), cache)
            lens = lens + 1
            last = logits[:, -1]
        return out
