"""The policy registry: a policy defined here (one class, registered) works in `kvconvert.sparse`, in a
recipe's `sparse_policy` step and in the ONNX export without an edit anywhere else; every registered policy
keeps the registry's contract."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import Field
from tiny_models import tiny_model

import kvconvert
from kvconvert.errors import UserError
from kvconvert.kernels import sink_window_decode, sink_window_decode_reference, sink_window_prefill_reference
from kvconvert.runtime.sparse import Policy, SparsePolicy, parse_policy_spec
from kvconvert.runtime.sparse.policies import policy_class, policy_kinds, register_policy, unregister_policy


class RecentWindowPolicy(Policy):
    """Toy policy: each query sees only the last `window` tokens (itself included), both phases; exported
    through the sink_window lowering with sink 0."""

    onnx_lowering = "sink_window"
    kind: Literal["recent_window"] = "recent_window"
    window: int = Field(64, ge=1)

    def decode_read(self, context: int) -> int:
        return min(context, self.window)

    def decode(self, q1, k, v, seq_lens, scale, pages, use_kernels):
        fn = sink_window_decode if use_kernels else sink_window_decode_reference
        return fn(q1, k, v, seq_lens, 0, self.window, scale=scale)

    def prefill(self, q, k, v, scale, use_kernels):
        sq, sk = q.shape[2], k.shape[2]
        read = sum(min(t + 1, self.window) for t in range(sk - sq, sk))
        return sink_window_prefill_reference(q, k, v, 0, self.window, scale=scale), read, sum(
            t + 1 for t in range(sk - sq, sk))

    def onnx_attributes(self, phase: str) -> dict:
        return {phase: self.kind, f"{phase}_sink": 0, f"{phase}_window": self.window}

    def validate_length(self) -> int:
        return self.window + 4


@pytest.fixture
def toy():
    register_policy(RecentWindowPolicy)
    try:
        yield RecentWindowPolicy
    finally:
        unregister_policy("recent_window")


def test_toy_policy_is_a_spec_and_a_yaml_kind(toy, tmp_path):
    assert "recent_window" in policy_kinds("decode") and "recent_window" in policy_kinds("prefill")
    p = parse_policy_spec("recent_window:window=8")
    assert isinstance(p.decode, toy) and isinstance(p.prefill, toy) and p.decode.window == 8
    mixed = parse_policy_spec("recent_window:window=8+page_topk:page=16")
    assert mixed.decode.kind == "page_topk" and isinstance(mixed.prefill, toy)
    f = tmp_path / "p.yaml"
    f.write_text("decode: {kind: recent_window, window: 16}\n"
                 "layers: {1: {decode: {kind: recent_window, window: 4}}}\n")
    q = parse_policy_spec(str(f))
    assert q.for_layer(0).decode.window == 16 and q.for_layer(1).decode.window == 4
    assert parse_policy_spec(q.model_dump()) == q
    with pytest.raises(UserError, match="did you mean 'window'"):
        parse_policy_spec("recent_window:windw=8")
    with pytest.raises(UserError, match="window"):
        parse_policy_spec("recent_window:window=0")


def test_unregistered_policy_is_refused_again():
    with pytest.raises(UserError, match="unknown policy 'recent_window'"):
        parse_policy_spec("recent_window:window=8")
    with pytest.raises(UserError, match="recent_window"):
        SparsePolicy.parse({"decode": {"kind": "recent_window"}})


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_toy_policy_runs_in_kvconvert_sparse(toy, kv_heads):
    """Same output as the built-in it is a special case of (sink_window with sink 0), and reads less."""
    ids = torch.randint(3, 150, (1, 120), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", kv_heads).eval()
    with torch.no_grad():
        with kvconvert.sparse(model, "recent_window:window=16") as s:
            got = model(ids).logits
            got_gen = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        with kvconvert.sparse(model, "sink_window:sink=0,window=16"):
            want = model(ids).logits
            want_gen = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        dense = model(ids).logits
    torch.testing.assert_close(got, want)
    assert torch.equal(got_gen, want_gen)
    assert not torch.allclose(got, dense, atol=1e-3)
    stats = s.stats()
    assert stats["decode"]["kv_read_fraction"] < 0.2 and stats["prefill"]["kv_read_fraction"] < 0.3


def test_toy_policy_in_a_recipe_step(toy):
    from kvconvert.recipe import STEPS, loads_recipe
    from kvconvert.recipe.sparse_read import decode_read_fraction

    text = ("version: 1\nmodel: x\ncontext: 4096\nsteps:\n  - step: sparse_policy\n"
            "    decode: {kind: recent_window, window: 512}\n    layers: {1: {decode: {kind: dense}}}\n")
    recipe = loads_recipe(text)
    cfg = recipe.steps[0].config
    assert isinstance(cfg, STEPS["sparse_policy"].config) and isinstance(cfg.decode, toy)
    assert loads_recipe(recipe.dump()) == recipe
    assert decode_read_fraction(cfg, 2, 4096) == pytest.approx((512 / 4096 + 1) / 2)
    with pytest.raises(UserError, match=r"unknown key 'decode.recent_window.windw'.*did you mean 'window'"):
        loads_recipe(text.replace("window: 512", "windw: 512"))


def test_toy_policy_maps_onto_onnx_attributes(toy):
    from kvconvert.export.onnx.policy import bind_policy
    from kvconvert.models import describe
    from tiny_models import tiny_config

    view = describe(tiny_config("llama", 2))
    binding = bind_policy("recent_window:window=8", view, 64)
    assert binding.lowerings == {"sink_window"} and not binding.page_topk and not binding.block_sparse
    for attrs in binding.layer_attributes:
        assert attrs["kind"] == "recent_window"
        assert (attrs["decode"], attrs["decode_sink"], attrs["decode_window"]) == ("recent_window", 0, 8)
        assert (attrs["prefill_sink"], attrs["prefill_window"]) == (0, 8)
    assert binding.min_validate_len == 12


def test_toy_policy_exports_and_validates(toy, tiny_folder, tmp_path):
    """The export's own validation compares ONNX Runtime with the PyTorch model under the toy policy."""
    from kvconvert.export.onnx import OnnxExportConfig, export_onnx

    res = export_onnx(tiny_folder("llama", 2), OnnxExportConfig(max_context=64, policy="recent_window:window=8"),
                      tmp_path / "onnx", progress=False)
    import json

    import onnx

    assert res.metrics["validation"]["passed"]
    meta = json.loads(onnx.load(str(res.out / "model.onnx"), load_external_data=False).metadata_props[0].value)
    assert meta["policy_resolved"]["decode"]["kind"] == "recent_window"
    attrs = meta["attention"]["attributes"]
    assert (attrs["policy"], attrs["policy_decode_sink"], attrs["policy_decode_window"]) == \
        ("recent_window", 0, 8)


