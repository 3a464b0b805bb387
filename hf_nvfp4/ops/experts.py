"""Mixture-of-experts GEMMs with the recipe: every expert's GEMMs are independent Linear GEMMs.

This is what Transformer Engine's ``GroupedLinear`` does under the NVFP4 recipe: for expert
``e`` with the ``m_e`` tokens routed to it,

    h_e = act(Q(x_e) . Q(W1_e)^T + b1_e)        Fprop of the up (gate_up) projection
    y_e = Q(h_e) . Q(W2_e)^T + b2_e             Fprop of the down projection

where each Q has its own tensor scale (the expert's weight in 16x16 tiles, the expert's
tokens in 1x16 blocks), and Dgrad / Wgrad of each GEMM are those of
:func:`~hf_nvfp4.ops.linear.quantized_linear` (SR on gradients, RHT + 1x16 along the tokens
for Wgrad). The router, the routing weights and the activation stay in high precision.
Experts that receive no tokens run no GEMM and no quantization.

The weights stay the caller's 3-D tensors (``[E, N, K]``, or ``[E, K, N]`` when
``transposed``); each expert's matrix is a view, so gradients land in the 3-D tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear import GemmPlan, quantized_linear


def _expert_weights(w: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, ...]:
    """One [N, K] view per expert (unbind: one backward node that stacks the gradients)."""
    views = w.unbind(0)
    return tuple(v.t() for v in views) if transposed else views


def quantized_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    plan: GemmPlan,
    *,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    transposed: bool = False,
    post_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Routed experts, each expert's two GEMMs in the recipe's formats (emulated).

    hidden_states: [T, H]; top_k_index / top_k_weights: [T, k] (indices >= E, e.g. expert
    parallel sentinels, contribute nothing); up: [E, N1, H] (gate_up or up projection),
    down: [E, H_out, I]; ``activation`` maps an expert's [m, N1] up output to [m, I] (the
    model's gate, e.g. ``act(gate) * up``, or a plain activation). Returns [T, H_out] in
    ``hidden_states``' dtype, summed over the k experts of each token like transformers'
    ``grouped_mm`` implementation. ``plan``: the role table and SR generator every expert GEMM
    uses (each GEMM still computes its own tensor scales).

    >>> import torch
    >>> from hf_nvfp4.ops import GemmPlan
    >>> from hf_nvfp4.ops.experts import quantized_experts
    >>> x = torch.randn(8, 32)
    >>> idx, w = torch.randint(0, 4, (8, 2)), torch.rand(8, 2)
    >>> up, down = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    >>> def swiglu(h):
    ...     g, u = h.chunk(2, dim=-1)
    ...     return torch.nn.functional.silu(g) * u
    >>> quantized_experts(x, idx, w, up, down, swiglu, GemmPlan()).shape
    torch.Size([8, 32])
    """
    if up.ndim != 3 or down.ndim != 3 or up.shape[0] != down.shape[0]:
        raise ValueError(
            f"quantized_experts: expected 3-D expert weights with the same number of experts, "
            f"got up {tuple(up.shape)} and down {tuple(down.shape)}"
        )
    if top_k_index.shape != top_k_weights.shape or top_k_index.ndim != 2:
        raise ValueError(
            f"quantized_experts: top_k_index and top_k_weights must both be [tokens, k], "
            f"got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
        )
    n_experts = up.shape[0]
    n_tokens, k = top_k_index.shape
    ids = top_k_index.reshape(-1)
    ids_sorted, perm = torch.sort(ids, stable=True)
    # One host sync for the whole call (as grouped_mm's fallback); bin E collects the sentinels.
    counts = torch.bincount(ids_sorted.clamp(max=n_experts), minlength=n_experts + 1).tolist()
    x_sorted = hidden_states[perm // k]
    chunks = x_sorted.split(counts)
    w_up, w_down = _expert_weights(up, transposed), _expert_weights(down, transposed)
    b_up = up_bias.unbind(0) if up_bias is not None else None
    b_down = down_bias.unbind(0) if down_bias is not None else None
    outs = []
    for e in range(n_experts):
        if counts[e] == 0:
            continue  # no tokens: no quantization, no GEMM
        h = quantized_linear(chunks[e], w_up[e], None if b_up is None else b_up[e], plan)
        h = activation(h)
        outs.append(quantized_linear(h, w_down[e], None if b_down is None else b_down[e], plan))
    out_dim = down.shape[2] if transposed else down.shape[1]
    if not outs:
        return hidden_states.new_zeros(n_tokens, out_dim)
    if counts[n_experts]:
        outs.append(outs[0].new_zeros(counts[n_experts], out_dim))
    y = torch.cat(outs)
    if post_norm is not None:
        y = post_norm(y)
    weighted = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inv].view(n_tokens, k, out_dim).sum(dim=1).to(hidden_states.dtype)


