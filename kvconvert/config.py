"""Strict typed configs shared by the library, the CLI and recipes.

Every pass config derives from `StrictConfig`: unknown keys are errors that name the key and
the closest valid one, so a misspelt recipe key never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def parse(cls, data: dict[str, Any] | None = None, *, where: str = "") -> "StrictConfig":
        """Validate `data`, turning pydantic errors into one `UserError` line."""
        return validated(cls, data or {}, where or cls.__name__)

    def merged(self, overrides: dict[str, Any]) -> "StrictConfig":
        """A copy with `overrides` applied (None values ignored), re-validated."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).parse(data)


def closest(name: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def validated(cls: type[BaseModel], data: Any, where: str) -> Any:
    """`cls.model_validate(data)`, a `UserError` line (`describe_validation_error`) when it fails."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(describe_validation_error(cls, exc, where)) from None


def config_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config classes a field annotation holds (`X`, `X | None`, `list[X]`, a union of X, Y ...)."""
    if isinstance(annotation, type):
        return [annotation] if issubclass(annotation, BaseModel) else []
    return [c for arg in typing.get_args(annotation) for c in config_classes(arg)]


def config_class(annotation: Any) -> type[BaseModel] | None:
    """The config class of a field annotated `X`, `X | None`, `list[X]` ... (one level), else None."""
    for cand in (annotation, *typing.get_args(annotation)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def describe_validation_error(cls: type[BaseModel], exc: ValidationError, where: str) -> str:
    """One line for all of `exc`'s errors: the full key path, and for an unknown key the closest valid key of
    the (possibly nested) config that holds it."""
    parts = []
    for err in exc.errors():
        keys = [str(p) for p in err["loc"]]
        loc = ".".join(keys)
        if err["type"] == "extra_forbidden":
            owner = _owner(cls, err["loc"][:-1])
            valid = list(owner.model_fields) if owner else []
            hint = closest(keys[-1], valid)
            parts.append(f"unknown key '{loc}' in {where}" + (f" (did you mean '{hint}'?)" if hint else "")
                         + (f"; valid keys: {', '.join(valid)}" if valid else ""))
        else:
            parts.append(f"{where}: {loc}: {err['msg']}" if loc else f"{where}: {err['msg']}")
    return "; ".join(parts)


def _owner(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at `loc` (list indices and dict keys skipped; in a union
    discriminated on `kind`, pydantic puts the tag in the path)."""
    owners = [cls]
    for key in loc:
        if not isinstance(key, str):
            continue
        tagged = [c for c in owners if "kind" in c.model_fields and c.model_fields["kind"].default == key]
        if tagged:
            owners = tagged
            continue
        holder = next((c for c in owners if key in c.model_fields), None)
        if holder is None:
            return None
        owners = config_classes(holder.model_fields[key].annotation)
    return owners[0] if len(owners) == 1 else None
