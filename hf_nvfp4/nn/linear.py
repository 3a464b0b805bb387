"""NVFP4Linear: an nn.Linear whose GEMMs follow the recipe; its only state is weight and bias."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import PRECISIONS, NVFP4Config
from ..ops.linear import GemmRecipe, quantized_linear


class RecipeState:
    """What all converted layers of one model share: the config and the SR random stream.

    One generator per device, seeded from ``config.seed`` (plus ``rank`` so processes draw
    different streams). Backward runs in a fixed order, so the stream is reproducible; its
    state can be saved and restored with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, config: NVFP4Config, rank: int = 0):
        self.config = config
        self.rank = rank
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.config.seed + 1_000_003 * self.rank)
            self._generators[key] = g
        return self._generators[key]

    def state_dict(self) -> dict:
        return {k: g.get_state() for k, g in self._generators.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, s in state.items():
            self.generator(torch.device(k)).set_state(s)


def _check_precision(p: str, what: str) -> str:
    if p not in PRECISIONS:
        raise ValueError(f"{what} must be one of {PRECISIONS}, got {p!r}")
    return p


class NVFP4Linear(nn.Linear):
    """nn.Linear computed with the NVFP4 recipe (or another format named by ``precision``).

    ``precision`` applies to all three GEMMs; ``forward_precision`` (None = same) overrides
    the Fprop GEMM alone, which is the paper's forward-only late switch. Models are
    converted with :func:`hf_nvfp4.convert_model`, which swaps the class of existing
    nn.Linear modules in place, so parameters, hooks and state_dict keys stay the same.

    >>> import torch, hf_nvfp4
    >>> layer = hf_nvfp4.NVFP4Linear(64, 32)
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        config: NVFP4Config | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_nvfp4(RecipeState(config or NVFP4Config()))

    def _init_nvfp4(self, state: RecipeState) -> None:
        # Plain attributes, never parameters or buffers: the state_dict stays weight (+ bias).
        self.nvfp4_state = state
        self.precision = state.config.format
        self.forward_precision = None
        self.backend = "emulated"
        self._te_module = None

    @property
    def precision(self) -> str:
        return self._precision

    @precision.setter
    def precision(self, p: str) -> None:
        self._precision = _check_precision(p, "NVFP4Linear.precision")

    @property
    def forward_precision(self) -> str | None:
        return self._forward_precision

    @forward_precision.setter
    def forward_precision(self, p: str | None) -> None:
        self._forward_precision = None if p is None else _check_precision(p, "NVFP4Linear.forward_precision")

    def recipe(self, device: torch.device) -> GemmRecipe:
        cfg = self.nvfp4_state.config
        return GemmRecipe(
            fprop=self._forward_precision or self._precision,
            backward=self._precision,
            rht=not cfg.disable_rht,
            stochastic=not cfg.disable_stochastic_rounding,
            two_d=not cfg.disable_2d_quantization,
            rht_size=cfg.rht_size,
            generator=self.nvfp4_state.generator(device),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "te":  # issue 12: the TE adapter takes the call, or None sends it to the emulation
            from .te_backend import te_forward

            y = te_forward(self, x)
            if y is not None:
                return y
        return quantized_linear(x, self.weight, self.bias, self.recipe(x.device))

    def extra_repr(self) -> str:
        fwd = f", forward_precision={self._forward_precision}" if self._forward_precision else ""
        return f"{super().extra_repr()}, precision={self._precision}{fwd}, backend={self.backend}"
