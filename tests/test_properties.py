"""Property-based tests of the quantizers (hypothesis): random shapes, dtypes, special values.

Checked against the numpy reference (tests/reference.py) and the documented behaviour
(docs/numerics.md, "Odd shapes, NaN and Inf"): a last dim that is not a multiple of 16 is
zero-padded, so results equal the reference on the zero-padded input; NaN anywhere makes
every scale NaN and every code 0; Inf gives s_enc = 1 and a non-finite output. Plus
invariants: dequantize(quantize(x)) == fake_quantize(x) bit for bit (SR included, same
generator state), idempotence on fake_quantize's own output, SR unbiased within a bound.

Deterministic in CI: derandomize=True (examples depend only on the test), no deadline, and
at most 40 x 64 elements, and the suite runs the kernels eagerly (tests/conftest.py); the fused
path is checked bit for bit against eager in test_nvfp4.py.
"""

import math

import numpy as np
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_nvfp4
from hf_nvfp4.formats import get_format
from hf_nvfp4.formats.e2m1 import unpack_nibbles

FAST = settings(
    max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-45, 1e-38, 1e38, -1e38, 6.0, 448.0, 65504.0]


@st.composite
def tensors(draw, finite=False, max_m=40, max_k=64, min_k=0):
    """(x, dtype): a random [M, K] (sometimes [2, M, K]) tensor with a random magnitude and special values."""
    m = draw(st.integers(0, max_m))
    k = draw(st.integers(min_k, max_k))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    exp = draw(st.integers(-40, 38) if dtype == torch.float32 else st.integers(-20, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, max(k, 1))[:k] * 10.0**exp
    specials = [v for v in SPECIALS if not finite or math.isfinite(v)]
    if specials and x.numel():
        n = draw(st.integers(0, 3))
        for _ in range(n):
            i = draw(st.integers(0, x.numel() - 1))
            x.view(-1)[i] = draw(st.sampled_from(specials))
    x = x.to(dtype)
    if finite:
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # fp16 overflow of 1e38 -> inf -> 0
    if draw(st.booleans()) and m % 2 == 0:
        x = x.reshape(2, m // 2, k)
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality with every NaN counted equal (payloads aside)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(torch.where(na, 0, a).view(ints), torch.where(nb, 0, b).view(ints))


def _padded(x, rows_to, cols_to):
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    return F.pad(x2, (0, (-k) % cols_to, 0, (-m) % rows_to))


def _check_reference(x, tile, rht):
    q = hf_nvfp4.quantize_nvfp4(x, tile=tile, rht=rht)
    m, k = math.prod(x.shape[:-1]), x.shape[-1]
    if x.numel() == 0:
        assert q.dequantize().shape[:-1] == x.shape[:-1]
        assert hf_nvfp4.fake_quantize_nvfp4(x, tile=tile, rht=rht).numel() == 0
        return
    xp = _padded(x, tile[0], 16)
    codes, scale, amax = ref.nvfp4(xp, tile=tile, rht=rht)
    kp = xp.shape[1]
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes[:m])
    np.testing.assert_array_equal(q.scale.float().numpy(), scale[:m])
    np.testing.assert_array_equal(q.amax.numpy(), np.float32(amax))
    want = ref.nvfp4_dequant(codes, scale, amax)[:m, : (kp if rht else k)]
    got = q.dequantize().reshape(m, -1).numpy()
    np.testing.assert_allclose(got, want, rtol=1.2e-7, atol=0, equal_nan=True)


@FAST
@given(tensors(), st.sampled_from([(1, 16), (16, 16)]))
def test_matches_the_reference(x, tile):
    _check_reference(x, tile, rht=False)


@FAST
@given(tensors())
def test_rht_matches_the_reference(x):
    _check_reference(x, (1, 16), rht=True)


@FAST
@given(tensors(), st.sampled_from([(1, 16), (16, 16)]), st.booleans(), st.integers(0, 2**31 - 1))
def test_dequantize_of_quantize_is_fake_quantize(x, tile, stochastic, seed):
    for rht in (False, True) if tile == (1, 16) else (False,):
        kw = dict(tile=tile, rht=rht, stochastic=stochastic)
        a = hf_nvfp4.fake_quantize_nvfp4(x, generator=torch.Generator().manual_seed(seed), **kw)
        q = hf_nvfp4.quantize_nvfp4(x, generator=torch.Generator().manual_seed(seed), **kw)
        assert same_bits(a, q.dequantize(x.dtype))
        width = -(-x.shape[-1] // 16) * 16 if rht else x.shape[-1]
        assert a.shape == (*x.shape[:-1], width)


@FAST
@given(tensors(finite=True), st.sampled_from([(1, 16), (16, 16)]))
def test_fake_quantize_is_idempotent(x, tile):
    y = hf_nvfp4.fake_quantize_nvfp4(x, tile=tile)
    # as values: a tiny negative rounds to code 8 (-0.0), and -0.0 itself quantizes to +0 (as the reference)
    assert torch.equal(hf_nvfp4.fake_quantize_nvfp4(y, tile=tile), y)


@FAST
@given(tensors(), st.sampled_from([(1, 16), (16, 16)]))
def test_special_values_follow_the_documented_rule(x, tile):
    y = hf_nvfp4.fake_quantize_nvfp4(x, tile=tile)
    q = hf_nvfp4.quantize_nvfp4(x, tile=tile)
    if x.numel() == 0:
        return
    if torch.isnan(x).any():  # NaN anywhere: every scale NaN, every code 0, all NaN out
        assert torch.isnan(q.scale.float()).all() and (q.data == 0).all() and torch.isnan(y).all()
    elif torch.isinf(x).any():  # Inf: never turned into finite numbers
        assert not torch.isfinite(y).any()
    else:
        assert torch.isfinite(q.amax) and (torch.isfinite(y) | torch.isinf(x)).all()
        assert y.abs().max() <= x.abs().max().float() * (1 + 2**-7)  # no value grows past the amax (+ rounding)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(tensors(finite=True, max_m=8, min_k=1), st.integers(0, 2**31 - 1))
def test_stochastic_rounding_is_unbiased(x, seed):
    x = x.reshape(-1, x.shape[-1])
    n = 120  # n * rows * K < 65,536: the eager kernels
    rows = x.shape[0]
    if rows == 0:
        return
    # n copies in one call: one amax and the same block scales, n independent draws per element
    draws = hf_nvfp4.fake_quantize_nvfp4(x.repeat(n, 1), stochastic=True, generator=torch.Generator().manual_seed(seed))
    mean = draws.double().view(n, rows, -1).mean(0)  # fp32 sums of ~1e37 values would overflow
    q = hf_nvfp4.quantize_nvfp4(x)
    s_enc = torch.clamp(2688.0 / q.amax, max=torch.finfo(torch.float32).max)
    s_enc = torch.where(s_enc == 0, torch.ones_like(s_enc), s_enc)
    enc = torch.clamp(1.0 / (q.scale.float() * (1.0 / s_enc)), max=torch.finfo(torch.float32).max)
    enc = enc.repeat_interleave(16, 1)[:, : x.shape[1]]
    v = x.float().abs() * enc
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    inside = v <= 6  # a clamped (saturated) element is biased by design
    # Hoeffding for draws in an interval of width step: P(|mean - E| > 3 step / sqrt(n)) < 3e-8
    tol = 3 * step / enc / math.sqrt(n) + x.float().abs() * 2.0**-7 + 1e-30
    err = (mean - x.double()).abs()
    assert (err[inside] <= tol[inside]).all(), float((err - tol)[inside].max())


@FAST
@given(tensors(finite=True, max_k=96))
def test_mxfp4_matches_the_reference(x):
    """Finite inputs only: the reference's ceil(log2) has no rule for Inf (the kernel clamps to 2^127)."""
    fmt = get_format("mxfp4")
    q = fmt.quantize(x)
    assert same_bits(fmt.fake_quantize(x), q.dequantize(x.dtype))
    if x.numel() == 0:
        return
    codes, exps = ref.mxfp4(_padded(x, 1, 32))
    m = math.prod(x.shape[:-1])
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes[:m])
    np.testing.assert_array_equal(q.scale.numpy().astype(np.int64) - 127, exps[:m])


# -- issue 23: views, argument edges and the FP8 formats, all against the reference --------------
SMALL = settings(
    max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
ARGS = dict(tile=st.sampled_from([(1, 16), (16, 16)]), stochastic=st.booleans(), seed=st.integers(0, 2**31 - 1))


@st.composite
def views(draw):
    """(view, its contiguous copy): a transposed, strided, sliced or expanded view of a random tensor."""
    x = draw(tensors(max_m=33, max_k=48))
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    kind = draw(st.sampled_from(["t", "step", "slice", "expand", "neg_stride_free"]))
    if kind == "t":
        v = x2.t()
    elif kind == "step":
        v = x2[:, ::2]
    elif kind == "slice":
        v = x2[1:, 3:] if x2.shape[0] > 1 and x2.shape[1] > 3 else x2[:, :0]
    elif kind == "expand":
        v = x2[:1].expand(3, -1)
    else:  # a column-major copy: same values, other strides
        v = x2.t().contiguous().t()
    return v, v.contiguous()


@SMALL
@given(views(), st.sampled_from([(1, 16), (16, 16)]), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_non_contiguous_views_quantize_like_their_copy(pair, tile, rht, stochastic, seed):
    v, c = pair
    rht = rht and tile == (1, 16)
    kw = dict(tile=tile, rht=rht, stochastic=stochastic)
    a = hf_nvfp4.fake_quantize_nvfp4(v, generator=torch.Generator().manual_seed(seed), **kw)
    b = hf_nvfp4.fake_quantize_nvfp4(c, generator=torch.Generator().manual_seed(seed), **kw)
    assert same_bits(a, b)
    qa = hf_nvfp4.quantize_nvfp4(v, generator=torch.Generator().manual_seed(seed), **kw)
    qb = hf_nvfp4.quantize_nvfp4(c, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(qa.data, qb.data) and same_bits(qa.scale.float(), qb.scale.float())
    if not stochastic:  # and the view itself matches the numpy reference
        _check_reference(v, tile, rht)


@SMALL
@given(tensors(min_k=1), st.sampled_from([(1, 16), (16, 16)]),
       st.one_of(st.floats(0, 2.0**127, width=32), st.sampled_from([0.0, 1e-45, 6.0, 3.4e38])))
def test_amax_override_matches_the_reference(x, tile, amax):
    q = hf_nvfp4.quantize_nvfp4(x, tile=tile, amax=amax)
    m = math.prod(x.shape[:-1])
    if m == 0:
        return
    codes, scale, ref_amax = ref.nvfp4(_padded(x, tile[0], 16), tile=tile, amax=amax)
    np.testing.assert_array_equal(unpack_nibbles(q.data).numpy(), codes[:m])
    np.testing.assert_array_equal(q.scale.float().numpy(), scale[:m])
    assert same_bits(hf_nvfp4.fake_quantize_nvfp4(x, tile=tile, amax=amax), q.dequantize(x.dtype))


@SMALL
@given(st.one_of(st.floats().filter(lambda a: not (np.float32(a) >= 0 and math.isfinite(a))),
                 st.sampled_from([math.nan, math.inf, -math.inf, -0.5])))
def test_non_finite_or_negative_amax_is_a_clear_error(amax):
    x = torch.randn(4, 32)
    for fn in (hf_nvfp4.quantize_nvfp4, hf_nvfp4.fake_quantize_nvfp4):
        try:
            fn(x, amax=amax)
        except ValueError as exc:
            assert "amax must be a finite number >= 0" in str(exc)
        else:
            raise AssertionError(f"amax={amax} was accepted")


BAD_DTYPES = [torch.float64, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64,
              torch.float8_e4m3fn]


@SMALL
@given(st.sampled_from(BAD_DTYPES), st.integers(0, 3), st.integers(0, 40))
def test_unsupported_input_dtypes_are_a_clear_error(dtype, ndim, k):
    x = torch.zeros(tuple([2] * (ndim - 1) + [k]) if ndim else (), dtype=dtype)
    for fn in (hf_nvfp4.quantize_nvfp4, hf_nvfp4.fake_quantize_nvfp4):
        try:
            fn(x)
        except TypeError as exc:
            assert "is not supported; pass float32, bfloat16 or float16" in str(exc)
        else:
            raise AssertionError(f"{dtype} input was accepted")


@SMALL
@given(st.integers(-4, 2**12), st.booleans())
def test_rht_size_is_a_power_of_two_up_to_256(size, stochastic):
    x = torch.randn(3, 40)
    ok = 2 <= size <= 256 and size & (size - 1) == 0
    kw = dict(rht=True, rht_size=size, stochastic=stochastic)
    if not ok:
        for fn in (hf_nvfp4.quantize_nvfp4, hf_nvfp4.fake_quantize_nvfp4):
            try:
                fn(x, **kw)
            except ValueError as exc:
                assert "rht_size must be a power of two from 2 to 256" in str(exc)
            else:
                raise AssertionError(f"rht_size={size} was accepted")
        return
    a = hf_nvfp4.fake_quantize_nvfp4(x, generator=torch.Generator().manual_seed(1), **kw)
    q = hf_nvfp4.quantize_nvfp4(x, generator=torch.Generator().manual_seed(1), **kw)
    assert same_bits(a, q.dequantize()) and a.shape == (3, -(-40 // max(16, size)) * max(16, size))


@SMALL
@given(st.sampled_from([*BAD_DTYPES[1:], torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_dequantize_returns_floats_only(dtype):
    q = hf_nvfp4.quantize_nvfp4(torch.randn(2, 32))
    if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert q.dequantize(dtype).dtype == dtype
        return
    try:
        q.dequantize(dtype)
    except TypeError as exc:
        assert "dtype must be one of" in str(exc)
    else:
        raise AssertionError(f"dequantize({dtype}) was accepted")


@SMALL
@given(tensors(finite=True, max_k=160), st.sampled_from([(1, 128), (128, 128), None]), st.booleans())
def test_fp8_matches_the_reference(x, tile, pow2):
    """FP8 block (1x128, 128x128) and per-tensor current scaling, any shape and magnitude (finite)."""
    F = hf_nvfp4.formats
    if tile is None:
        if pow2:
            return  # per-tensor scales are fp32 only (TE's Float8CurrentScaling)
        y, q = F.fake_quantize_fp8_tensor(x), F.quantize_fp8_tensor(x)
    else:
        y = F.fake_quantize_fp8_block(x, tile=tile, pow2_scales=pow2)
        q = F.quantize_fp8_block(x, tile=tile, pow2_scales=pow2)
    assert same_bits(y, q.dequantize(x.dtype))
    if x.numel() == 0:
        assert y.shape == x.shape
        return
    want = torch.from_numpy(ref.fp8_current(x, tile, pow2)).to(x.dtype).reshape(x.shape)
    assert torch.equal(y, want)  # as values: the cast keeps -0.0's sign, the reference's np.sign does not
