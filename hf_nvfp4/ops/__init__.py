"""Autograd functions for the three GEMMs of a Linear layer (Fprop, Dgrad, Wgrad), and the role table."""

from __future__ import annotations

from .linear import GemmPlan, quantized_linear
from .roles import QuantizerSpec, quantizer_for, role_table

__all__ = ["GemmPlan", "QuantizerSpec", "quantized_linear", "quantizer_for", "role_table"]
