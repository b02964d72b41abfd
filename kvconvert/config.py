"""Strict typed configs shared by the library, the CLI and recipes.

Every pass config derives from `StrictConfig`: unknown keys are errors that name the key and
the closest valid one, so a misspelt recipe key never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def parse(cls, data: dict[str, Any] | None = None, *, where: str = "") -> "StrictConfig":
        """Validate `data`, turning pydantic errors into one `UserError` line."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise UserError(describe_validation_error(cls, exc, where or cls.__name__)) from None

    def merged(self, overrides: dict[str, Any]) -> "StrictConfig":
        """A copy with `overrides` applied (None values ignored), re-validated."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return type(self).parse(data)


def closest(name: str, choices: list[str]) -> str | None:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return match[0] if match else None


def describe_validation_error(cls: type[BaseModel], exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            hint = closest(key, list(cls.model_fields))
            parts.append(
                f"unknown key '{loc}' in {where}" + (f" (did you mean '{hint}'?)" if hint else "")
                + f"; valid keys: {', '.join(cls.model_fields)}"
            )
        else:
            parts.append(f"{where}.{loc}: {err['msg']}" if loc else f"{where}: {err['msg']}")
    return "; ".join(parts)
