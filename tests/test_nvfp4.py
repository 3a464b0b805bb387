import numpy as np
import pytest
import reference as ref
import torch

import hf_nvfp4
from hf_nvfp4.formats.e2m1 import pack_nibbles, unpack_nibbles


def _check_against_reference(x, tile=(1, 16), rht=False, amax=None):
    q = hf_nvfp4.quantize_nvfp4(x, tile=tile, rht=rht, amax=amax)
    codes, scale, ref_amax = ref.nvfp4(x, tile=tile, rht=rht, amax=amax)
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes)
    np.testing.assert_array_equal(q.scale.float().numpy(), scale)
    assert q.amax.item() == ref_amax
    deq = q.dequantize()
    want = ref.nvfp4_dequant(codes, scale, ref_amax)
    np.testing.assert_allclose(deq.reshape(want.shape).numpy(), want, rtol=1.2e-7, atol=0)
    fake = hf_nvfp4.fake_quantize_nvfp4(x, tile=tile, rht=rht, amax=amax)
    assert fake.dtype == x.dtype and fake.shape == x.shape
    assert torch.equal(fake, deq.to(x.dtype))
    return q


def test_hand_computed_block():
    # Block 0 fixes amax = 2688/4096, so s_enc = 4096 and s_dec = 2^-12 exactly. Block 1 has
    # vmax = 0.375 -> scale e4m3(0.375 * 4096/6) = 256 and enc = 16, so x*enc = 16*x exactly.
    vals = [6, -3, 1.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0, -0.1, 4.0, 0.5, 1.0, 2.0]
    want = [7, 13, 3, 0, 2, 2, 4, 4, 6, 6, 0, 8, 6, 1, 2, 4]
    row = torch.zeros(32)
    row[0] = 2688 / 4096
    row[16:] = torch.tensor(vals) / 16
    q = hf_nvfp4.quantize_nvfp4(row[None])
    codes = unpack_nibbles(q.data)[0]
    assert codes[16:].tolist() == want
    assert codes[0].item() == 7 and codes[1:16].eq(0).all()
    assert q.scale.float()[0].tolist() == [448.0, 256.0]
    assert q.data[0, 8].item() == want[0] | (want[1] << 4)  # even index in the low nibble
    deq = q.dequantize()[0, 16:]
    rounded = [6, -3, 1.5, 0, 1, 1, 2, 2, 4, 4, 0, -0.0, 4, 0.5, 1, 2]
    assert deq.tolist() == [v / 16 for v in rounded]
    assert torch.signbit(deq[11])  # code 8 is -0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
def test_random_matches_reference(dtype, tile):
    x = (torch.randn(48, 96) * torch.logspace(-3, 3, 96)).to(dtype)
    _check_against_reference(x, tile=tile)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rht_matches_reference(dtype):
    x = torch.randn(64, 80).to(dtype)
    x[:, 7] *= 50  # an outlier channel that RHT spreads
    q = _check_against_reference(x, rht=True)
    assert q.rht


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hadamard_sum_order_is_defined(dtype):
    """Wide exponent spreads make the sum order matter: the fused transform (and a transposed
    operand read in place) equals the numpy reference bit for bit."""
    g = torch.Generator().manual_seed(5)
    spread = 6 if dtype == torch.float16 else 30
    exps = torch.randint(-spread, spread, (512, 160), generator=g)
    x = (torch.randn(512, 160, generator=g) * torch.exp2(exps)).to(dtype)
    for t in (x, x.t()):
        y = hf_nvfp4.hadamard_transform(t)
        assert y.is_contiguous() and torch.equal(y.view(torch.int8), ref.rht16(t.contiguous()).view(torch.int8))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(16, 32),
        lambda: torch.full((16, 32), 1e-30),
        lambda: torch.randn(16, 32) * 1e-30,
        lambda: torch.randn(16, 32) * 1e30,
        lambda: torch.randn(16, 32) * 1e-38,  # s_enc saturates at FLT_MAX
        lambda: torch.cat([torch.zeros(16, 16), torch.randn(16, 16)], 1),  # a zero block
        lambda: torch.randn(32, 64) * torch.where(torch.arange(64) % 13 == 0, 1e4, 1.0),  # outlier channels
        lambda: torch.randn(32, 48).bfloat16() * 1e-20,
    ],
)
def test_edge_magnitudes(make):
    x = make()
    for tile in [(1, 16), (16, 16)]:
        _check_against_reference(x, tile=tile)


