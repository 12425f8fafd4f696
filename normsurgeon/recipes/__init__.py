"""The ``--to`` grammar and the one registry of conversion recipes.

Grammar: ``NAME[:ARG]``, e.g. ``gn``, ``gn:16``, ``gn+ws``, ``gn+ws:8``, ``ghost:16``, ``ebn:0.5``.
A recipe is one :class:`RecipeEntry`; adding a method is one ``register(...)`` call in a module
listed in ``_BUILTIN_MODULES``.
"""
from normsurgeon.recipes.registry import (
    BuildContext,
    Recipe,
    RecipeEntry,
    Replacement,
    all_recipes,
    get_entry,
    parse_recipe,
    register,
)

__all__ = [
    "BuildContext", "Recipe", "RecipeEntry", "Replacement",
    "all_recipes", "get_entry", "parse_recipe", "register",
]
