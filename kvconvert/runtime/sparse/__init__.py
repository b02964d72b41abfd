"""Sparse attention at run time: policies, selection, and `sparse(model, policy)` for transformers models."""

from .policies import (
    BlockSparsePrefillPolicy,
    DensePolicy,
    LayerPolicy,
    PageTopKPolicy,
    SinkWindowPolicy,
    SparsePolicy,
    parse_policy_spec,
)

__all__ = ["BlockSparsePrefillPolicy", "DensePolicy", "LayerPolicy", "PageTopKPolicy", "SinkWindowPolicy",
           "SparsePolicy", "parse_policy_spec", "sparse"]


def __getattr__(name):
    if name == "sparse":
        from .attention import sparse

        return sparse
    raise AttributeError(name)
