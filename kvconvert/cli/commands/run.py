"""kvconvert run RECIPE: the whole chain in one command (steps into OUT/NN-step/, resumable), with a report."""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("run", parents=[common], help="run a recipe (a YAML chain of steps) and write a report",
                       description="Run the steps of a recipe, each into OUT/NN-step/, then write report.md, "
                                   "report.html and report.json in OUT. A finished step whose inputs and config "
                                   "are unchanged is skipped on a re-run (resume); --force redoes it.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file (see recipes/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: run-wide (context=4096, calib.samples=2), a step by name "
                        "(eval.max_tokens=256: every step of that name) or by number (2.groups=4); repeatable")
    p.add_argument("--out", metavar="DIR", default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (resolved fields, expected KV sizes); run nothing")
    p.add_argument("--force", action="store_true", help="redo every step even if it finished unchanged")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...recipe import dry_run, load_recipe, run_recipe

    recipe = load_recipe(args.recipe, args.sets)
    out = Path(args.out) if args.out else Path("runs") / recipe.name
    if args.dry_run:
        text, _ = dry_run(recipe, out)
        print(text)
        return 0
    quiet = getattr(args, "quiet", False)
    result = run_recipe(recipe, out, force=args.force, progress=not quiet,
                        echo=(lambda line: None) if quiet else print)
    from ...recipe.report import summary_text

    print(summary_text(result.report, result.out))
    return 0
