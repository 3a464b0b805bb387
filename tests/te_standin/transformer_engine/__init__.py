"""TE STAND-IN, not NVIDIA Transformer Engine: the API surface hf_nvfp4's TE adapter calls.

It mirrors module paths, names and signatures of Transformer Engine 2.20.0.dev0
(NVIDIA/TransformerEngine at d0067d0d, 2026-08-22; each file cites its source file),
enforces the preconditions TE documents with TE's own error texts, and computes with
hf_nvfp4's emulated GEMMs (``hf_nvfp4.ops.linear.quantized_linear``). None of TE's code is
here. Tests against it check the adapter's side of the contract only; they never count as
TE verified.

The stand-in runs on the CPU: ``DEVICE_TYPE`` is the device type it treats as "cuda"
(tests set "cpu"), and the default torch generator stands for the default CUDA generator.
"""

DEVICE_TYPE = "cuda"
STANDIN = True

# transformer_engine/__init__.py: __version__ = str(metadata.version("transformer_engine"))
__version__ = "2.20.0"
