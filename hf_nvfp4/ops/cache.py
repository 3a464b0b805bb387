"""Quantize an input shared by sibling Linears once (q/k/v, gate/up), never returning a stale result.

An entry is keyed by the source tensor itself, held weakly (a freed tensor never matches a new
one that lands at the same address), by its version counter (every in-place op bumps it), data
pointer, shape, strides, dtype and device, and by the quantizer spec and compute dtype. Only
round-to-nearest specs are shared: a stochastic operand must draw fresh noise, so it is never
reused. One source tensor is kept at a time (siblings run back to back), so the cache holds at
most one activation's operands.

>>> import torch
>>> cache = OperandCache()
>>> x = torch.randn(4, 16)
>>> a = cache.get(x, "k", lambda: x * 2)
>>> cache.get(x, "k", lambda: x * 3) is a   # same tensor, unchanged: reused
True
>>> _ = x.add_(1)                           # changed in place: recomputed
>>> cache.get(x, "k", lambda: x * 3) is a
False
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..formats._compile import fused


def _signature(t: torch.Tensor) -> tuple | None:
    """What must be unchanged for a cached operand of ``t`` to be valid; None: never cache ``t``."""
    if t.is_inference() or t.device.type == "meta" or torch.compiler.is_compiling():
        return None  # inference tensors have no version counter; a compiled graph must not branch on one
    return (t._version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


class OperandCache:
    """Quantized operands of the most recent source tensor, per (role, spec, dtype) key."""

    def __init__(self) -> None:
        self._slot: tuple[weakref.ref, tuple, dict] | None = None
        self.hits = 0
        self.misses = 0

    def get(self, source: torch.Tensor, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, or what it returned for ``source`` and ``key`` while ``source`` is unchanged."""
        sig = _signature(source)
        if sig is None:
            return make()
        slot = self._slot
        if slot is None or slot[0]() is not source or slot[1] != sig:
            slot = (weakref.ref(source), sig, {})
            self._slot = slot
        values = slot[2]
        if key in values:
            self.hits += 1
            return values[key]
        self.misses += 1
        out = values[key] = make()
        return out

    def clear(self) -> None:
        """Drop what is kept (at the end of a forward, the last input's operands are not needed)."""
        self._slot = None

    def __getstate__(self) -> dict:  # weak references do not pickle; a copy starts empty
        return {"_slot": None, "hits": 0, "misses": 0}

    def __deepcopy__(self, memo) -> OperandCache:
        return OperandCache()


# ----------------------------------------------------------------------------- weights


_ROW = 1024
_MULTIPLIERS: dict = {}


def _multipliers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed odd int32 multipliers for the columns of a [rows, 1024] view (a 4 KiB table)."""
    m = _MULTIPLIERS.get(device)
    if m is None:
        g = torch.Generator().manual_seed(0x5EED)
        m = (torch.randint(0, 2**31 - 1, (_ROW,), generator=g, dtype=torch.int32) | 1).to(device)
        _MULTIPLIERS[device] = m
    return m


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A 64-bit content hash of ``t``'s raw bits (one read pass, a few vectorised whole-tensor ops):
    detects the writes no version counter sees. Two position-weighted sums mod 2^32 (products wrap):
    one weights each column of a [rows, 1024] view, one each row, so a changed value or two swapped
    values change it except by coincidence (~2^-32 per sum).
    """
    flat = t.detach().reshape(-1)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    v = flat.view(bits).to(torch.int32)
    pad = (-v.numel()) % _ROW
    if pad:
        v = torch.cat([v, v.new_zeros(pad)])
    v = v.view(-1, _ROW)
    rows = torch.arange(1, 2 * v.shape[0], 2, dtype=torch.int32, device=v.device)
    return _hash(v, _multipliers(v.device), rows)


