import numpy as np
import pytest
import reference as ref
import torch

import hf_nvfp4
from hf_nvfp4.formats import get_format, quantize_mxfp4
from hf_nvfp4.formats.e2m1 import unpack_nibbles
from hf_nvfp4.formats.mx import ceil_log2_exponent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_matches_reference(dtype):
    x = (torch.randn(24, 128) * torch.logspace(-4, 4, 128)).to(dtype)
    x[0, :32] = 0  # an all-zero block -> exponent -127
    q = quantize_mxfp4(x)
    codes, exps = ref.mxfp4(x)
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes)
    np.testing.assert_array_equal(q.scale.numpy().astype(np.int64) - 127, exps)
    assert torch.equal(get_format("mxfp4").fake_quantize(x), q.dequantize(dtype))


def test_ceil_log2_exact_near_powers_of_two():
    d = torch.tensor([1.0, 2.0**20 * (1 + 2**-23), 0.75, 2.0**-126, 2.0**-127 * 1.5, 2.0**-140, 0.0, 3e38, 1e-45])
    want = [ref.ceil_log2(float(v)) for v in d]
    assert ceil_log2_exponent(d).tolist() == want


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("tile", [(1, 128), (128, 128)])
def test_fp8_block_matches_reference(tile, pow2):
    x = torch.randn(256, 256) * torch.logspace(-3, 3, 256)
    x[:, :128] *= 0.0  # zero blocks take scale 1
    y = hf_nvfp4.formats.fake_quantize_fp8_block(x, tile=tile, pow2_scales=pow2)
    np.testing.assert_array_equal(y.numpy(), ref.fp8_current(x, tile, pow2))
    q = hf_nvfp4.formats.quantize_fp8_block(x, tile=tile, pow2_scales=pow2)
    assert q.data.dtype == torch.float8_e4m3fn and torch.equal(q.dequantize(), y)
    if pow2:
        s = q.scale
        assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))  # powers of two


def test_fp8_block_env_switch(monkeypatch):
    x = torch.randn(4, 128) * 3.3
    monkeypatch.setenv("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")
    a = hf_nvfp4.formats.fake_quantize_fp8_block(x)
    np.testing.assert_array_equal(a.numpy(), ref.fp8_current(x, (1, 128), False))


def test_fp8_tensor_and_mxfp8():
    x = torch.randn(64, 96) * 5
    y = get_format("fp8_tensor").fake_quantize(x)
    np.testing.assert_array_equal(y.numpy(), ref.fp8_current(x, None, False))
    assert torch.equal(get_format("fp8_tensor").quantize(x).dequantize(), y)
    m = get_format("mxfp8").quantize(x)
    d = m.dequantize()
    # each 32-block's scale is the smallest power of two with vmax / scale <= 448
    vmax = x.abs().reshape(64, 3, 32).amax(-1)
    s = m.scale_values()
    assert (vmax / s <= 448).all()
    assert ((vmax / (s / 2) > 448 * (1 - 1e-6)) | (vmax == 0)).all()
    assert (d - x).abs().max() <= (s.repeat_interleave(32, 1) * 16).max()


def test_registry_shape_and_errors():
    x = torch.randn(32, 64).bfloat16()
    for name in hf_nvfp4.FORMATS:
        fmt = get_format(name)
        y = fmt.fake_quantize(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all()
        if fmt.rht_sizes:
            assert fmt.fake_quantize(x, rht=True).shape == x.shape
        else:  # a format without RHT says so instead of ignoring rht=True
            with pytest.raises(ValueError, match="no random Hadamard transform"):
                fmt.fake_quantize(x, rht=True)
    with pytest.raises(ValueError, match="unknown format 'fp16'.*mxfp4"):
        get_format("fp16")
    with pytest.raises(ValueError, match="stochastic rounding is only available"):
        get_format("fp8_block").fake_quantize(x, stochastic=True)
    with pytest.raises(ValueError, match="no per-tensor scale"):
        get_format("mxfp4").fake_quantize(x, amax=1.0)
    with pytest.raises(ValueError, match="no blocks"):
        get_format("fp8_tensor").fake_quantize(x, tile=(1, 16))
    with pytest.raises(ValueError, match=r"\(1, 32\)"):
        get_format("mxfp4").fake_quantize(x, tile=(1, 16))
    with pytest.raises(ValueError, match="supports sizes"):
        get_format("mxfp4").fake_quantize(x, rht=True, rht_size=8)


def test_mxfp4_rht_size_and_2d_tiles_take_effect():
    """Every option of an MXFP4 recipe does something: rht_size changes the transform, 32x32 tiles
    share one scale per tile (repeated on its rows), unlike 1x32 blocks."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g) * torch.logspace(-2, 2, 64)
    fmt = get_format("mxfp4")
    a, b = fmt.fake_quantize(x, rht=True, rht_size=16), fmt.fake_quantize(x, rht=True, rht_size=32)
    assert a.shape == b.shape == x.shape and not torch.equal(a, b)
    # bit for bit: the reference MXFP4 of the transform written from docs/numerics.md in numpy
    assert torch.equal(a, _mxfp4_deq(_rht_np(x, 16))) and torch.equal(b, _mxfp4_deq(_rht_np(x, 32)))
    q2 = fmt.quantize(x, tile=(32, 32))
    s = q2.scale_values()  # [64, 2]: equal within each 32-row tile
    assert torch.equal(s[:32], s[:1].expand(32, -1)) and torch.equal(s[32:], s[32:33].expand(32, -1))
    assert not torch.equal(q2.dequantize(), fmt.fake_quantize(x))
    assert torch.equal(q2.dequantize(), fmt.fake_quantize(x, tile=(32, 32)))


def _rht_np(x, size):
    """The signed Hadamard transform as documented: signs diag(s) @ H_size (s: the 16-sign vector
    repeated), fp32 sums in four lanes over every fourth input added left to right, times fp32(1/sqrt(size))."""
    h = np.array([[1.0]])
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    s = (np.resize(ref.SIGNS, size)[:, None] * h).astype(np.float32)  # [input k, output j]
    a = x.reshape(-1, size).float().numpy()
    acc = [a[:, k : k + 1] * s[k] for k in range(4)]
    for k in range(4, size):
        acc[k % 4] = acc[k % 4] + a[:, k : k + 1] * s[k]
    out = (((acc[0] + acc[1]) + acc[2]) + acc[3]) * np.float32(1 / np.sqrt(size))
    return torch.from_numpy(out.astype(np.float32)).reshape(x.shape)


def _mxfp4_deq(x):
    codes, exps = ref.mxfp4(x)
    vals = ref.E2M1[codes & 7] * np.where(codes >= 8, -1.0, 1.0)
    return torch.from_numpy((vals * np.repeat(np.ldexp(1.0, exps), 32, axis=1)).astype(np.float32))


def test_mxfp4_stochastic_unbiased():
    x = torch.randn(8, 64)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([get_format("mxfp4").fake_quantize(x, stochastic=True, generator=gen) for _ in range(1500)])
    near = get_format("mxfp4").fake_quantize(x)
    step = (near - x).abs().max()
    assert (draws.mean(0) - x).abs().max() < step * 0.25
