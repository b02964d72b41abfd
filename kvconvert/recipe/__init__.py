"""Recipes: versioned YAML lists of typed steps, and the runner."""
