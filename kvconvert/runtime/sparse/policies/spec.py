"""Read a `SparsePolicy` from a spec string (`page_topk:page=16,keep=0.25`, several joined by `+`), a YAML
file (a SparsePolicy mapping, or one policy mapping with `kind:`), or a dict. The CLI and recipes call
`parse_policy_spec`; every registered policy kind is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ....config import closest, validated
from ....errors import UserError
from .layered import SparsePolicy
from .registry import Policy, policy_class, policy_kinds


def _coerce(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else text
    except yaml.YAMLError:
        return text


def _unknown(kind: str, where: str) -> UserError:
    hint = closest(kind, policy_kinds())
    return UserError(f"unknown policy '{kind}'" + (f" in {where}" if where else "")
                     + (f" (did you mean '{hint}'?)" if hint else "") + f"; known: {', '.join(policy_kinds())}")


def _one_policy(spec: str) -> Policy:
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in policy_kinds():
        raise _unknown(name, "")
    fields: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_fields(rest))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"policy field '{item}' in '{spec}' needs the form key=value")
        fields[key.strip()] = _coerce(value.strip())
    return policy_class(name).parse(fields, where=name)


def _split_fields(text: str) -> list[str]:
    """Split on commas outside [...] (lists are written `dense_layers=[0,1]`)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _from_policies(parts: list[Policy]) -> SparsePolicy:
    """A policy of one phase sets that phase; one of both phases fills the phases no other part names."""
    chosen: dict[str, Policy | None] = {"decode": None, "prefill": None}
    for p in parts:
        if len(p.phases) == 1:
            chosen[p.phases[0]] = p
    for p in parts:
        for phase in p.phases:
            chosen[phase] = chosen[phase] or p
    data = {phase: (p or policy_class("dense")()).model_dump() for phase, p in chosen.items()}
    return SparsePolicy.parse(data, where="policy")


def parse_policy_spec(spec: str | Path | SparsePolicy | dict) -> SparsePolicy:
    """`SparsePolicy` from `page_topk:page=16,keep=0.25`, `a+b`, a YAML file path, a dict or a policy.

    A single policy name sets the phase it belongs to: `page_topk` -> decode, `block_sparse_prefill`
    -> prefill, `sink_window` and `dense` -> both (unless the other phase is named too).
    A YAML file holds either a SparsePolicy mapping (`decode:`, `prefill:`, `layers:`) or one policy
    mapping with `kind:`.
    """
    if isinstance(spec, SparsePolicy):
        return spec
    if isinstance(spec, dict):
        return _from_mapping(spec, "policy")
    text = str(spec).strip()
    if text.endswith((".yaml", ".yml")) or (Path(text).is_file() and ":" not in text):
        path = Path(text)
        if not path.is_file():
            raise UserError(f"policy file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise UserError(f"policy file {path} must hold a mapping")
        return _from_mapping(data, str(path))
    if not text:
        raise UserError("empty policy spec; e.g. page_topk:page=16,keep=0.25")
    return _from_policies([_one_policy(part) for part in text.split("+")])


def _from_mapping(data: dict, where: str) -> SparsePolicy:
    if "kind" in data:
        kind = data["kind"]
        if kind not in policy_kinds():
            raise _unknown(str(kind), where)
        return _from_policies([policy_class(kind).parse(data, where=str(kind))])
    return validated(SparsePolicy, data, where)
