"""Registry of architecture adapters, keyed by Hugging Face `model_type`."""

from __future__ import annotations

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
    _ensure_loaded()
    return sorted(_ADAPTERS)


def gqa_capable_model_types() -> list[str]:
    _ensure_loaded()
    return sorted(mt for mt, cls in _ADAPTERS.items() if cls.supports_gqa)


def get_adapter(model_type: str) -> "ArchitectureAdapter":
    _ensure_loaded()
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
        view = adapter.view(config)
        latent = _get(config, "kvconvert_latent")
        if latent and latent.get("kv_widths"):
            from dataclasses import replace

            view = replace(view, kv_widths=tuple(tuple(int(x) for x in w) for w in latent["kv_widths"]))
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise UserError(f"config.json ({model_type}) has a missing or invalid field ({type(exc).__name__}: "
                        f"{exc}); restore it from the original model") from None
    return view


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def _ensure_loaded() -> None:
    from . import adapters  # noqa: F401  (registers the built-in adapters)


class ArchitectureAdapter:
    """Maps one `model_type`'s config and parameter names onto `AttentionView`.

    Adapters only describe models; they never modify them.
    """

    model_type: str = ""
    supports_gqa: bool = True
    gqa_note: str = ""

    def view(self, config: Any) -> AttentionView:  # pragma: no cover - abstract
        raise NotImplementedError

    get = staticmethod(_get)
