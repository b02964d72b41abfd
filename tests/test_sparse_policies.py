"""Sparse policies: spec parsing, per-layer resolution, errors that name the field."""

import pytest

from kvconvert.errors import UserError
from kvconvert.runtime.sparse.policies import (
    BlockSparsePrefillPolicy,
    DensePolicy,
    PageTopKPolicy,
    SinkWindowPolicy,
    SparsePolicy,
    parse_policy_spec,
)


def test_spec_sets_the_right_phase():
    p = parse_policy_spec("page_topk:page=32,keep=0.125,dense_layers=[0,1]")
    assert isinstance(p.decode, PageTopKPolicy) and isinstance(p.prefill, DensePolicy)
    assert (p.decode.page, p.decode.keep, p.decode.dense_layers) == (32, 0.125, [0, 1])
    s = parse_policy_spec("sink_window:sink=4,window=64")
    assert isinstance(s.decode, SinkWindowPolicy) and isinstance(s.prefill, SinkWindowPolicy)
    both = parse_policy_spec("page_topk:page=16+block_sparse_prefill:tile=128,density=0.3")
    assert isinstance(both.prefill, BlockSparsePrefillPolicy) and both.prefill.density == 0.3
    assert both.name == "page_topk+block_sparse_prefill"
    assert parse_policy_spec("dense").is_dense


def test_yaml_file_and_layer_overrides(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("decode: {kind: page_topk, page: 16, keep: 0.5}\nlayers:\n  3: {decode: {kind: dense}}\n")
    p = parse_policy_spec(str(f))
    assert isinstance(p.for_layer(0).decode, PageTopKPolicy)
    assert isinstance(p.for_layer(3).decode, DensePolicy)
    one = tmp_path / "one.yml"
    one.write_text("kind: sink_window\nwindow: 32\n")
    assert parse_policy_spec(str(one)).decode.window == 32


def test_dense_layers_resolve_to_dense():
    p = SparsePolicy(decode=PageTopKPolicy(dense_layers=[0]))
    assert isinstance(p.for_layer(0).decode, DensePolicy)
    assert isinstance(p.for_layer(1).decode, PageTopKPolicy)


def test_round_trip_through_dict():
    p = parse_policy_spec("page_topk:page=32,keep=0.25+block_sparse_prefill:tile=64")
    assert parse_policy_spec(p.model_dump()) == p


@pytest.mark.parametrize("spec, field", [
    ("page_topk:page=48+block_sparse_prefill:tile=64", "page=48"),      # page not dividing the tile
    ("page_topk:pag=16", "pag"),                                        # unknown key
    ("page_topk:page=16,budget=4096,dense_below=1024", "budget"),       # budget larger than a sparse context
    ("page_topk:page=20", "page=20"),
    ("block_sparse_prefill:tile=96", "tile=96"),
    ("page_tokp:page=16", "page_topk"),                                 # unknown policy, with a hint
    ("page_topk:keep=2", "keep"),
    ("page_topk:page", "key=value"),
])
def test_bad_input_names_the_field(spec, field):
    with pytest.raises(UserError, match=field):
        parse_policy_spec(spec)


def test_budget_against_context():
    pol = PageTopKPolicy(page=16, budget=512, dense_below=512)
    assert pol.pages_kept(1024) == 32
    assert pol.pages_kept(100) == 7            # below dense_below: dense
    with pytest.raises(UserError, match="budget"):
        PageTopKPolicy.parse({"page": 16, "budget": 512, "dense_below": 256})


def test_pages_kept_rounds_up_and_keeps_sink_and_recent():
    pol = PageTopKPolicy(page=16, keep=0.25, dense_below=0, sink_pages=2, recent_pages=2)
    assert pol.pages_kept(16 * 100) == 25
    assert pol.pages_kept(16 * 101) == 26
    assert pol.pages_kept(16 * 8) == 4          # floor at sink + recent
    assert pol.pages_kept(16 * 3) == 3          # never more than exist
