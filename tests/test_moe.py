"""Mixture-of-experts: expert GEMMs in NVFP4 through transformers' experts interface (issue 17)."""

import copy
import logging

import pytest
import torch
import torch.nn as nn
from models import tiny_moe
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, fake_quantize_nvfp4
from hf_nvfp4.config import NVFP4Recipe
from hf_nvfp4.nn import plan_conversion
from hf_nvfp4.ops import GemmPlan, quantized_linear

ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
ALL_NVFP4 = NVFP4Config(bf16_last_blocks=0)


def experts_modules(model):
    return [m for m in model.modules() if getattr(m, "nvfp4_experts", None) is not None]


def routing(mod, tokens=40, seed=1):
    """Fixed inputs and routing; the last expert receives no token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, mod.down_proj.shape[2 if mod.is_transposed else 1], generator=g) * 2
    idx = torch.randint(0, mod.num_experts - 1, (tokens, 2), generator=g)
    return x, idx, torch.rand(tokens, 2, generator=g)


def weights(mod, e):
    """Expert e's two [N, K] weights and biases, read from the module's 3-D parameters."""
    up = mod.gate_up_proj if mod.has_gate else mod.up_proj
    w1, w2 = (up[e].t(), mod.down_proj[e].t()) if mod.is_transposed else (up[e], mod.down_proj[e])
    b1 = (mod.gate_up_proj_bias if mod.has_gate else mod.up_proj_bias)[e] if mod.has_bias else None
    b2 = mod.down_proj_bias[e] if mod.has_bias else None
    return w1, b1, w2, b2


def gate(mod, h):
    return mod._apply_gate(h) if mod.has_gate else mod.act_fn(h)


def reference_forward(mod, x, idx, w, amax=None):
    """Independent per-expert NVFP4: quantize per expert, GEMM, gate, quantize, GEMM, routing weight."""
    out = torch.zeros(x.shape[0], x.shape[1])
    for e in range(mod.num_experts):
        tok, pos = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        w1, b1, w2, b2 = (t.detach() if t is not None else None for t in weights(mod, e))
        h = fake_quantize_nvfp4(x[tok], amax=amax) @ fake_quantize_nvfp4(w1, tile=(16, 16)).t()
        h = gate(mod, h if b1 is None else h + b1)
        y = fake_quantize_nvfp4(h) @ fake_quantize_nvfp4(w2, tile=(16, 16)).t()
        y = y if b2 is None else y + b2
        out.index_add_(0, tok, y * w[tok, pos, None])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_coverage_conversion_and_state_dict(arch):
    model = tiny_moe(arch)
    before = copy.deepcopy(model.state_dict())
    assert hf_nvfp4.coverage(model).weight_share == 0.0
    hf_nvfp4.convert_model(model, ALL_NVFP4)
    cov = hf_nvfp4.coverage(model)
    assert cov.weight_share >= 0.95 and cov.flop_share >= 0.95, cov.summary()
    assert any(e.kind == "experts" for e in cov.entries)
    assert not any("gate" == e.name.split(".")[-1] or "router" in e.name for e in cov.entries)  # routers excluded
    mods = experts_modules(model)
    assert mods and all(m.nvfp4_experts.converted for m in mods)
    assert model.config._experts_implementation == "hf_nvfp4" and "hf_nvfp4" in ALL_EXPERTS_FUNCTIONS
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("arch", ARCHS + ["nemotron_h_moe"])
def test_expert_forward_equals_per_expert_nvfp4(arch, monkeypatch):
    model = hf_nvfp4.convert_model(tiny_moe(arch, layers=3 if arch == "nemotron_h_moe" else 2), ALL_NVFP4)
    mod = experts_modules(model)[-1]
    x, idx, w = routing(mod)
    calls = []
    import hf_nvfp4.ops.experts as ops_experts

    def counting(*args):
        calls.append(args[1].shape)
        return quantized_linear(*args)

    monkeypatch.setattr(ops_experts, "quantized_linear", counting)
    with torch.no_grad():
        ours = mod(x, idx, w)
        ref = reference_forward(mod, x, idx, w)
        one_scale = reference_forward(mod, x, idx, w, amax=x.abs().max())  # one tensor scale for all experts
        mod.config._experts_implementation = mod.nvfp4_experts.fallback
        high = mod(x, idx, w)
        mod.config._experts_implementation = "hf_nvfp4"
    err = (ours - ref).abs().max()
    assert err <= 1e-6 * ref.abs().max()
    assert (ours - one_scale).abs().max() > 100 * err  # the per-expert tensor scale is what is computed
    assert (ours - high).abs().max() > 100 * err
    assert len(calls) == 2 * len(idx.unique())  # the expert with no tokens costs nothing


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_weight_grads_match_per_expert_linear(arch):
    model = hf_nvfp4.convert_model(tiny_moe(arch), ALL_NVFP4)
    mod = experts_modules(model)[-1]
    x, idx, w = routing(mod, seed=2)
    dy = torch.randn(x.shape[0], x.shape[1], generator=torch.Generator().manual_seed(3))
    params = dict(mod.named_parameters())

    def run_module(seed):
        mod.zero_grad(set_to_none=True)
        mod.nvfp4_experts.state.generator(x.device).manual_seed(seed)
        xg = x.clone().requires_grad_()
        mod(xg, idx, w).backward(dy)
        return {n: p.grad.clone() for n, p in params.items()}, xg.grad

    grads, dx = run_module(7)
    # Reference: the emulated NVFP4 linear applied per expert, leaf weights, the same SR stream.
    gen = torch.Generator().manual_seed(7)
    plan = GemmPlan.from_recipe(NVFP4Recipe(), generator=gen)
    xg = x.clone().requires_grad_()
    out, leaves = torch.zeros_like(x), {}
    for e in range(mod.num_experts):
        tok, pos = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        leaves[e] = [t.detach().clone().requires_grad_() if t is not None else None for t in weights(mod, e)]
        w1, b1, w2, b2 = leaves[e]
        y = quantized_linear(gate(mod, quantized_linear(xg[tok], w1, b1, plan)), w2, b2, plan)
        out = out.index_add(0, tok, y * w[tok, pos, None])
    out.backward(dy)
    up_name = "gate_up_proj" if mod.has_gate else "up_proj"
    for e in range(mod.num_experts):
        g1, g2 = grads[up_name][e], grads["down_proj"][e]
        if mod.is_transposed:
            g1, g2 = g1.t(), g2.t()
        if e not in leaves:
            assert not g1.any() and not g2.any()
            continue
        torch.testing.assert_close(g1, leaves[e][0].grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g2, leaves[e][2].grad, rtol=1e-5, atol=1e-7)
        if mod.has_bias:
            torch.testing.assert_close(grads[up_name + "_bias"][e], leaves[e][1].grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx, xg.grad, rtol=1e-5, atol=1e-7)
    other, _ = run_module(8)  # stochastic rounding is on: another stream gives other gradients
    assert not torch.equal(other["down_proj"], grads["down_proj"])


@pytest.mark.parametrize("arch", ARCHS + ["nemotron_h_moe"])
def test_training_steps_loss_decreases(arch):
    model = hf_nvfp4.convert_model(tiny_moe(arch, layers=3 if arch == "nemotron_h_moe" else 2), ALL_NVFP4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    start = [m.down_proj.detach().clone() for m in experts_modules(model)]
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses
    assert all(not torch.equal(m.down_proj, s) for m, s in zip(experts_modules(model), start, strict=True))


def test_resume_replays_expert_training_exactly():
    """Weights, optimizer, the model's NVFP4 state and torch's generator (which seeds the SR stream at
    every training forward, and which Trainer checkpoints) restored -> the same losses, bit for bit."""
    model = hf_nvfp4.convert_model(tiny_moe("qwen3_moe"), ALL_NVFP4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def steps(n):
        out = []
        for _ in range(n):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    steps(2)
    ckpt = copy.deepcopy((model.state_dict(), opt.state_dict(), model.nvfp4_state.state_dict()))
    rng = torch.random.get_rng_state()
    first = steps(2)
    model.load_state_dict(ckpt[0])
    opt.load_state_dict(ckpt[1])
    model.nvfp4_state.load_state_dict(ckpt[2])
    torch.random.set_rng_state(rng)
    assert steps(2) == first


def _coverage_records(caplog):
    return [r for r in caplog.records if "hf_nvfp4 coverage:" in r.getMessage()]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_save_reload_keeps_converted_experts(arch, tmp_path, caplog):
    model = tiny_moe(arch)
    with caplog.at_level(logging.INFO, logger="hf_nvfp4"):
        model = hf_nvfp4.from_config(model.config, ALL_NVFP4)
        assert len(_coverage_records(caplog)) == 1
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        caplog.clear()
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert len(_coverage_records(caplog)) == 1  # from_pretrained converts (and reports) too
    assert loaded.config._experts_implementation == "hf_nvfp4"
    assert all(m.nvfp4_experts.converted for m in experts_modules(loaded)) and experts_modules(loaded)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_coverage_report_and_loud_warning(caplog):
    model = tiny_moe("mixtral")
    with caplog.at_level(logging.INFO, logger="hf_nvfp4"):
        hf_nvfp4.convert_model(model, NVFP4Config(bf16_last_blocks=0, modules_to_not_convert=["*.experts"]))
    (rec,) = _coverage_records(caplog)
    assert rec.levelno == logging.WARNING and "MOST MATMUL WEIGHTS" in rec.getMessage()
    cov = hf_nvfp4.coverage(model)
    assert cov.weight_share < 0.2 and "pattern (modules_to_not_convert)" in cov.high_precision()
    assert model.config._experts_implementation == "grouped_mm"  # nothing converted: not switched
    d = cov.to_dict()
    assert d["weights_total"] == sum(e["weights"] for e in d["entries"]) and d["flop_share"] < 0.5


def test_layer_selection_late_switch_and_unconvert():
    base = tiny_moe("qwen3_moe", layers=3)
    model = hf_nvfp4.convert_model(copy.deepcopy(base), NVFP4Config(bf16_first_blocks=1, bf16_last_blocks=1))
    plan = plan_conversion(model, model.nvfp4_state.recipe)
    assert plan["model.layers.0.mlp.experts"] == "bf16 block" and plan["model.layers.1.mlp.experts"] == "convert"
    assert plan["model.layers.2.mlp.experts"] == "bf16 block"
    assert "kept block (bf16)" in hf_nvfp4.coverage(model).high_precision()
    x, idx, w = routing(model.model.layers[0].mlp.experts)
    with torch.no_grad():  # a kept block runs the model's own implementation, bit for bit
        assert torch.equal(model.model.layers[0].mlp.experts(x, idx, w), base.model.layers[0].mlp.experts(x, idx, w))
        converted = model.model.layers[1].mlp.experts(x, idx, w)
        assert not torch.equal(converted, base.model.layers[1].mlp.experts(x, idx, w))
    ids = torch.randint(0, 256, (2, 16))
    assert hf_nvfp4.set_precision(model, "bf16") == 5  # q, k, v, o of block 1 and its experts
    assert hf_nvfp4.coverage(model).weight_share == 0.0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    hf_nvfp4.set_precision(model, "bf16", scope="forward")
    hf_nvfp4.set_precision(model, "nvfp4")
    with torch.no_grad():
        assert torch.equal(model.model.layers[1].mlp.experts(x, idx, w), converted)
    model.set_experts_implementation("eager")  # the user leaves the NVFP4 implementation: coverage says so
    assert "experts implementation switched to 'eager'" in hf_nvfp4.coverage(model).high_precision()
    model.set_experts_implementation("hf_nvfp4")
    hf_nvfp4.unconvert_model(model)
    assert model.config._experts_implementation == "grouped_mm" and not experts_modules(model)


def test_comparison_format_runs_experts_in_that_format():
    base = tiny_moe("mixtral")
    outs = {}
    for fmt in ("nvfp4", "mxfp4", "fp8_block"):
        model = hf_nvfp4.convert_model(copy.deepcopy(base), NVFP4Recipe.for_format(fmt, bf16_last_blocks=0))
        mod = experts_modules(model)[0]
        assert mod.nvfp4_experts.precision == fmt and hf_nvfp4.coverage(model).format == fmt
        x, idx, w = routing(mod)
        with torch.no_grad():
            outs[fmt] = mod(x, idx, w)
    with torch.no_grad():
        outs["bf16"] = base.model.layers[0].mlp.experts(x, idx, w)
    err = {f: (outs[f] - outs["bf16"]).abs().max().item() for f in ("nvfp4", "mxfp4", "fp8_block")}
    assert err["fp8_block"] < err["nvfp4"] and all(v > 0 for v in err.values())


class _ToyConfig(PretrainedConfig):
    model_type = "toy_moe"


@use_experts_implementation(is_transposed=True, has_bias=True, has_gate=False)
class _ToyExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = 4
        self.up_proj = nn.Parameter(torch.randn(4, 32, 48) / 6)
        self.up_proj_bias = nn.Parameter(torch.randn(4, 48) / 10)
        self.down_proj = nn.Parameter(torch.randn(4, 48, 32) / 7)
        self.down_proj_bias = nn.Parameter(torch.randn(4, 32) / 10)
        self.act_fn = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):  # eager: one expert at a time
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            tok, pos = torch.where(top_k_index == e)
            h = self.act_fn(hidden_states[tok] @ self.up_proj[e] + self.up_proj_bias[e])
            y = (h @ self.down_proj[e] + self.down_proj_bias[e]) * top_k_weights[tok, pos, None]
            out = out.index_add(0, tok, y)
        return out


class _OutsideInterface(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 32, 32))


def test_no_gate_toy_router_refusals_and_odd_shapes():
    cfg = _ToyConfig()
    cfg._experts_implementation = "eager"
    block = nn.ModuleDict(
        {"experts": _ToyExperts(cfg), "gate": nn.Linear(32, 4), "proj": nn.Linear(32, 32), "odd": _OutsideInterface()}
    )
    before = copy.deepcopy(block)
    plan = plan_conversion(block, ALL_NVFP4)
    assert plan["gate"] == "router" and plan["experts"] == "convert" and plan["proj"] == "convert"
    assert plan["odd"].startswith("unsupported module type (_OutsideInterface")
    hf_nvfp4.convert_model(block, ALL_NVFP4)
    assert type(block["gate"]) is nn.Linear and cfg._experts_implementation == "hf_nvfp4"
    cov = hf_nvfp4.coverage(block)
    assert [e.name for e in cov.entries] == ["experts", "proj", "odd"]
    mod = block["experts"]
    x, idx, w = routing(mod)
    with torch.no_grad():
        ref = reference_forward(mod, x, idx, w)
        assert (mod(x, idx, w) - ref).abs().max() <= 1e-6 * ref.abs().max()
        hf_nvfp4.set_precision(block, "bf16")  # falls back to the previous ("eager") implementation
        assert torch.equal(mod(x, idx, w), before["experts"](x, idx, w))
    nested = nn.ModuleDict({"experts": _ToyExperts(cfg), "router": nn.ModuleDict({"gate": nn.Linear(32, 4)})})
    assert plan_conversion(nested, ALL_NVFP4)["router.gate"] == "router"  # AFMoE's layout
    odd = tiny_moe("qwen3_moe", moe_intermediate_size=24)
    plan = plan_conversion(odd, ALL_NVFP4)
    assert plan["model.layers.0.mlp.experts"] == "shape 64x24 not divisible by 16"


def _tiny_adapted(arch):
    """Tiny JetMoE / Llama 4 text models: expert modules outside transformers' experts interface."""
    from transformers import JetMoeConfig, Llama4TextConfig

    torch.manual_seed(0)
    if arch == "jetmoe":
        cfg = JetMoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                           intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = Llama4TextConfig(vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1)
    return AutoModelForCausalLM.from_config(cfg)