def test_midpoints_tie_to_even_code():
    # Exact scale trick of the hand case, for many random rows: every element sits on a
    # rounding midpoint of the E2M1 grid.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.zeros(64, 32)
    x[:, 0] = 2688 / 4096
    pick = mids[torch.randint(0, 7, (64, 15))] * torch.where(torch.rand(64, 15) < 0.5, -1.0, 1.0)
    x[:, 16] = 6 / 16
    x[:, 17:] = pick / 16
    q = _check_against_reference(x)
    codes = unpack_nibbles(q.data)[:, 17:]
    assert (codes % 2 == 0).all()  # ties always land on even codes


def test_amax_override_and_nd_input():
    x = torch.randn(2, 3, 16, 32)
    q = _check_against_reference(x, amax=torch.tensor(10.0))
    assert q.amax.item() == 10.0 and q.data.shape == (96, 16) and q.dequantize().shape == x.shape


def test_odd_shapes_pad_with_zeros():
    x = torch.randn(20, 40)  # K not a multiple of 16, M not a multiple of 16 (2D tiles)
    for tile in [(1, 16), (16, 16)]:
        q = hf_nvfp4.quantize_nvfp4(x, tile=tile)
        assert q.data.shape == (20, 24) and q.scale.shape == (20, 3)
        padded = torch.nn.functional.pad(x, (0, 8, 0, 12))
        qp = hf_nvfp4.quantize_nvfp4(padded, tile=tile)
        assert torch.equal(q.data, qp.data[:20]) and torch.equal(q.scale.float(), qp.scale.float()[:20])
        fake = hf_nvfp4.fake_quantize_nvfp4(x, tile=tile)
        assert fake.shape == x.shape and torch.equal(fake, q.dequantize())


def test_2d_tile_scale_repeated_on_rows():
    x = torch.randn(32, 64)
    q = hf_nvfp4.quantize_nvfp4(x, tile=(16, 16))
    s = q.scale.float()
    assert torch.equal(s[:16], s[:1].expand(16, -1)) and torch.equal(s[16:], s[16:17].expand(16, -1))


def test_idempotent_and_pack_roundtrip():
    x = torch.randn(64, 128)
    y = hf_nvfp4.fake_quantize_nvfp4(x)
    assert torch.equal(hf_nvfp4.fake_quantize_nvfp4(y), y)
    codes = torch.randint(0, 16, (7, 30), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def test_hadamard_orthogonal():
    h = hf_nvfp4.formats.hadamard_matrix(16)
    assert torch.allclose(h @ h.T, torch.eye(16), atol=1e-6)
    x = torch.randn(8, 64, dtype=torch.float64)
    y = hf_nvfp4.hadamard_transform(x)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1))
    w = torch.randn(5, 64, dtype=torch.float64)
    assert torch.allclose(hf_nvfp4.hadamard_transform(w) @ y.T, w @ x.T)  # GEMM unchanged
    assert torch.allclose((y.reshape(-1, 16) @ h.double().T).reshape(x.shape), x)
    assert torch.equal(ref.hadamard16(), h)


def test_nan_and_inf_are_never_hidden():
    x = torch.randn(16, 32)
    x[3, 5] = float("nan")
    assert torch.isnan(hf_nvfp4.fake_quantize_nvfp4(x)).all()
    q = hf_nvfp4.quantize_nvfp4(x)
    assert torch.isnan(q.scale.float()).all() and (q.data == 0).all()  # TE: NaN codes are 0
    x[3, 5] = float("inf")
    y = hf_nvfp4.fake_quantize_nvfp4(x)
    assert not torch.isfinite(y).any()
    q = hf_nvfp4.quantize_nvfp4(x)
    codes, scale, _ = ref.nvfp4(x)  # codes and scales still follow TE's arithmetic
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes)
    np.testing.assert_array_equal(q.scale.float().numpy(), scale)


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(4, 16, dtype=torch.int32)), TypeError, "float32"),
        (lambda: hf_nvfp4.quantize_nvfp4([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.tensor(1.0)), ValueError, "0-dim"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(4, 16), tile=(1, 32)), ValueError, "(16, 16)"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(4, 16), tile="1x16"), ValueError, "tile"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(16, 16), tile=(16, 16), rht=True), ValueError, "rht"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(4, 16), amax=-1.0), ValueError, ">= 0"),
        (lambda: hf_nvfp4.quantize_nvfp4(torch.ones(4, 16), amax=torch.ones(2)), ValueError, "scalar"),
        (lambda: hf_nvfp4.hadamard_transform(torch.ones(4, 20)), ValueError, "multiple of size=16"),
        (lambda: hf_nvfp4.hadamard_transform(torch.ones(4, 16), size=12), ValueError, "power of two"),
        (lambda: hf_nvfp4.set_compile_mode("sometimes"), ValueError, "auto"),
    ],
)
def test_errors_are_clear(call, err, words):
    with pytest.raises(err, match=None) as info:
        call()
    assert words in str(info.value)


