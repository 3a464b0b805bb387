"""The weight cache (issue 24): a weight's quantized operands are reused until the weight changes,
and never served stale, whatever way the weight changed. Each test compares the cached model with
a fresh quantization of the same weights (the cache switched off), bit for bit."""

import copy

import pytest
import torch
import torch.nn as nn

import hf_nvfp4
from hf_nvfp4.ops.cache import WeightCache


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _model(**recipe):
    torch.manual_seed(0)
    return hf_nvfp4.convert_model(Block(), hf_nvfp4.NVFP4Config(bf16_last_blocks=0, **recipe))


def _fresh(model, x):
    """The output with every weight quantized now (cache off), under no_grad."""
    st = model.nvfp4_state
    saved, st.weight_cache = st.weight_cache, None
    try:
        with torch.no_grad():
            return model(x)
    finally:
        st.weight_cache = saved


def _warm(model, x, n=3):
    """Forwards until the cache serves hits (hashed entries), so a stale hit would show."""
    cache = model.nvfp4_state.weight_cache
    hits = cache.hits
    with torch.no_grad():
        for _ in range(n):
            model(x)
    assert cache.hits > hits, "the cache never served a hit: the test would prove nothing"


def _check(model, x):
    misses = model.nvfp4_state.weight_cache.misses
    with torch.no_grad():
        y = model(x)
    assert model.nvfp4_state.weight_cache.misses > misses, "changed weights were served from the cache"
    assert torch.equal(y, _fresh(model, x))


X = torch.randn(8, 64)


def test_no_grad_forwards_reuse_the_weights_with_the_same_bits():
    m = _model()
    _warm(m, X)
    with torch.no_grad():
        assert torch.equal(m(X), _fresh(m, X))


@pytest.mark.parametrize("write", ["in_place", "data_copy", "data_assign", "data_inplace_op", "set_"])
def test_writes_to_the_weight_are_seen(write):
    m = _model()
    _warm(m, X)
    w = m.up.weight
    new = torch.randn_like(w)
    if write == "in_place":
        with torch.no_grad():
            w.mul_(-1.0)
    elif write == "data_copy":  # no version bump: what FSDP2's unshard does to its storage
        w.data.copy_(new)
    elif write == "data_assign":
        w.data = new
    elif write == "data_inplace_op":  # no version bump (PEFT's merge writes this way)
        w.data += 1e-3
    else:
        with torch.no_grad():
            w.set_(new)
    _check(m, X)


def test_fsdp2_refill_in_place_of_the_same_storage():
    """FSDP2 frees an unsharded weight's storage after the forward and refills it at the next
    unshard, bumping no version: simulated by a write into the same storage (same pointer, same
    version), which the content hash sees."""
    m = _model()
    _warm(m, X)
    w = m.up.weight
    ptr, version = w.data_ptr(), w._version
    w.data.copy_(w.detach() * 0.5)
    assert w.data_ptr() == ptr and w._version == version
    _check(m, X)


def test_sharding_wrappers_turn_the_cache_off():
    """FSDP (1 and 2) and ZeRO-3 manage the weights: the cache steps aside, by class name (FSDPModule)."""
    m = _model()
    FSDPModule = type("FSDPModule", (), {})  # stands in for torch.distributed.fsdp.FSDPModule
    m.up.__class__ = type("FSDPNVFP4Linear", (FSDPModule, type(m.up)), {})
    cache = m.nvfp4_state.weight_cache
    with torch.no_grad():
        for _ in range(3):
            m(X)
    assert not cache.enabled and cache.hits == 0


def test_load_state_dict_is_seen():
    m = _model()
    _warm(m, X)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    m.load_state_dict(other.state_dict())
    _check(m, X)
    _warm(m, X)
    m.load_state_dict(other.state_dict(), assign=True)
    _check(m, X)


def test_set_recipe_and_the_late_switch_are_seen():
    m = _model()
    _warm(m, X)
    hf_nvfp4.set_recipe(m, disable_2d_quantization=True)
    _check(m, X)
    _warm(m, X)
    hf_nvfp4.set_precision(m, "bf16")
    with torch.no_grad():
        assert torch.equal(m(X), _fresh(m, X))
    hf_nvfp4.set_precision(m, "nvfp4")
    _check(m, X)


@pytest.mark.parametrize("opt", ["sgd", "adamw_foreach", "adamw_forloop", "manual_data"])
def test_a_users_own_loop_without_the_plugin(opt):
    """optimizer.step() in a plain loop, no plugin and no hook: the weights' version counters
    (every torch optimizer writes in place) or the content hash see the update."""
    m = _model()
    params = list(m.parameters())
    if opt == "sgd":
        o = torch.optim.SGD(params, lr=0.1)
    elif opt.startswith("adamw"):
        o = torch.optim.AdamW(params, lr=0.01, foreach=opt.endswith("foreach"))
    for _step in range(4):
        for _ in range(2):  # two micro-batches: the second reuses the weights
            m(X).square().mean().backward()
        if opt == "manual_data":
            for p in params:
                p.data -= 0.1 * p.grad
                p.grad = None
        else:
            o.step()
            o.zero_grad()
        _check(m, X)


