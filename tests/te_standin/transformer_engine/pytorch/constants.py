"""TE stand-in for transformer_engine/pytorch/constants.py: DType (values of NVTEDType in
transformer_engine/common/include/transformer_engine/transformer_engine.h)."""

import enum


class DType(enum.IntEnum):
    kByte = 0
    kInt32 = 2
    kFloat32 = 4
    kFloat16 = 5
    kBFloat16 = 6
    kFloat8E4M3 = 7
    kFloat8E5M2 = 8
    kFloat4E2M1 = 10
