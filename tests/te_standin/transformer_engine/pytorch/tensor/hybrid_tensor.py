"""TE stand-in for pytorch/tensor/hybrid_tensor.py (TE >= 2.19, PR #2817; d0067d0da): one quantizer
for the rowwise (Fprop) use of a tensor, another for its columnwise (backward) use. Constructor
checks as in TE (hybrid_tensor.py:81-129); with ``columnwise_source="original"`` each direction
quantizes the original tensor (:202-215)."""

from __future__ import annotations

from ..quantized_tensor import Quantizer


class HybridQuantizer(Quantizer):
    _COLUMNWISE_SOURCES = ("original", "rowwise_dequantized")

    def __init__(
        self, *, rowwise_quantizer: Quantizer, columnwise_quantizer: Quantizer, columnwise_source: str = "original"
    ) -> None:
        super().__init__(rowwise=True, columnwise=True)
        for role, q in (("rowwise", rowwise_quantizer), ("columnwise", columnwise_quantizer)):
            if not isinstance(q, Quantizer):
                raise TypeError(
                    "HybridQuantizer requires concrete Quantizer instances for "
                    f"both directions, but the {role} argument is {type(q).__name__}."
                )
        if rowwise_quantizer is columnwise_quantizer:
            raise ValueError(
                "HybridQuantizer requires distinct rowwise and columnwise quantizer"
                " instances. If both directions need shared state, construct two"
                " quantizer objects that reference the same shared state."
            )
        if columnwise_source not in self._COLUMNWISE_SOURCES:
            raise ValueError(
                "HybridQuantizer columnwise_source must be one of "
                f"{self._COLUMNWISE_SOURCES}, got {columnwise_source!r}."
            )
        self.rowwise_quantizer = rowwise_quantizer
        self.columnwise_quantizer = columnwise_quantizer
        self.columnwise_source = columnwise_source
        rowwise_quantizer.set_usage(rowwise=True, columnwise=False)
        columnwise_quantizer.set_usage(rowwise=False, columnwise=True)

    def quantize(self, t):
        row, _ = self.rowwise_quantizer.quantize(t)
        _, col = self.columnwise_quantizer.quantize(t)
        return row, col
