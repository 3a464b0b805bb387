"""TE STAND-IN, not NVIDIA Transformer Engine: a contract for the API hf_nvfp4's TE adapter calls.

Every behaviour it models was read from NVIDIA/TransformerEngine at commit d0067d0da
(2.20.0.dev0, 2026-08-22) and carries a ``file:line`` citation at that commit in a comment:
module paths, names and signatures; the preconditions TE enforces on the tensors it is actually
given (input dtype, GEMM operand dtypes, FP16 output from FP4 GEMMs, alignment, and the support
checks with their CUDA and cuBLASLt conditions), with TE's error texts; and the numerics, from a
small independent implementation of TE's reference quantizers (``_numerics.py``). No TE code is
copied, and nothing here imports hf_nvfp4, so "the TE path equals the emulation" compares two
implementations. Tests against it check the adapter against what TE's source says; they never
count as TE verified on a GPU.

The stand-in runs on the CPU: ``DEVICE_TYPE`` is the device type it treats as "cuda" (tests set
"cpu"), and the default torch generator stands for the default CUDA generator.
"""

DEVICE_TYPE = "cuda"
STANDIN = True
TE_COMMIT = "d0067d0da"

# transformer_engine/__init__.py: __version__ = str(metadata.version("transformer_engine"))
__version__ = "2.20.0"
