"""Recipe format (version 1): a model, run-wide settings, then an ordered list of typed steps.

```yaml
version: 1
model: builtin:smollm2-135m      # any model spec kvconvert accepts
name: demo                       # optional; default output folder runs/<name>
context: 8192                    # for the report's KV GiB figures
batch: 8
kv_dtype: bf16                   # default for every step field named kv_dtype
calib: {samples: 8, seqlen: 512} # default for every step field named calib (nested ones too)
steps:
  - step: eval                   # a name in kvconvert.recipe.steps.STEPS
    max_tokens: 2048             # the other keys are that step's pass config fields
```
Recipes are data: parsed with `yaml.safe_load` (duplicate keys refused), validated by the pass configs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from ..config import StrictConfig, closest, config_class, validated
from ..data.calibration import CalibConfig
from ..errors import UserError
from .steps import STEPS

VERSION = 1
RUN_DEFAULTS = ("calib", "kv_dtype")


class RecipeHeader(StrictConfig):
    """Run-wide settings of a recipe (everything but `steps`)."""

    version: Literal[1] = VERSION
    model: str
    name: str | None = None
    context: int = Field(32768, ge=1)
    batch: int = Field(8, ge=1)
    kv_dtype: Literal["fp32", "fp16", "bf16", "fp8"] = "bf16"
    calib: CalibConfig = CalibConfig()


@dataclass
class RecipeStep:
    step: str
    config: StrictConfig

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, **self.config.model_dump(mode="json")}


@dataclass
class Recipe:
    header: RecipeHeader
    steps: list[RecipeStep]
    path: Path | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and (self.header, self.steps) == (other.header, other.steps)

    @property
    def name(self) -> str:
        return self.header.name or (self.path.stem if self.path else "recipe")

    def folder_names(self) -> list[str]:
        return [f"{i:02d}-{s.step}" for i, s in enumerate(self.steps, 1)]

    def to_dict(self) -> dict[str, Any]:
        return {**self.header.model_dump(mode="json"), "steps": [s.to_dict() for s in self.steps]}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a silently ignored duplicate is a recipe bug)."""


