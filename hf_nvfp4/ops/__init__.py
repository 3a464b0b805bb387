"""Autograd functions for the three GEMMs of a Linear layer (Fprop, Dgrad, Wgrad)."""

from .linear import GemmRecipe, quantized_linear

__all__ = ["GemmRecipe", "quantized_linear"]
