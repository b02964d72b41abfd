"""Registry of architecture adapters, keyed by Hugging Face `model_type`.

The built-in adapters (`adapters.py`) register themselves when `kvconvert.models` is imported; this module
imports none of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, TypeVar

from ..errors import UserError
from .view import AttentionView

_ADAPTERS: dict[str, "type[ArchitectureAdapter]"] = {}
A = TypeVar("A", bound="type[ArchitectureAdapter]")


def register(*model_types: str) -> Callable[[A], A]:
    def deco(cls: A) -> A:
        for mt in model_types:
            if mt in _ADAPTERS:
                raise RuntimeError(f"adapter for model_type '{mt}' registered twice")
            _ADAPTERS[mt] = cls
        return cls

    return deco


def registered_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def gqa_capable_model_types() -> list[str]:
    return sorted(mt for mt, cls in _ADAPTERS.items() if cls.supports_gqa)


def get_adapter(model_type: str) -> "ArchitectureAdapter":
    try:
        return _ADAPTERS[model_type]()
    except KeyError:
        raise UserError(
            f"unsupported model_type '{model_type}'; kvconvert knows {', '.join(sorted(_ADAPTERS))} "
            "(see docs/architecture.md 'Adding a new architecture')"
        ) from None


def describe(config: Any) -> AttentionView:
    """The normalized view of a transformers config (object or dict)."""
    model_type = _get(config, "model_type")
    if model_type is None:
        raise UserError("config has no 'model_type'; is this a Hugging Face causal LM config.json?")
    adapter = get_adapter(model_type)
    try:
        return adapter.describe(config)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise UserError(f"config.json ({model_type}) has a missing or invalid field ({type(exc).__name__}: "
                        f"{exc}); restore it from the original model") from None


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


class ArchitectureAdapter:
    """Maps one `model_type`'s config and parameter names onto `AttentionView`.

    Adapters only describe models; they never modify them.
    """

    model_type: str = ""
    supports_gqa: bool = True
    gqa_note: str = ""

    def view(self, config: Any) -> AttentionView:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, config: Any) -> AttentionView:
        """`view(config)` with the per-layer cache widths the config declares, if any
        (`kvconvert_latent.kv_widths`; the exports refuse them on a model type that is not kvconvert_latent)."""
        view = self.view(config)
        widths = self.declared_kv_widths(config)
        return replace(view, kv_widths=widths) if widths else view

    @staticmethod
    def declared_kv_widths(config: Any) -> tuple[tuple[int, int], ...]:
        latent = _get(config, "kvconvert_latent") or {}
        return tuple(tuple(int(x) for x in w) for w in latent.get("kv_widths") or ())

    get = staticmethod(_get)