def test_empty_input():
    x = torch.empty(0, 32)
    assert hf_nvfp4.fake_quantize_nvfp4(x).shape == (0, 32)
    assert hf_nvfp4.quantize_nvfp4(x).data.shape == (0, 16)


def test_fused_matches_eager_bit_for_bit(eager_and_fused):
    x = (torch.randn(256, 512) * torch.logspace(-2, 2, 512)).bfloat16()
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731

    def run():
        q = hf_nvfp4.quantize_nvfp4(x, tile=(16, 16))
        return (
            hf_nvfp4.fake_quantize_nvfp4(x),
            hf_nvfp4.fake_quantize_nvfp4(x, rht=True),
            hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=gen()),
            hf_nvfp4.quantize_nvfp4(x, stochastic=True, generator=gen()).data,
            q.data,
            q.scale.view(torch.uint8),
        )

    eager, fused = eager_and_fused(run)
    for a, b in zip(eager, fused, strict=True):
        assert torch.equal(a, b)
    codes, scale, _ = ref.nvfp4(x, tile=(16, 16))
    np.testing.assert_array_equal(unpack_nibbles(fused[4]).numpy(), codes)


def test_rht_ignores_autocast():
    x = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hf_nvfp4.hadamard_transform(x)
        q = hf_nvfp4.quantize_nvfp4(x, rht=True)
    assert y.dtype == torch.float32 and torch.equal(y, hf_nvfp4.hadamard_transform(x))
    assert torch.equal(q.data, hf_nvfp4.quantize_nvfp4(x, rht=True).data)


def test_block_scale_rounding_matches_e4m3_cast():
    # The fast block-scale rounding (compares and adds) must equal torch's E4M3 cast on every
    # E4M3 value, every midpoint between neighbours (ties to even), just either side of each
    # midpoint, the subnormal range and NaN.
    from hf_nvfp4.formats.nvfp4 import _round_e4m3

    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    s = torch.cat([grid, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(1e4)),
                   torch.rand(200_000) * 448, torch.rand(10_000) * 2.0**-6, torch.tensor([float("nan")])])
    got, want = _round_e4m3(s), s.to(torch.float8_e4m3fn).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_compiled_tensor_scalars_equal_the_eager_ones_over_sixty_decades():
    """Step 2 runs inside the one compiled kernel: 2688 / amax and its reciprocal must round as eager
    fp32 does (a compiler that turns c / t into c * (1 / t) would change the bits)."""
    from hf_nvfp4.formats._compile import compile_mode

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=g)
    amaxes = torch.rand(120, generator=g) * 10 ** torch.empty(120).uniform_(-30, 30, generator=g)
    for a in [*amaxes.tolist(), 1e-45, 3.0e38, 1.0, 2688.0, 7.0]:
        with compile_mode("1"):
            fused = hf_nvfp4.fake_quantize_nvfp4(x, amax=a), hf_nvfp4.quantize_nvfp4(x, amax=a, tile=(16, 16))
        with compile_mode("0"):
            eager = hf_nvfp4.fake_quantize_nvfp4(x, amax=a), hf_nvfp4.quantize_nvfp4(x, amax=a, tile=(16, 16))
        assert torch.equal(fused[0], eager[0]), a
        assert torch.equal(fused[1].data, eager[1].data) and torch.equal(fused[1].scale.view(torch.uint8),
                                                                           eager[1].scale.view(torch.uint8)), a
