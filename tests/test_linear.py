"""The three GEMMs against compositions of the independent numpy reference quantizer."""

import numpy as np
import pytest
import reference as ref
import torch

import hf_nvfp4
from hf_nvfp4.config import NVFP4Recipe
from hf_nvfp4.ops import GemmPlan, quantized_linear


def plan(fprop=None, backward=None, generator=None, **recipe):
    return GemmPlan.from_recipe(NVFP4Recipe(**recipe), fprop, backward, generator)


def deq(x, tile=(1, 16), rht=False):
    codes, scale, amax = ref.nvfp4(x, tile=tile, rht=rht)
    return torch.from_numpy(ref.nvfp4_dequant(codes, scale, amax)).double()


def run(x, w, b, recipe, dy):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    y = quantized_linear(x, w, b, recipe)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def mx_deq(t, tile, elem_max):
    """MX blocks by hand (E2M1 for elem_max 6, E4M3 for 448): scale = 2^ceil(log2(vmax / elem_max))
    per tile, elements rounded to nearest even; partial tiles are cut, which equals zero padding."""
    a = t.float().numpy()
    out = np.empty(a.shape, dtype=np.float64)
    bm, bk = tile
    for i in range(0, a.shape[0], bm):
        for j in range(0, a.shape[1], bk):
            blk = a[i : i + bm, j : j + bk]
            vmax = np.float32(np.abs(blk).max())
            d = vmax / np.float32(6) if elem_max == 6 else vmax * np.float32(1 / 448)
            scale = np.ldexp(np.float32(1), ref.ceil_log2(float(np.float32(d))))
            v = np.clip(blk * (np.float32(1) / np.float32(scale)), -elem_max, elem_max).astype(np.float32)
            if elem_max == 6:
                codes = ref.e2m1_codes(v)
                vals = ref.E2M1[codes & 7] * np.where(codes >= 8, -1.0, 1.0)
            else:
                vals = np.sign(v) * ref.e4m3_round(np.abs(v))
            out[i : i + bm, j : j + bk] = vals * np.float64(scale)
    return torch.from_numpy(out)


def ref_deq(fmt, t, tile, rht=False):
    """The reference quantize-dequantize of one GEMM operand (blocks along its last dim)."""
    if fmt == "fp8_tensor":
        return torch.from_numpy(ref.fp8_current(t, None, False)).double()
    if fmt == "fp8_block":  # TE's default: power-of-two scales
        return torch.from_numpy(ref.fp8_current(t, tile, True)).double()
    if rht:  # 16-point transform of the zero-padded operand (padded to the 32-element block)
        t = ref.rht16(torch.nn.functional.pad(t, (0, (-t.shape[-1]) % 32)))
    return mx_deq(t, tile, 6 if fmt == "mxfp4" else 448)


def close(a, b, tol=2e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max err {err}"


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(48, 64, generator=g) * torch.logspace(-1, 1, 64)
    w = torch.randn(32, 64, generator=g) * 0.1
    b = torch.randn(32, generator=g)
    dy = torch.randn(48, 32, generator=g)
    return x, w, b, dy


def test_three_gemms_match_recipe(data):
    x, w, b, dy = data
    y, dx, dw, db = run(x, w, b, plan(disable_stochastic_rounding=True), dy)
    wq = deq(w, (16, 16))
    close(y, deq(x) @ wq.T + b.double())
    close(dx, deq(dy) @ wq)
    close(dw, deq(dy.T.contiguous(), rht=True) @ deq(x.T.contiguous(), rht=True).T)
    close(db, dy.sum(0))


def test_ablation_flags_change_exactly_their_part(data):
    x, w, b, dy = data
    # no 2D: W in 1x16 blocks along K for Fprop and along N for Dgrad
    y, dx, dw, _ = run(x, w, b, plan(disable_stochastic_rounding=True, disable_2d_quantization=True), dy)
    close(y, deq(x) @ deq(w).T + b.double())
    close(dx, deq(dy) @ deq(w.T.contiguous()).T)
    # no RHT: Wgrad operands quantized along M without the transform
    _, _, dw2, _ = run(x, w, b, plan(disable_stochastic_rounding=True, disable_rht=True), dy)
    close(dw2, deq(dy.T.contiguous()) @ deq(x.T.contiguous()).T)
    assert not torch.equal(dw2, run(x, w, b, plan(disable_stochastic_rounding=True), dy)[2])
    # SR off is deterministic, SR on is not
    gen = torch.Generator().manual_seed(0)
    a = run(x, w, b, plan(generator=gen), dy)
    c = run(x, w, b, plan(generator=gen), dy)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])
    d1 = run(x, w, b, plan(disable_stochastic_rounding=True), dy)
    d2 = run(x, w, b, plan(disable_stochastic_rounding=True), dy)
    assert torch.equal(d1[1], d2[1]) and torch.equal(d1[2], d2[2])


