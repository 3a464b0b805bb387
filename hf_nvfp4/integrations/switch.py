"""LateSwitch: the paper's late switch to higher precision, as a plain schedule.

Shared by :class:`~hf_nvfp4.PrecisionSwitchCallback` (the HF Trainer) and
:class:`~hf_nvfp4.NVFP4Plugin` (your own Accelerate loop): one place decides *when* to switch
(a fraction of max_steps, a step, or a token count) and *what* switches (``set_precision``
with a scope). The switch itself lives in the model's ``NVFP4State``, which both entry points
checkpoint; this object only holds the schedule.
"""

from __future__ import annotations

import logging
import math
import re

from ..formats.registry import PRECISIONS
from ..nn.convert import SCOPES, set_precision

logger = logging.getLogger("hf_nvfp4")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str | int | float) -> int:
    """``"8.2T"`` -> 8_200_000_000_000; plain numbers pass through."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*(tokens)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a token count; write e.g. '8.2T', '500M' or 123456")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).upper()]))


class LateSwitch:
    """When to switch every NVFP4Linear to ``to`` (BF16), and with which scope.

    switch_at: a fraction of max_steps (float in (0, 1)), an absolute step (int), or a token
        count (``"8.2T"``; or pass ``tokens=``), turned into a step with ``tokens_per_step``
        (or, if not given, measured from the first batch by the caller).
    scope: "all" (all three GEMMs, the paper's switch), "forward" (Fprop only, the cheap
        variant) or "backward" (Dgrad and Wgrad only, the paper's control).
    The switch happens after the optimizer step numbered ``switch_step`` (1-based), so steps
    ``switch_step + 1`` onwards compute in ``to``.

    Turning a fraction or a token count into ``switch_step``: a fraction ``f`` switches after step
    ``floor(f * max_steps + 0.5)`` (the nearest step, halves up: 0.82 of 1000 -> 820, 0.25 of 10 ->
    3); tokens switch after the first step by which that many tokens were consumed
    (``ceil(tokens / tokens_per_step)``). A schedule that cannot take effect is refused once
    ``max_steps`` is known, naming the values: a fraction or token count that comes out at step 0
    (the whole run would be in ``to``; ``switch_at=0`` says so explicitly), and a switch at or after
    the last step (``switch_step >= max_steps``: no step would run in ``to``).

    >>> from hf_nvfp4.integrations.switch import LateSwitch
    >>> LateSwitch(0.82).resolve(max_steps=1000)
    820
    """

    owner = "LateSwitch"  # the name errors give (the callback and the plugin say theirs)

    def __init__(self, switch_at=None, to: str = "bf16", scope: str = "all", *, tokens=None,
                 tokens_per_step: int | None = None):
        o = self.owner
        if (switch_at is None) == (tokens is None):
            raise ValueError(f"{o}: give exactly one of switch_at or tokens=")
        if to not in PRECISIONS:
            raise ValueError(f"{o}: to must be one of {PRECISIONS}, got {to!r}")
        if scope not in SCOPES:
            raise ValueError(f"{o}: scope must be one of {SCOPES}, got {scope!r}")
        if tokens_per_step is not None and (not isinstance(tokens_per_step, int) or tokens_per_step < 1):
            raise ValueError(f"{o}: tokens_per_step must be a positive int, got {tokens_per_step!r}")
        self.to, self.scope, self.tokens_per_step = to, scope, tokens_per_step
        self.fraction = self.step = self.tokens = None
        if tokens is not None or isinstance(switch_at, str):
            self.tokens = parse_tokens(tokens if tokens is not None else switch_at)
        elif isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)):
            raise ValueError(f"{o}: switch_at must be a fraction, a step or a token count, got {switch_at!r}")
        elif isinstance(switch_at, float):
            if not 0.0 < switch_at < 1.0:
                raise ValueError(f"{o}: a fractional switch_at must be in (0, 1), got {switch_at}")
            self.fraction = switch_at
        else:
            if switch_at < 0:
                raise ValueError(f"{o}: switch_at step must be >= 0, got {switch_at}")
            self.step = int(switch_at)
        self.switch_step: int | None = None
        self.max_steps: int | None = None  # known after resolve(); checks the schedule
        self.switched = False

    def resolve(self, max_steps: int | None) -> int | None:
        """The step after which to switch; None while it depends on a first batch not seen yet."""
        self.max_steps = max_steps if max_steps and max_steps > 0 else None
        if self.fraction is not None:
            if not max_steps or max_steps < 1:
                raise ValueError(f"{self.owner}: a fractional switch_at needs max_steps (got {max_steps!r})")
            # nearest step, halves up (Python's round() would send 2.5 to 2); round(.., 9) drops float noise
            self.switch_step = int(math.floor(round(self.fraction * max_steps, 9) + 0.5))
        elif self.step is not None:
            self.switch_step = self.step
        elif self.tokens_per_step:
            self.switch_step = int(math.ceil(self.tokens / self.tokens_per_step))
        self._check()
        return self.switch_step

    def measure(self, tokens_per_step: int) -> int:
        """Fix a token-count switch from the tokens one optimizer step consumes (all processes)."""
        self.tokens_per_step = int(tokens_per_step)
        self.switch_step = int(math.ceil(self.tokens / self.tokens_per_step))
        self._check()
        return self.switch_step

    def describe(self) -> str:
        """The schedule as the user gave it (for messages)."""
        if self.fraction is not None:
            return f"switch_at={self.fraction}"
        if self.step is not None:
            return f"switch_at={self.step}"
        return f"tokens={self.tokens}" + (f", tokens_per_step={self.tokens_per_step}" if self.tokens_per_step else "")

    def _check(self) -> None:
        """Refuse a schedule that cannot take effect (see the class docstring)."""
        step, max_steps, o = self.switch_step, getattr(self, "max_steps", None), self.owner
        if step is None:
            return
        if step == 0 and self.fraction is not None:
            raise ValueError(
                f"{o}: {self.describe()} of max_steps={max_steps} is step {self.fraction * max_steps:.3g}, which "
                f"rounds (to the nearest step) to step 0: the whole run would compute in {self.to}. Give "
                f"switch_at >= {0.5 / max_steps:.3g} to switch after step 1 or later, or switch_at=0 (an int) to "
                f"train in {self.to} from the start on purpose"
            )
        if step == 0 and self.tokens is not None:
            raise ValueError(
                f"{o}: {self.describe()} switches at step 0: the whole run would compute in {self.to}. Give a "
                f"positive token count, or switch_at=0 (an int) to train in {self.to} from the start on purpose"
            )
        if max_steps is not None and step >= max_steps:
            raise ValueError(
                f"{o}: {self.describe()} switches after step {step}, but the run has max_steps={max_steps}: "
                f"no step would compute in {self.to}, so the switch would never take effect. Give a step below "
                f"{max_steps} (or a fraction in (0, 1) that comes out below it), or drop the switch"
            )

    def due(self, completed_steps: int) -> bool:
        return self.switch_step is not None and not self.switched and completed_steps >= self.switch_step

    def apply(self, model, notify: bool = True) -> int:
        """Switch ``model`` now; returns how many layers it applies to."""
        n = set_precision(model, self.to, scope=self.scope)
        self.switched = True
        if notify:
            logger.info("hf_nvfp4: switched %d NVFP4Linear layers to %s (scope=%s)", n, self.to, self.scope)
        return n

    def state_dict(self) -> dict:
        """Plain ints and bools (loads with ``torch.load(weights_only=True)``)."""
        return {"switch_step": self.switch_step, "switched": self.switched, "tokens_per_step": self.tokens_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.switch_step = state["switch_step"]
        self.switched = bool(state["switched"])
        self.tokens_per_step = state["tokens_per_step"]


__all__ = ["SCOPES", "LateSwitch", "parse_tokens"]
