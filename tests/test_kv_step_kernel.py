import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvconvert.export.onnx.attention_op import kv_attention_reference, node_attributes
from kvconvert.kernels.kv_step import kv_step, kv_step_reference


@pytest.mark.parametrize("s", [1, 5])
@pytest.mark.parametrize("case", ["dense", "sink_window", "softcap_sliding"])
def test_fused_step_equals_reference_and_writes_in_place(s, case):
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 24, 8
    policy = {"kind": "sink_window", "decode": "sink_window", "decode_sink": 2, "decode_window": 4,
              "prefill": "sink_window", "prefill_sink": 2, "prefill_window": 4} if case == "sink_window" else None
    attrs = node_attributes(num_heads=h, num_kv_heads=kv, head_dim=d, scale=d ** -0.5, policy=policy,
                            softcap=5.0 if case == "softcap_sliding" else 0.0,
                            sliding_window=6 if case == "softcap_sliding" else 0)
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    pk, pv = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    cl = torch.tensor([3, 11])
    ref_out, ref_k, ref_v = kv_attention_reference(q, k, v, pk, pv, cl, attrs)
    for fn in (kv_step, kv_step_reference):
        buf_k, buf_v = pk.clone(), pv.clone()
        out = fn(q, k, v, buf_k, buf_v, cl, attrs)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert torch.equal(buf_k, ref_k) and torch.equal(buf_v, ref_v)


def test_kernel_compiles_to_ptx_without_gpu():
    # a fresh process: the interpreter (TRITON_INTERPRET=1, used above) leaves triton.language patched
    code = ("import json; from kvconvert.kernels.kv_step import compile_ptx; "
            "print(json.dumps([compile_ptx(dt, group=3, head_dim=64, cc=80) for dt in ('fp16', 'bf16')] + "
            "[compile_ptx('fp16', group=3, head_dim=64, cc=86, aot_scale=0.125)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    for name, ptx, meta in json.loads(res.stdout.strip().splitlines()[-1]):
        assert name.startswith("kv_step_") and ".target sm_8" in ptx and f".entry {name}" in ptx
        assert meta["num_warps"] >= 1