def quantized_grouped_linear(inputs: torch.Tensor, sizes, weight: torch.Tensor, plan: GemmPlan, *,
                             transposed: bool = False) -> torch.Tensor:
    """Rows of ``inputs`` [T, K] grouped by expert (``sizes[e]`` rows each, in order) times each expert's
    weight (``weight`` [E, N, K], or [E, K, N] when ``transposed``), every GEMM with the recipe: JetMoE's
    ``JetMoeParallelExperts`` contract. Experts with no rows run nothing.

    >>> import torch
    >>> from hf_nvfp4.ops import GemmPlan
    >>> quantized_grouped_linear(torch.randn(6, 32), [4, 0, 2], torch.randn(3, 16, 32), GemmPlan()).shape
    torch.Size([6, 16])
    """
    sizes = [int(s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
    if weight.ndim != 3 or len(sizes) != weight.shape[0] or sum(sizes) != inputs.shape[0]:
        raise ValueError(
            f"quantized_grouped_linear: {len(sizes)} group sizes summing to {sum(sizes)} for inputs "
            f"{tuple(inputs.shape)} and weight {tuple(weight.shape)} (expected one size per expert)"
        )
    ws = _expert_weights(weight, transposed)
    outs = [quantized_linear(x, ws[e], None, plan) for e, x in enumerate(inputs.split(sizes)) if sizes[e]]
    n = ws[0].shape[0]
    return torch.cat(outs) if outs else inputs.new_zeros(0, n)


def quantized_dense_experts(hidden_states: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                            activation: Callable[[torch.Tensor], torch.Tensor], plan: GemmPlan, *,
                            transposed: bool = False) -> torch.Tensor:
    """Every expert on its own slice of ``hidden_states`` [E, T, K] (Llama 4's ``Llama4TextExperts``:
    tokens already routed and scaled), each expert's two GEMMs with the recipe. Returns [E * T, H_out].

    >>> import torch
    >>> from hf_nvfp4.ops import GemmPlan
    >>> up, down = torch.randn(2, 32, 64), torch.randn(2, 32, 32)   # transposed: [E, K, N]
    >>> act = lambda h: h.chunk(2, dim=-1)[1] * torch.nn.functional.silu(h.chunk(2, dim=-1)[0])
    >>> quantized_dense_experts(torch.randn(2, 4, 32), up, down, act, GemmPlan(), transposed=True).shape
    torch.Size([8, 32])
    """
    w_up, w_down = _expert_weights(up, transposed), _expert_weights(down, transposed)
    if hidden_states.ndim != 3 or hidden_states.shape[0] != len(w_up):
        raise ValueError(f"quantized_dense_experts: expected [E={len(w_up)}, T, K] states, "
                         f"got {tuple(hidden_states.shape)}")
    outs = [quantized_linear(activation(quantized_linear(x, w_up[e], None, plan)), w_down[e], None, plan)
            for e, x in enumerate(hidden_states.unbind(0))]
    return torch.stack(outs).reshape(-1, outs[0].shape[-1])
