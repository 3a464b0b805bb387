"""Older import path of NVFP4Config (it lives in ``hf_nvfp4.integrations.config``)."""

from .integrations.config import BACKENDS, PRECISIONS, QUANT_METHOD, NVFP4Config

__all__ = ["BACKENDS", "PRECISIONS", "QUANT_METHOD", "NVFP4Config"]
