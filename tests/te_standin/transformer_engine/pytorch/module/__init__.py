"""TE stand-in: transformer_engine/pytorch/module (Linear only)."""

from .linear import Linear

__all__ = ["Linear"]