def _no_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise UserError(f"duplicate key '{key}' in recipe (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None


def load_recipe(path: str | os.PathLike, sets: list[str] | None = None) -> Recipe:
    """Read, apply `--set KEY=VALUE` overrides, validate. Any problem is one `UserError` line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    data = read_yaml(path.read_text(), str(path))
    recipe = parse_recipe(apply_sets(data, sets or [], str(path)), str(path))
    recipe.path = path
    return recipe


def loads_recipe(text: str, where: str = "recipe") -> Recipe:
    return parse_recipe(read_yaml(text, where), where)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping with version, model and steps")
    valid = [*RecipeHeader.model_fields, "steps"]
    for key in data:
        if key not in valid:
            hint = closest(str(key), valid)
            raise UserError(f"unknown key '{key}' at the top of {where}" + (f" (did you mean '{hint}'?)" if hint else "")
                            + f"; valid keys: {', '.join(valid)}")
    if "version" not in data:
        raise UserError(f"{where}: add 'version: {VERSION}' at the top of the recipe")
    if data["version"] != VERSION:
        raise UserError(f"{where}: recipe version {data['version']!r} is not supported by this kvconvert "
                        f"(it reads version {VERSION})")
    data = dict(data)
    steps = data.pop("steps", None)
    header = validate(RecipeHeader, data, where)
    check_run_name(header.name, where)
    if not isinstance(steps, list) or not steps:
        raise UserError(f"{where}: 'steps' must be a non-empty list of steps (each a mapping with 'step: NAME')")
    parsed = [_parse_step(raw, i, header, where) for i, raw in enumerate(steps, 1)]
    _check_artifacts(parsed, where)
    return Recipe(header, parsed)


def check_run_name(name: str | None, where: str = "recipe") -> None:
    """A recipe `name` becomes the folder runs/<name>: one plain folder name, never a path."""
    if name is None:
        return
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise UserError(f"{where}: name {name!r} must be a plain folder name (no '/', '\\', '..'); runs go to "
                        "runs/<name>, or pass --out DIR to choose the folder")


def _parse_step(raw: Any, index: int, header: RecipeHeader, where: str) -> RecipeStep:
    loc = f"{where}: steps[{index}]"
    if not isinstance(raw, dict) or "step" not in raw:
        raise UserError(f"{loc} needs 'step: NAME' (one of: {', '.join(STEPS)})")
    raw = dict(raw)
    name = raw.pop("step")
    if name not in STEPS:
        hint = closest(str(name), list(STEPS))
        raise UserError(f"{loc}: unknown step '{name}'" + (f" (did you mean '{hint}'?)" if hint else "")
                        + f"; steps in this kvconvert: {', '.join(STEPS)}")
    cls = STEPS[name].config
    return RecipeStep(name, validate(cls, with_run_defaults(raw, cls, header), f"{loc} ({name})"))


def _check_artifacts(steps: list[RecipeStep], where: str) -> None:
    have = {"model", "source"}
    for i, s in enumerate(steps, 1):
        spec = STEPS[s.step]
        missing = [r for r in spec.reads if r not in have]
        if missing:
            makers = [n for n, sp in STEPS.items() if sp.writes in missing]
            raise UserError(f"{where}: steps[{i}] ({s.step}) reads '{missing[0]}', which no earlier step makes"
                            + (f"; add {' or '.join(makers)} before it" if makers else ""))
        if spec.writes:
            have.add(spec.writes)


def with_run_defaults(raw: dict[str, Any], cls: type[BaseModel], header: RecipeHeader) -> dict[str, Any]:
    """`raw` with the recipe's `calib` / `kv_dtype` filled into same-named fields it leaves unset
    (recursively into nested configs such as `heal`); the step's own values win key by key."""
    out = dict(raw)
    for fname, finfo in cls.model_fields.items():
        sub = config_class(finfo.annotation)
        if fname == "calib" and sub is CalibConfig:
            given = out.get("calib", {})
            if isinstance(given, dict):
                out["calib"] = {**header.calib.model_dump(), **given}
        elif fname == "kv_dtype" and "kv_dtype" not in out:
            out["kv_dtype"] = header.kv_dtype
        elif sub is not None and any(n in sub.model_fields for n in RUN_DEFAULTS):
            given = out.get(fname, {})
            if isinstance(given, dict):
                out[fname] = with_run_defaults(given, sub, header)
    return out


def validate(cls: type[BaseModel], data: dict[str, Any], where: str):
    """`cls.model_validate(data)`; errors name the full key path and, for unknown keys, the closest
    valid key of the (possibly nested) config that holds it."""
    return validated(cls, data, where)


def apply_sets(data: Any, sets: list[str], where: str = "recipe") -> Any:
    """Apply `--set KEY=VALUE` overrides to the raw recipe mapping (VALUE parsed as YAML).

    KEY is a run-wide field path (`context`, `calib.samples`), or `STEP.field[.sub]` where STEP is a step
    name (every step of that name) or a 1-based step number (`2.groups`).
    """
    if not sets:
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping with version, model and steps")
    data = copy.deepcopy(data)
    steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    for item in sets:
        key, eq, text = item.partition("=")
        path = [p for p in key.strip().split(".")]
        if not eq or not key or any(not p for p in path):
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set calib.samples=2 or --set eval.max_tokens=256")
        value = read_yaml(text, f"--set {key}")
        head, rest = path[0], path[1:]
        if head in RecipeHeader.model_fields:
            _set_path(data, path, value, item)
            continue
        if head.isdigit():
            n = int(head)
            if not 1 <= n <= len(steps):
                raise UserError(f"--set {item}: step {n} does not exist (the recipe has {len(steps)} steps)")
            targets = [steps[n - 1]]
        else:
            targets = [s for s in steps if isinstance(s, dict) and s.get("step") == head]
            if not targets:
                names = [str(s.get("step")) for s in steps if isinstance(s, dict)]
                hint = closest(head, names + list(RecipeHeader.model_fields))
                raise UserError(f"--set {item}: the recipe has no step or setting '{head}'"
                                + (f" (did you mean '{hint}'?)" if hint else ""))
        if not rest:
            raise UserError(f"--set {item}: name a field of the step, e.g. --set {head}.FIELD=VALUE")
        for t in targets:
            _set_path(t, rest, value, item)
    return data


def _set_path(d: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    for p in path[:-1]:
        nxt = d.get(p)
        if nxt is None:
            nxt = d[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {item}: '{p}' is not a mapping")
        d = nxt
    d[path[-1]] = value
