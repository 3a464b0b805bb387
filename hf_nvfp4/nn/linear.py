"""NVFP4Linear: an nn.Linear whose GEMMs follow the recipe; its only state is weight and bias."""

from __future__ import annotations

import hashlib
import itertools
import weakref
import zlib

import torch
import torch.nn as nn

from ..config import NVFP4Recipe, as_recipe, check_format
from ..formats.registry import PRECISIONS, get_format
from ..ops.cache import OperandCache, WeightCache
from ..ops.linear import GemmPlan, quantized_linear


class NVFP4State:
    """What all converted layers of one model share: the frozen recipe, the stochastic-rounding
    (SR) stream and the precision switch. One owner, one object per model (``model.nvfp4_state``).

    The SR stream is re-seeded at every training forward of the model from ``recipe.seed``, the
    process rank and one number drawn from torch's default CPU generator. The Trainer and
    Accelerate already save and restore that generator with every checkpoint, so a resumed run
    draws exactly the same SR noise as an uninterrupted one, with no side file (TE likewise draws
    its SR from the default CUDA generator). Within one forward/backward, layers draw in a fixed
    order from one generator per device, so no two layers share noise.
    """

    def __init__(self, recipe: NVFP4Recipe, rank: int = 0, salt: int = 0):
        if not isinstance(recipe, NVFP4Recipe):  # normalised where it entered (convert_model, NVFP4Linear)
            raise TypeError(f"NVFP4State takes an NVFP4Recipe, got {type(recipe).__name__}")
        self._recipe = recipe
        self.rank, self.salt = rank, salt
        self.precision = self._recipe.format  # the switch state, shared by every layer
        self.forward_precision: str | None = None
        self._generators: dict[str, torch.Generator] = {}
        # Where the per-forward draw comes from: None = torch's default CPU generator. The
        # Accelerate plugin gives it a generator of its own, which it checkpoints, so what a
        # custom loop draws between load_state and the next forward cannot shift the SR stream.
        self.draw_generator: torch.Generator | None = None
        self._base = self._mix(0)
        self._layers: weakref.WeakSet = weakref.WeakSet()
        # Layers fed the same input (q/k/v, gate/up) quantize it once; emptied after every forward
        # of the model. None: every layer quantizes its own input.
        self.operand_cache: OperandCache | None = OperandCache()
        # Each weight's quantized operands, kept until the weight changes (TE's once per optimizer
        # step): reused by gradient-accumulation micro-batches and no_grad forwards. None: off.
        self.weight_cache: WeightCache | None = WeightCache()

    # -- recipe ---------------------------------------------------------------------------------
    @property
    def recipe(self) -> NVFP4Recipe:
        return self._recipe

    # -- weight cache ---------------------------------------------------------------------------
    def invalidate_weights(self, *args, **kwargs) -> None:
        """Forget every cached quantized weight (an optimizer step, a load, a recipe change)."""
        if self.weight_cache is not None:
            self.weight_cache.invalidate()

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Invalidate the weight cache after every ``optimizer.step()`` (once per optimizer)."""
        hooked = _WATCHED.setdefault(optimizer, weakref.WeakSet())
        if self in hooked:
            return
        hooked.add(self)
        ref = weakref.ref(self)

        def after_step(opt, args, kwargs):
            state = ref()
            if state is not None:
                state.invalidate_weights()

        optimizer.register_step_post_hook(after_step)

    def plan(self, device: torch.device, weight_amax: torch.Tensor | None = None) -> GemmPlan:
        """The GEMM plan of one converted module's call (Linear or experts): the role table at the
        current precision switch, this device's SR generator, the shared operand cache."""
        return GemmPlan.from_recipe(self._recipe, self.forward_precision or self.precision, self.precision,
                                    self.generator(device), self.operand_cache, self.weight_cache, weight_amax)

    # -- stochastic rounding ----------------------------------------------------------------------
    def _mix(self, draw: int) -> int:
        key = f"{self._recipe.seed}:{self.rank}:{self.salt}:{draw}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def uses_stochastic(self) -> bool:
        r = self._recipe
        return not r.disable_stochastic_rounding and get_format(self.precision).stochastic

    def begin_forward(self, module=None, args=None) -> None:
        """Re-seed the SR stream for one training forward/backward (a forward pre-hook on the model)."""
        if self.operand_cache is not None:
            self.operand_cache.clear()
        if self.weight_cache is not None and module is not None:
            # FSDP (1 and 2) and ZeRO-3 refill a weight's storage at every unshard without bumping
            # its version: such weights are quantized at every forward, never cached.
            self.weight_cache.enabled = not _sharded(module)
        if not torch.is_grad_enabled() or (module is not None and not module.training):
            return
        if not self.uses_stochastic():
            return  # draws nothing: runs without SR leave torch's default generator untouched
        draw = int(torch.randint(0, 2**62, (1,), generator=self.draw_generator or torch.default_generator))
        self._base = self._mix(draw)
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and a resumed
            # run in a new process must draw the same SR noise
            g.manual_seed(self._base ^ (zlib.crc32(key.encode()) & 0xFFFF))
            self._generators[key] = g
        return g

    def end_forward(self, module=None, args=None, output=None) -> None:
        """Drop the shared operands of the last input (a forward hook on the model): only sibling
        Linears inside one forward reuse them, and they are not needed during backward."""
        if self.operand_cache is not None:
            self.operand_cache.clear()

    def attach(self, module: nn.Module) -> None:
        """Re-seed at every forward of ``module`` (the model that was converted)."""
        detach_states(module)
        module.register_forward_pre_hook(self.begin_forward)
        module.register_forward_hook(self.end_forward)
        module.register_load_state_dict_post_hook(self.invalidate_weights)

    # -- switch ---------------------------------------------------------------------------------
    def set_precision(self, precision: str, forward_precision: str | None) -> int:
        """Every layer of this model computes in ``precision`` (Fprop in ``forward_precision`` if given)."""
        for p in (precision, forward_precision):
            if p is not None:
                _check_precision(p, "precision")
                check_format(self._recipe, p, f"switching to {p!r}")
        self.precision, self.forward_precision = precision, forward_precision
        self.invalidate_weights()
        return len(self._layers)

    def register(self, layer: NVFP4Linear) -> None:
        self._layers.add(layer)

    def state_dict(self) -> dict:
        """The switch state and the SR seed material (the SR draw itself comes from torch's generator)."""
        return {"precision": self.precision, "forward_precision": self.forward_precision,
                "base": self._base, "recipe": self._recipe.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("precision", "forward_precision", "base"):
            if key not in state:
                raise ValueError(f"NVFP4State.load_state_dict: missing {key!r} (not a saved NVFP4State)")
        self.set_precision(state["precision"], state["forward_precision"])
        self._base = int(state["base"])
        self._generators.clear()
        self.invalidate_weights()


# optimizer -> the states whose weight cache its step invalidates (both held weakly)
_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHARDING_WRAPPERS = ("FSDPModule", "FullyShardedDataParallel")


def _sharded(model: nn.Module) -> bool:
    """True if a sharding wrapper (FSDP2's FSDPModule, FSDP1, DeepSpeed ZeRO-3) manages ``model``'s weights."""
    for m in model.modules():
        if any(c.__name__ in _SHARDING_WRAPPERS for c in type(m).__mro__):
            return True
        w = m._parameters.get("weight") if isinstance(m, nn.Linear) else None
        if w is not None and (hasattr(w, "ds_id") or type(w).__name__ == "DTensor"):
            return True
    return False


def detach_states(module: nn.Module) -> None:
    """Remove the hooks of any NVFP4State from ``module`` (found by owner, so deep copies of a
    model, whose hook handles would point at the original, are cleaned too)."""
    for k, v in list(module._forward_pre_hooks.items()):
        if isinstance(getattr(v, "__self__", None), NVFP4State):
            del module._forward_pre_hooks[k]
            module._forward_pre_hooks_with_kwargs.pop(k, None)
    for k, v in list(module._forward_hooks.items()):
        if isinstance(getattr(v, "__self__", None), NVFP4State):
            del module._forward_hooks[k]
            module._forward_hooks_with_kwargs.pop(k, None)
            module._forward_hooks_always_called.pop(k, None)
    for k, v in list(module._load_state_dict_post_hooks.items()):
        if isinstance(getattr(v, "__self__", None), NVFP4State):
            del module._load_state_dict_post_hooks[k]

# Each layer built by hand gets its own state with its own SR stream (a distinct salt), until
# convert_model adopts it into its model's one shared state.
_HAND_BUILT = itertools.count(1)


def _check_precision(p: str, what: str) -> str:
    if p not in PRECISIONS:
        raise ValueError(f"{what} must be one of {PRECISIONS}, got {p!r}")
    return p


class NVFP4Linear(nn.Linear):
    """nn.Linear computed with the NVFP4 recipe (or another format: the layer's ``precision``).

    ``precision`` applies to all three GEMMs; ``forward_precision`` (None = same) overrides the
    Fprop GEMM alone, which is the paper's forward-only late switch. Both live in the model's
    shared :class:`NVFP4State`. Models are converted with :func:`hf_nvfp4.convert_model`, which
    swaps the class of existing nn.Linear modules in place, so parameters, hooks and state_dict
    keys stay the same. A layer built by hand has its own state and SR stream until
    :func:`hf_nvfp4.convert_model` adopts it into its model's shared state.

    >>> import torch, hf_nvfp4
    >>> layer = hf_nvfp4.NVFP4Linear(64, 32)
    >>> layer(torch.randn(4, 64)).shape
    torch.Size([4, 32])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        recipe = as_recipe(config)
        check_format(recipe, recipe.format, "NVFP4Linear")
        state = NVFP4State(recipe, salt=next(_HAND_BUILT))
        state.attach(self)
        self._init_nvfp4(state)

    def _init_nvfp4(self, state: NVFP4State) -> None:
        # Plain attributes, never parameters or buffers: the state_dict stays weight (+ bias).
        self.nvfp4_state = state
        state.register(self)
        self.backend = "emulated"
        self._te_module = None

    @property
    def recipe(self) -> NVFP4Recipe:
        return self.nvfp4_state.recipe

    @property
    def precision(self) -> str:
        return self.nvfp4_state.precision

    @precision.setter
    def precision(self, p: str) -> None:
        self.nvfp4_state.set_precision(_check_precision(p, "NVFP4Linear.precision"), self.forward_precision)

    @property
    def forward_precision(self) -> str | None:
        return self.nvfp4_state.forward_precision

    @forward_precision.setter
    def forward_precision(self, p: str | None) -> None:
        if p is not None:
            _check_precision(p, "NVFP4Linear.forward_precision")
        self.nvfp4_state.set_precision(self.precision, p)

    def plan(self, device: torch.device) -> GemmPlan:
        group = self.__dict__.get("nvfp4_group")  # fused_global_scale: the siblings' joint amax
        return self.nvfp4_state.plan(device, None if group is None else group.amax())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "te":  # the TE adapter takes the call, or None sends it to the emulation
            from .te_backend import te_forward

            y = te_forward(self, x)
            if y is not None:
                return y
        return quantized_linear(x, self.weight, self.bias, self.plan(x.device))

    def extra_repr(self) -> str:
        fwd = f", forward_precision={self.forward_precision}" if self.forward_precision else ""
        return f"{super().extra_repr()}, precision={self.precision}{fwd}, backend={self.backend}"