@fused(dims=(0,))
def _hash(v: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    # integer sums wrap mod 2^32 alike compiled and eager; compiled, both sums are one read pass
    h1 = (v * cols).sum(dtype=torch.int32)
    h2 = (v.sum(1, dtype=torch.int32) * rows).sum(dtype=torch.int32)
    return torch.stack([h1, h2])


class _Entry:
    __slots__ = ("ref", "sig", "generation", "fp", "values", "hits", "reused")

    def __init__(self, ref, sig, generation, fp):
        self.ref, self.sig, self.generation, self.fp = ref, sig, generation, fp
        self.values: dict = {}
        self.hits = 0
        self.reused = False  # asked for again before the weight changed: hash its next entry at once


class WeightCache:
    """Quantized weight operands, reused until the weight changes (TE's once-per-optimizer-step).

    A weight's operands (Fprop, Dgrad) are quantized at its first forward after it changed and
    reused by every later forward (gradient-accumulation micro-batches, ``no_grad`` evaluation,
    ``generate``). An entry is valid only while all of these hold:

    - the weight is the same tensor (held weakly), with the same version counter (every in-place
      op, and every torch optimizer's step, bumps it), data pointer, shape, strides, dtype, device;
    - no :meth:`invalidate` since (the optimizer-step hooks of the plugin, callbacks, Trainer and
      ``NVFP4State.watch_optimizer`` call it, and so do ``set_recipe`` and the precision switch);
    - its content hash (:func:`fingerprint`, one read pass) is unchanged: writes through ``.data``
      and FSDP's refill of unsharded storage bump no version counter.

    The hash is computed only for weights likely reused (they were before, or the forward runs
    without grad): an entry made right after the weight changed in a plain training loop has none,
    and an entry without a hash is never served: the next forward re-quantizes and hashes. So a
    plain training step pays nothing, and a cache that cannot prove a weight unchanged
    re-quantizes. Stochastic operands are never cached. Keys leave room for a shared per-tensor
    scale (a ``scale_key`` slot).

    >>> import torch
    >>> cache, w = WeightCache(), torch.randn(32, 32)
    >>> with torch.no_grad():
    ...     b = cache.get(w, "k", lambda: w * 2)   # quantized and hashed
    >>> cache.get(w, "k", lambda: w * 3) is b      # unchanged: reused
    True
    >>> _ = w.data.mul_(2)                         # a write no version counter sees
    >>> cache.get(w, "k", lambda: w * 3) is b
    False
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self.enabled = True  # False: a sharding wrapper (FSDP, ZeRO-3) refills weights; see nn.linear

    def invalidate(self) -> None:
        """Forget every weight's operands (after an optimizer step, a recipe or precision change)."""
        self.generation += 1
        for e in self._entries.values():
            e.values.clear()  # the memory goes now; what was reused is remembered

    def get(self, weight: torch.Tensor, key: Hashable, make: Callable[[], Any], *,
            training: bool | None = None) -> Any:
        """``make()``, or what it returned for ``weight`` and ``key`` while ``weight`` is unchanged.

        ``training``: whether this forward builds a graph for a backward (None: grad mode decides; an
        autograd Function's forward runs with grad mode off, so it must say so).
        """
        evaluating = not torch.is_grad_enabled() if training is None else not training
        sig = _signature(weight)
        if sig is None or not self.enabled or torch.is_inference_mode_enabled():
            return make()  # inference-mode results could not be saved for a later backward
        wid = id(weight)
        e = self._entries.get(wid)
        same = e is not None and e.ref() is weight
        if same and e.sig == sig and e.generation == self.generation:
            if e.fp is None:  # made right after a change, never verified: re-quantize and hash now
                e = self._new(weight, wid, sig, hashed=True)
                e.reused = True
            elif key in e.values:
                if bool(torch.equal(fingerprint(weight), e.fp)):
                    e.hits += 1
                    self.hits += 1
                    e.reused = True
                    return e.values[key]
                e = self._new(weight, wid, sig, hashed=True)
                e.reused = True
        else:
            # changed (or new): hash only a weight that is likely reused (it was before the change, as
            # with gradient accumulation, or this is a no_grad forward: evaluation, generate), so a
            # plain training step pays nothing
            e = self._new(weight, wid, sig, hashed=(same and e.reused) or evaluating)
        self.misses += 1
        out = e.values[key] = make()
        return out

    def _new(self, weight, wid, sig, hashed: bool) -> _Entry:
        entries = self._entries

        def drop(ref, wid=wid):
            if (cur := entries.get(wid)) is not None and cur.ref is ref:
                del entries[wid]

        e = _Entry(weakref.ref(weight, drop), sig, self.generation, fingerprint(weight) if hashed else None)
        entries[wid] = e
        return e

    def __getstate__(self) -> dict:  # weak references do not pickle; a copy starts empty
        return {"_entries": {}, "generation": 0, "hits": 0, "misses": 0, "enabled": self.enabled}

    def __deepcopy__(self, memo) -> WeightCache:
        new = WeightCache()
        new.enabled = self.enabled
        return new
