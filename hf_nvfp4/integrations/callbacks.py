"""Trainer callbacks built from a recipe (filled in by the callbacks issue)."""

from __future__ import annotations

from ..recipe import Recipe, RecipeError


def callbacks_from_recipe(recipe: Recipe) -> list:
    unsupported = []
    if recipe.precision_switch.at is not None:
        unsupported.append("precision_switch.at")
    if recipe.fp8_shadow.enabled:
        unsupported.append("fp8_shadow.enabled")
    if recipe.evaluation.tasks:
        unsupported.append("evaluation.tasks")
    if unsupported:
        raise RecipeError(
            f"this version of hf-nvfp4 cannot run {', '.join(unsupported)} yet; remove them from "
            "the recipe (the Trainer callbacks that implement them are not part of this release)"
        )
    return []
