"""Sparse attention at run time: policies, selection, and `sparse(model, policy)` for transformers models."""

from .policies import (
    BlockSparsePrefillPolicy,
    DensePolicy,
    LayerPolicy,
    PageTopKPolicy,
    Policy,
    SinkWindowPolicy,
    SparsePolicy,
    parse_policy_spec,
    policy_class,
    policy_kinds,
    register_policy,
    unregister_policy,
)

__all__ = ["BlockSparsePrefillPolicy", "DensePolicy", "LayerPolicy", "PageTopKPolicy", "Policy", "SinkWindowPolicy",
           "SparsePolicy", "parse_policy_spec", "policy_class", "policy_kinds", "register_policy", "sparse",
           "unregister_policy"]


def __getattr__(name):
    if name == "sparse":
        from .attention import sparse

        return sparse
    raise AttributeError(name)
