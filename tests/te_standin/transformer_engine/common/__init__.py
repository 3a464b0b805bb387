"""TE stand-in: transformer_engine/common (only the recipe module)."""
