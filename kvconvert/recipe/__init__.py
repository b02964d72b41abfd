"""Recipes: versioned YAML lists of typed steps (the pass configs), the resumable runner and its report.

`load_recipe(path, sets)` -> `Recipe`; `run_recipe(recipe, out)` runs it; `dry_run(recipe, out)` plans it.
Step types live in `kvconvert.recipe.steps.STEPS` (one entry per landed pass).
"""

from .plan import dry_run
from .runner import RunResult, run_recipe
from .schema import Recipe, RecipeStep, load_recipe, loads_recipe, parse_recipe
from .steps import STEPS, StepContext, StepResult, register

__all__ = ["STEPS", "Recipe", "RecipeStep", "RunResult", "StepContext", "StepResult", "dry_run", "load_recipe",
           "loads_recipe", "parse_recipe", "register", "run_recipe"]