def test_policy_without_lowering_is_refused_by_the_export():
    class NoOnnx(Policy):
        kind: Literal["no_onnx"] = "no_onnx"

    register_policy(NoOnnx)
    try:
        from kvconvert.export.onnx.policy import bind_policy
        from kvconvert.models import describe
        from tiny_models import tiny_config

        with pytest.raises(UserError, match="'no_onnx' cannot be exported"):
            bind_policy("no_onnx", describe(tiny_config("llama", 2)), 64)
    finally:
        unregister_policy("no_onnx")


@pytest.mark.parametrize("kind", policy_kinds())
def test_every_registered_policy_keeps_the_contract(kind):
    cls = policy_class(kind)
    p = cls()
    assert cls.policy_kind() == kind and set(cls.phases) <= {"decode", "prefill"}
    assert parse_policy_spec(kind) == parse_policy_spec(p.model_dump())
    for context in (1, 100, 5000):
        assert 0 < p.decode_read(context) <= context
    for phase in cls.phases:
        attrs = p.onnx_attributes(phase)
        assert attrs[phase] == kind and {f"{phase}_sink", f"{phase}_window"} <= set(attrs)
    assert p.onnx_context_multiple() >= 1 and p.validate_length() >= 0
    with pytest.raises(UserError, match="did you mean"):
        cls.parse({"kindd": kind})
