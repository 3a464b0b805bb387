import torch

import hf_nvfp4
from hf_nvfp4.formats.e2m1 import E2M1_VALUES


def _scaled(x):
    """x * enc per element, i.e. the value that gets rounded, from a nearest-rounding pass."""
    q = hf_nvfp4.quantize_nvfp4(x)
    s = q.scale.float().repeat_interleave(16, 1) * (q.amax / 2688)
    return x / s, s


def test_unbiased_and_only_neighbours():
    x = torch.randn(16, 64)
    v, s = _scaled(x)
    n = 2000
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=gen) / s for _ in range(n)])
    grid = torch.tensor(E2M1_VALUES)
    a = v.abs().clamp(max=6)
    lo = grid[(grid[None, None, :] <= a[..., None] + 1e-6).sum(-1) - 1]
    hi = grid[torch.clamp((grid[None, None, :] < a[..., None] - 1e-6).sum(-1), max=7)]
    mags = draws.abs()
    assert ((mags - lo).abs().lt(1e-4) | (mags - hi).abs().lt(1e-4)).all()
    # E[q] = v: the standard error of a two-point draw is at most (hi-lo)/2/sqrt(n)
    err = (draws.mean(0) - v.clamp(-6, 6)).abs()
    bound = 5 * (hi - lo).clamp(min=1e-9) / 2 / n**0.5
    assert (err <= bound + 1e-5).all()
    assert abs(float((draws.mean(0) - v.clamp(-6, 6)).mean())) < 0.01


def test_reproducible_and_resumable():
    x = torch.randn(64, 64)
    gen = torch.Generator().manual_seed(11)
    a = hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=gen)
    state = gen.get_state()
    b = hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=gen)
    assert not torch.equal(a, b)  # the stream advances
    gen2 = torch.Generator()
    gen2.set_state(state)
    assert torch.equal(hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=gen2), b)
    torch.manual_seed(5)
    c = hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True)  # default generator
    torch.manual_seed(5)
    assert torch.equal(hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True), c)


def test_stochastic_keeps_grid_values():
    # Same exact-scale construction as the hand-computed nearest case: enc = 16 exactly.
    x = torch.zeros(1, 32)
    x[0, 0] = 2688 / 4096
    x[0, 16:] = torch.tensor([6.0, 4, 3, 2, 1.5, 1, 0.5, 0, -6, -4, -3, -2, -1.5, -1, -0.5, 0]) / 16
    for seed in range(20):
        out = hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out[:, 16:], x[:, 16:])