def test_optimizer_hook_invalidates_and_frees():
    m = _model()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    m.nvfp4_state.watch_optimizer(o)
    m.nvfp4_state.watch_optimizer(o)  # once per optimizer
    cache = m.nvfp4_state.weight_cache
    m(X).sum().backward()
    gen = cache.generation
    o.step()
    assert cache.generation == gen + 1
    assert all(not e.values for e in cache._entries.values())


def _train(cache_on: bool, steps: int = 30, accumulate: int = 2):
    torch.manual_seed(0)
    m = _model()  # SR on (the recipe's default)
    assert m.nvfp4_state.uses_stochastic()
    if not cache_on:
        m.nvfp4_state.weight_cache = None
    o = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        for _ in range(accumulate):
            x = torch.randn(16, 64, generator=g)
            loss = m(x).square().mean()
            loss.backward()
            losses.append(loss.detach())
        o.step()
        o.zero_grad()
        if step % 10 == 0:
            with torch.no_grad():
                losses.append(m(x).sum())
    return torch.stack(losses), [p.detach().clone() for p in m.parameters()], m


def test_thirty_steps_with_the_cache_equal_thirty_without_bit_for_bit():
    la, wa, ma = _train(True)
    lb, wb, _ = _train(False)
    assert ma.nvfp4_state.weight_cache.hits > 0
    assert torch.equal(la, lb)
    assert all(torch.equal(a, b) for a, b in zip(wa, wb, strict=True))


def test_copies_start_empty():
    m = _model()
    _warm(m, X)
    c = copy.deepcopy(m)
    assert isinstance(c.nvfp4_state.weight_cache, WeightCache) and not c.nvfp4_state.weight_cache._entries
    with torch.no_grad():
        assert torch.equal(c(X), m(X))


def test_inplace_on_the_layer_output_under_autograd():
    """Issue 23 item 8: out.add_() on a Linear's output (Llama 4's MoE block) must work."""
    layer = hf_nvfp4.NVFP4Linear(64, 32)
    h = torch.randn(2, 4, 64, requires_grad=True)
    out = layer(h)
    out.add_(1)
    out.sum().backward()
    assert h.grad is not None and layer.weight.grad is not None
    out2 = layer(h.reshape(8, 64))  # a 2-D input too
    out2.mul_(2)
    out2.sum().backward()


def test_run_summary_gives_throughput_with_and_without_the_first_step(caplog):
    """Issue 24: the runner says it compiles before the first step and reports both rates."""
    import logging
    from types import SimpleNamespace

    from hf_nvfp4.train import _step_timer, format_summary

    timer = _step_timer()
    m = _model()
    state = SimpleNamespace(is_world_process_zero=True)
    logging.getLogger("hf_nvfp4").setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_nvfp4"):
            timer.on_train_begin(None, state, None, model=m)
    finally:
        logging.getLogger("hf_nvfp4").setLevel(logging.ERROR)
    assert "compiling NVFP4 kernels (once per shape, cached on disk)" in caplog.text
    gen = m.nvfp4_state.weight_cache.generation
    timer.on_optimizer_step(None, state, None, model=m)
    assert m.nvfp4_state.weight_cache.generation == gen + 1
    for _ in range(3):
        timer.on_step_end(None, state, None)
    assert timer.first_step_seconds is not None and timer.first_step_seconds >= 0
    rate = timer.rate_after_first(300, 3)
    assert rate is not None and rate > 0 and timer.rate_after_first(100, 1) is None
    s = {"recipe": "r", "steps": 3, "world_size": 1, "first_loss": 2.0, "final_loss": 1.0, "tokens_per_s": 10.0,
         "tokens": 300, "seconds": 30.0, "checkpoint": "/x", "logs": None, "first_step_seconds": 12.0,
         "tokens_per_s_after_first_step": 16.7}
    assert "17 tokens/s after the first step (12 s, compiling)" in format_summary(s)


def test_a_plain_training_step_hashes_nothing_and_accumulation_hits(monkeypatch):
    """Inside the autograd Function grad mode is off: that must not read as an evaluation forward
    (which hashes every weight, a read pass a plain step would pay for nothing). With two
    micro-batches the weights are reused, so from the next step on the first micro-batch hashes and
    the second is served from the cache."""
    from hf_nvfp4.ops import cache as cache_mod

    calls = []
    real = cache_mod.fingerprint
    monkeypatch.setattr(cache_mod, "fingerprint", lambda t: calls.append(1) or real(t))
    m = _model()
    cache = m.nvfp4_state.weight_cache
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        m(X).square().mean().backward()
        o.step()
        o.zero_grad()
    assert calls == [] and cache.hits == 0
    for _step in range(3):
        hits = cache.hits
        for _ in range(2):
            m(X).square().mean().backward()
        o.step()
        o.zero_grad()
    assert cache.hits - hits == 2, "the second micro-batch re-quantized both weights"
    _check(m, X)


def test_the_second_no_grad_forward_after_a_change_is_served():
    """An evaluation forward hashes the weights it quantizes, so the next one (the next eval batch,
    the next generate() token) is served from the cache at once, not re-quantized first."""
    m = _model()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    m(X).square().mean().backward()
    o.step()
    cache = m.nvfp4_state.weight_cache
    with torch.no_grad():
        m(X)
        hits = cache.hits
        y = m(X)
    assert cache.hits == hits + 2, "the second evaluation forward re-quantized the weights"
    assert torch.equal(y, _fresh(m, X))