def test_stochastic_gradients_are_unbiased(data):
    x, w, b, dy = data
    gen = torch.Generator().manual_seed(1)
    n = 300
    dxs, dws = [], []
    for _ in range(n):
        _, dx, dw, _ = run(x, w, None, plan(generator=gen), dy)
        dxs.append(dx.double())
        dws.append(dw.double())
    dxs, dws = torch.stack(dxs), torch.stack(dws)
    want_dx = dy.double() @ deq(w, (16, 16))
    h = ref.hadamard16(torch.float64)
    dyt_rht = (dy.T.double().reshape(-1, 16) @ h).reshape(32, 48)
    want_dw = dyt_rht @ deq(x.T.contiguous(), rht=True).T
    one_dx = (dxs[0] - want_dx).abs().mean()
    mean_err = (dxs.mean(0) - want_dx).abs().mean()
    assert mean_err < one_dx / 6  # averaging n draws shrinks the error ~sqrt(n)=17x
    one_dw = (dws[0] - want_dw).abs().mean()
    assert (dws.mean(0) - want_dw).abs().mean() < one_dw / 6


def test_autocast_bf16_and_odd_token_count():
    torch.manual_seed(0)
    m = hf_nvfp4.convert_model(torch.nn.Sequential(torch.nn.Linear(64, 32)))
    x = torch.randn(3, 7, 64, requires_grad=True)  # 21 tokens: Wgrad blocks along M pad to 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 7, 32)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m[0].weight.grad.dtype == torch.float32
    # padding is exact: the same tokens padded with zero rows give the same Wgrad (SR off)
    hf_nvfp4.set_precision(m, "nvfp4")
    hf_nvfp4.set_recipe(m, disable_stochastic_rounding=True)
    w, xs = m[0].weight, torch.randn(21, 64)
    g1 = torch.autograd.grad(m(xs).sum(), w)[0]
    xpad = torch.cat([xs, torch.zeros(11, 64)])
    g2 = torch.autograd.grad(m(xpad)[:21].sum(), w)[0]
    close(g1, g2, 1e-6)


def test_saves_packed_not_bf16_copy():
    x = torch.randn(256, 256, requires_grad=True)
    w = torch.randn(256, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantized_linear(x, w, None, plan())
    extra = [t for t in saved if t is not w]
    nbytes = sum(t.numel() * t.element_size() for t in extra if t is not None)
    assert nbytes < 0.6 * x.numel() + 0.6 * w.numel() + 64  # 4.5-bit codes+scales, vs 2 bytes/elem
    assert all(t.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float32) for t in extra if t is not None)


def test_other_formats_and_bf16_through_same_machinery(data):
    x, w, b, dy = data
    # act tile, weight tile (2D where the format has one) and RHT on Wgrad, from the paper's recipes
    tiles = {"mxfp4": ((1, 32), (32, 32), True), "fp8_block": ((1, 128), (128, 128), False),
             "fp8_tensor": (None, None, False), "mxfp8": ((1, 32), (1, 32), False)}
    for fmt, (at, wt, rht) in tiles.items():
        r = NVFP4Recipe.for_format(fmt, disable_stochastic_rounding=True)
        y, dx, dw, db = run(x, w, b, GemmPlan.from_recipe(r), dy)
        close(y, ref_deq(fmt, x, at) @ ref_deq(fmt, w, wt).T + b.double())
        close(dx, ref_deq(fmt, dy, at) @ ref_deq(fmt, w.T.contiguous(), wt).T)  # blocks along N
        close(dw, ref_deq(fmt, dy.T.contiguous(), at, rht) @ ref_deq(fmt, x.T.contiguous(), at, rht).T)  # along M
        close(db, dy.sum(0))
    y, dx, dw, db = run(x, w, b, plan("bf16", "bf16"), dy)
    close(y, x.double() @ w.double().T + b.double(), 1e-5)
    # forward-only switch: Fprop in bf16, backward still NVFP4
    y2, dx2, _, _ = run(x, w, b, plan("bf16", disable_stochastic_rounding=True), dy)
    close(y2, y, 1e-5)
    close(dx2, deq(dy) @ deq(w, (16, 16)))
