"""TE stand-in: transformer_engine/pytorch/tensor (quantizer classes only, no tensor storage)."""