# Llama 4 adds in place to the shared expert's output (out.add_(...)): every Linear is converted,
# so the training step below also checks that a converted layer's output takes in-place ops.
ADAPTED = {"jetmoe": (NVFP4Config(bf16_last_blocks=0), "JetMoeParallelExperts", 1.0),
           "llama4": (NVFP4Config(bf16_last_blocks=0), "Llama4TextExperts", 1.0)}


@pytest.mark.parametrize("arch", list(ADAPTED))
def test_adapters_bring_jetmoe_and_llama4_experts_into_nvfp4(arch, caplog):
    recipe, cls, share = ADAPTED[arch]
    model = _tiny_adapted(arch)
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="hf_nvfp4"):
        hf_nvfp4.convert_model(model, recipe)
    cov = hf_nvfp4.coverage(model)
    assert cov.weight_share >= share and f"Experts through hf_nvfp4's own adapter ({cls})" in cov.summary()
    mods = [m for m in model.modules() if type(m).__name__ == cls]
    assert mods and all(m.nvfp4_experts.converted and m.nvfp4_experts.adapter == cls for m in mods)
    assert {e.via for e in cov.entries if e.kind == "experts"} == {f"adapter ({cls})"}
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    mod = mods[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the adapter's GEMMs are per-expert NVFP4 GEMMs, and differ from the BF16 forward
        if arch == "jetmoe":
            sizes = [5, 0, 7, 4]
            x = torch.randn(sum(sizes), mod.input_size, generator=g)
            ours = mod(x, sizes)
            ref = torch.cat([fake_quantize_nvfp4(xe) @ fake_quantize_nvfp4(mod.weight[e], tile=(16, 16)).t()
                             for e, xe in enumerate(x.split(sizes)) if sizes[e]])
            high = type(mod).forward(mod, x, sizes)
        else:
            x = torch.randn(mod.num_experts * 6, mod.hidden_size, generator=g)
            ours = mod(x)
            outs = []
            for e, xe in enumerate(x.view(mod.num_experts, 6, -1)):
                h = fake_quantize_nvfp4(xe) @ fake_quantize_nvfp4(mod.gate_up_proj[e].t(), tile=(16, 16)).t()
                gate, up = h.chunk(2, dim=-1)
                h = up * mod.act_fn(gate)
                outs.append(fake_quantize_nvfp4(h) @ fake_quantize_nvfp4(mod.down_proj[e].t(), tile=(16, 16)).t())
            ref, high = torch.cat(outs), type(mod).forward(mod, x)
    err = (ours - ref).abs().max()
    assert err <= 1e-6 * ref.abs().max() and (ours - high).abs().max() > 100 * err
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # trains: the 3-D expert weights get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in mods for p in m.parameters())
    hf_nvfp4.set_precision(model, "bf16")  # the late switch reaches the adapters too
    with torch.no_grad():
        assert torch.equal(mod(x, sizes) if arch == "jetmoe" else mod(x), high)
    hf_nvfp4.unconvert_model(model)
    assert all("forward" not in m.__dict__ and "nvfp4_experts" not in m.__dict__ for m in mods)


def test_experts_ask_the_same_plan_as_linears():
    """One plan code for Linears and experts: the same role table, SR generator and operand cache."""
    model = hf_nvfp4.convert_model(tiny_moe("qwen3_moe"), ALL_NVFP4)
    rec = experts_modules(model)[0].nvfp4_experts
    lin = next(m for m in model.modules() if isinstance(m, hf_nvfp4.NVFP4Linear))
    a, b = rec.plan(torch.device("cpu")), lin.plan(torch.device("cpu"))
    assert a.roles == b.roles and a.generator is b.generator
    assert a.cache is b.cache is model.nvfp4_state.operand_cache and a.weight_amax is None
