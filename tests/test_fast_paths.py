"""The fast paths of the emulated Linear give the reference's bits and never a stale result.

- an input shared by sibling Linears (q/k/v, gate/up) is quantized once: the same bits as
  quantizing it for each, and recomputed when the input changes (in place, or a new tensor);
- a forward without grad skips autograd and the Wgrad copy: the same output bits;
- weights are never reused across steps: an optimizer step is seen by the next forward;
- the SR hash on 32-bit lanes equals its 64-bit definition.
"""

import copy

import reference as ref
import torch

import hf_nvfp4
from hf_nvfp4.config import NVFP4Recipe
from hf_nvfp4.formats import _random
from hf_nvfp4.ops import GemmPlan, quantized_linear


class Block(torch.nn.Module):
    """q/k/v read one input, gate/up another: the sharing pattern of a transformer block."""

    def __init__(self, d=64, f=96):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.gate, self.up = torch.nn.Linear(d, f), torch.nn.Linear(d, f)
        self.down = torch.nn.Linear(f, d)

    def forward(self, x):
        a = self.q(x) * self.k(x) + self.v(x)
        h = a.tanh()
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _pair(**recipe):
    torch.manual_seed(0)
    cached = hf_nvfp4.convert_model(Block(), hf_nvfp4.NVFP4Config(bf16_last_blocks=0, **recipe))
    plain = copy.deepcopy(cached)
    plain.nvfp4_state.operand_cache = None  # every layer quantizes its own input
    return cached, plain


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def test_shared_input_quantized_once_same_bits():
    cached, plain = _pair(disable_stochastic_rounding=True)
    cache = cached.nvfp4_state.operand_cache
    x = torch.randn(2, 24, 64)
    ya, dxa, ga = _grads(cached, x)
    yb, dxb, gb = _grads(plain, x)
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    # q/k/v: 2 of 3 calls reuse both operands (Fprop and Wgrad copies); gate/up: 1 of 2
    assert cache.hits == 2 * 2 + 1 * 2
    assert cache._slot is None  # nothing kept after the forward


def test_shared_input_with_stochastic_rounding_draws_the_same_noise():
    """SR is on gradients only, so sharing the (round-to-nearest) inputs leaves the SR stream alone."""
    cached, plain = _pair()
    x = torch.randn(32, 64)
    res = []
    for model in (cached, plain):
        torch.manual_seed(7)  # the SR stream is re-seeded from torch's generator at each forward
        res.append(_grads(model, x))
    assert torch.equal(res[0][1], res[1][1])
    assert all(torch.equal(a, b) for a, b in zip(res[0][2], res[1][2], strict=True))


def _fresh(layer, x):
    """The layer's output on ``x`` with nothing shared (a new plan without a cache)."""
    st = layer.nvfp4_state
    plan = GemmPlan.from_recipe(st.recipe, st.precision, st.precision)
    with torch.no_grad():
        return quantized_linear(x.clone(), layer.weight, layer.bias, plan)


def test_changed_input_is_requantized():
    cached, _ = _pair(disable_stochastic_rounding=True)
    q, k = cached.q, cached.k  # called directly: the cache stays live between calls
    cache = cached.nvfp4_state.operand_cache
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            x = torch.randn(16, 64)
            q(x)
            x.mul_(3.0)  # in place: version counter bumped, same object and address
            assert torch.equal(k(x).detach(), _fresh(k, x))
            y = torch.randn(16, 64)  # another tensor of the same shape
            q(x)
            assert torch.equal(k(y).detach(), _fresh(k, y))
            z = x[:, :]  # a view of x: same address, shape and version, another object
            q(x)
            hits = cache.hits
            assert torch.equal(k(z).detach(), _fresh(k, z)) and cache.hits == hits
    del x, y, z
    buf = torch.randn(16, 64)
    addr = buf.data_ptr()
    q(buf)
    del buf  # freed; a new tensor can land on the same address with other contents
    new = torch.randn(16, 64)
    assert torch.equal(k(new), _fresh(k, new)), f"same address: {addr == new.data_ptr()}"


def test_no_grad_forward_is_the_same_bits_and_builds_no_graph():
    cached, _ = _pair(disable_stochastic_rounding=True)
    x = torch.randn(3, 20, 64, requires_grad=True)
    y = cached(x)
    with torch.no_grad():
        y0 = cached(x)
    with torch.inference_mode():
        yi = cached(x.detach())
    assert not y0.requires_grad and torch.equal(y0, y.detach()) and torch.equal(yi, y0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = cached(x)
        with torch.no_grad():
            yb0 = cached(x)
    assert yb0.dtype == torch.bfloat16 and torch.equal(yb0, yb.detach())


def test_weight_updates_are_seen_by_the_next_forward():
    """Micro-batches and optimizer steps: the quantized weight always comes from the current weight."""
    cached, _ = _pair(disable_stochastic_rounding=True)
    opt = torch.optim.SGD(cached.parameters(), lr=0.5)
    x = torch.randn(16, 64)
    for mode in ("step", "in_place", "eval"):
        before = cached(x).detach()
        if mode == "step":
            cached(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                cached.q.weight.mul_(-1.0)
        ctx = torch.no_grad() if mode == "eval" else torch.enable_grad()
        with ctx:
            after = cached(x).detach()
        ref = copy.deepcopy(cached)
        ref.nvfp4_state.operand_cache = None
        assert not torch.equal(before, after) and torch.equal(after, ref(x).detach())


def test_sr_hash_on_32_bit_lanes_equals_its_64_bit_definition():
    seeds = torch.tensor([0xFFFFFFF0, 0x89ABCDEF], dtype=torch.int64)  # high bits set: int32 wraps
    n = 4099
    idx = torch.arange(n, dtype=torch.int64)
    h = _random._mix32(((idx & 0xFFFFFFFF) + seeds[0]) & 0xFFFFFFFF)
    h = _random._mix32(h ^ seeds[1] ^ (idx >> 32))
    expect = (h >> 8).to(torch.float32) * (1.0 / 2**24)
    assert torch.equal(_random.hashed_uniform(seeds, (n,), torch.device("cpu")), expect)


def test_plan_without_cache_still_works():
    plan = GemmPlan.from_recipe(NVFP4Recipe(disable_stochastic_rounding=True))
    assert plan.cache is None
    x = torch.randn(16, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    dy = torch.randn(16, 16)
    y = quantized_linear(x, w, None, plan)
    y.backward(dy)
    # the three GEMMs against the numpy reference quantizer (1x16 blocks, 16x16 weight tiles, RHT on Wgrad)
    wq = _deq(w.detach(), (16, 16))
    _close(y.detach(), _deq(x.detach()) @ wq.T)
    _close(x.grad, _deq(dy) @ wq)
    _close(w.grad, _deq(dy.T.contiguous(), rht=True) @ _deq(x.detach().T.contiguous(), rht=True).T)


def _deq(t, tile=(1, 16), rht=False):
    codes, scale, amax = ref.nvfp4(t, tile=tile, rht=rht)
    return torch.from_numpy(ref.nvfp4_dequant(codes, scale, amax)).double()


def _close(a, b, tol=2e-5):
    err = (a.double() - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max err {err}"
