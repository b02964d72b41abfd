"""One system of benchmarks/onnx_decode.py, run in its own process (and its own venv for the peers).

`python onnx_decode_runner.py SYSTEM MODEL_DIR THREADS`; then one JSON request per stdin line
`{"ids": [...], "new": N, "options": {...}}`, one JSON reply per line
`{"prefill_s", "decode_ms", "tokens"}`: prefill = the call that consumes the prompt and yields the first token,
decode = mean time of each later token (greedy). SYSTEM: `kvconvert` (OrtGenerator, in-place cache),
`genai` (onnxruntime_genai Generator), `optimum` (optimum.onnxruntime ORTModelForCausalLM forward with its
past_key_values). Every system: ONNX Runtime CPU provider, `THREADS` intra-op threads, fp32.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def kvconvert_system(folder: str, threads: int):
    import onnxruntime as ort

    from kvconvert.export.onnx import OrtGenerator

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    gen = OrtGenerator(folder, providers=["CPUExecutionProvider"], session_options=opts)

    def run(ids: list[int], new: int, chunk: int = 0):
        """`chunk` > 0: prefill in chunks of that many tokens (bounded memory for the standard-op lowering of
        the sparse policies, whose prefill scores are [S, filled] per head)."""
        prompt = np.array([ids], np.int64)
        t0 = time.perf_counter()
        if chunk:
            cache = gen.to_ort_values(gen.empty_cache(1))
            for start in range(0, len(ids), chunk):
                part = prompt[:, start:start + chunk]
                pos = np.arange(start, start + part.shape[1])[None]
                logits = gen.step_in_place(part, pos, np.array([start], np.int64), cache)
            last = logits[:, -1]
        else:
            last, cache = gen.prefill([prompt[0]])
        prefill = time.perf_counter() - t0
        tokens = [int(last.argmax(-1)[0])]
        t1 = time.perf_counter()
        for t in range(new - 1):
            length = np.array([len(ids) + t], np.int64)
            logits = gen.step_in_place(np.array([[tokens[-1]]]), length[:, None], length, cache)
            tokens.append(int(logits[0, -1].argmax()))
        decode = (time.perf_counter() - t1) / max(1, new - 1)
        return prefill, decode, tokens

    return run


def genai_system(folder: str, threads: int):
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    model = og.Model(config)

    def run(ids: list[int], new: int, **_):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array([ids], np.int32))  # runs the prompt; the next call picks the first token
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new - 1):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        decode = (time.perf_counter() - t1) / max(1, new - 1)
        return prefill, decode, tokens

    return run


def optimum_system(folder: str, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=opts, provider="CPUExecutionProvider",
                                                use_io_binding=False)

    def run(ids: list[int], new: int, **_):
        x = torch.tensor([ids])
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            prefill = time.perf_counter() - t0
            past, length = out.past_key_values, len(ids)
            t1 = time.perf_counter()
            for _ in range(new - 1):
                length += 1
                out = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=torch.ones(1, length, dtype=torch.long),
                            past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            decode = (time.perf_counter() - t1) / max(1, new - 1)
        return prefill, decode, tokens

    return run


SYSTEMS = {"kvconvert": kvconvert_system, "genai": genai_system, "optimum": optimum_system}


def main() -> None:
    system, folder, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run = SYSTEMS[system](folder, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prefill, decode, tokens = run(req["ids"], req["new"], **req.get("options", {}))
        print(json.dumps({"prefill_s": prefill, "decode_ms": decode * 1e3, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
