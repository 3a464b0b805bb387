"""Issue 16: faithful baselines (asserted on converted layers), t-intervals, recipe diagnostics."""

import math
from pathlib import Path

import pytest
import torch
from models import tiny
from transformers import TrainingArguments

import hf_nvfp4
from hf_nvfp4 import FP8ShadowCallback, NVFP4Config, NVFP4Linear, NVFP4Recipe
from hf_nvfp4.config import paper_fp8_bf16_blocks
from hf_nvfp4.integrations.shadow_run import ShadowRun
from hf_nvfp4.nn.te_backend import te_unsupported_reason
from hf_nvfp4.ops import role_table
from hf_nvfp4.recipe import load_recipe
from hf_nvfp4.science.ablate import fingerprint, variant_nvfp4, variant_recipe, write_markdown
from hf_nvfp4.science.diagnose import (
    MECHANISMS,
    TENSORS,
    bias_interval,
    capture,
    layer_metrics,
    outlier_stats,
    quant_health,
    target_layers,
)
from hf_nvfp4.science.stats import paired_summary, t_quantile


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def _blocks_converted(model):
    return [any(isinstance(m, NVFP4Linear) for m in b.modules()) for b in model.model.layers]


# -- baselines, as the docs say ------------------------------------------------------------------------
def test_fp8_baseline_is_the_papers_share_of_blocks_and_mxfp4_is_the_papers():
    assert paper_fp8_bf16_blocks(62) == (1, 2)  # the paper's 12B model
    assert paper_fp8_bf16_blocks(124) == (2, 4) and paper_fp8_bf16_blocks(4) == (0, 0)
    base = load_recipe("ablation-cpu", ["model.config.num_hidden_layers=4"])
    cfg = {v: variant_nvfp4(base, v) for v in ("nvfp4", "fp8", "fp8_nvfp4_alloc", "mxfp4", "base")}
    models = {v: hf_nvfp4.from_config(tiny("llama", 4).config, c) for v, c in cfg.items()}
    assert _blocks_converted(models["nvfp4"]) == [True, True, True, False]  # recipe: last block BF16
    assert _blocks_converted(models["fp8"]) == [True] * 4  # 1+2 of 62 as a share of 4 blocks: none
    assert _blocks_converted(models["fp8_nvfp4_alloc"]) == _blocks_converted(models["nvfp4"])
    assert _blocks_converted(models["mxfp4"]) == _blocks_converted(models["nvfp4"])
    assert _blocks_converted(models["base"]) == [True] * 4
    for v, model in models.items():
        layers = _layers(model)
        assert layers
        for layer in layers.values():
            roles = layer.plan(torch.device("cpu")).roles
            if v.startswith("fp8"):
                assert {s.format for s in roles.values()} == {"fp8_block"}
                assert roles["fprop_weight"].tile == (128, 128) and roles["fprop_input"].tile == (1, 128)
                assert not any(s.rht or s.stochastic for s in roles.values())
            elif v == "mxfp4":
                assert {s.format for s in roles.values()} == {"mxfp4"}
                assert roles["fprop_input"].tile == (1, 32) and roles["fprop_weight"].tile == (32, 32)
                assert roles["dgrad_weight"].tile == (32, 32)
                assert [r for r, s in roles.items() if s.rht] == ["wgrad_grad_output", "wgrad_input"]
                assert {s.rht_size for s in roles.values()} == {32}
                assert [r for r, s in roles.items() if s.stochastic] == ["dgrad_grad_output", "wgrad_grad_output"]
            elif v == "base":
                assert not any(s.rht or s.stochastic for s in roles.values())
                assert roles["fprop_weight"].tile == (1, 16)
            else:
                assert roles["fprop_weight"].tile == (16, 16) and roles["wgrad_input"].rht
                assert roles["wgrad_input"].rht_size == 16
    # an MXFP4 layer really computes with a 32-point RHT: its Wgrad differs from a 16-point one
    x = torch.randn(64, 64)
    dy = torch.randn(64, 32)
    grads = []
    for size in (32, 16):
        layer = NVFP4Linear(64, 32, config=NVFP4Config(format="mxfp4", rht_size=size, disable_stochastic_rounding=True))
        torch.manual_seed(0)
        layer.reset_parameters()
        layer(x).backward(dy)
        grads.append(layer.weight.grad)
    assert not torch.equal(grads[0], grads[1])


def test_negative_controls_and_switch_scopes_in_the_role_table():
    base = load_recipe("ablation-cpu")
    sr = role_table(variant_nvfp4(base, "sr_forward").to_recipe())
    assert sr["fprop_input"].stochastic and sr["fprop_weight"].stochastic and not sr["wgrad_input"].stochastic
    rht = role_table(variant_nvfp4(base, "rht_all").to_recipe())
    assert all(s.rht for s in rht.values()) and rht["fprop_weight"].tile == (1, 16)
    with pytest.raises(ValueError, match="rht_gemms"):
        NVFP4Recipe(rht_gemms=("attention",))
    # TE has no such placement: a negative control always runs emulated
    assert te_unsupported_reason(NVFP4Recipe()) is None
    assert "negative control" in te_unsupported_reason(NVFP4Recipe(rht_gemms=("fprop", "wgrad")))
    assert "negative control" in te_unsupported_reason(variant_nvfp4(base, "sr_forward"))
    assert te_unsupported_reason(NVFP4Recipe(rht_gemms=("fprop",), disable_rht=True)) is None
    # a negative control computes a correct product: the RHT cancels in every GEMM. Checked against
    # the numpy reference: both operands transformed along the GEMM's inner dim, 1x16 weight blocks
    import reference

    def deq(t):
        codes, scale, amax = reference.nvfp4(t.detach().contiguous(), rht=True)
        return torch.from_numpy(reference.nvfp4_dequant(codes, scale, amax)).double()

    torch.manual_seed(0)
    layer = NVFP4Linear(64, 48, config=NVFP4Config(rht_gemms=["fprop", "dgrad", "wgrad"],
                                                  disable_stochastic_rounding=True))
    x = torch.randn(128, 64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.weight
    want = (deq(x) @ deq(w).T + layer.bias.detach().double(), deq(g) @ deq(w.T).T, deq(g.T) @ deq(x.T).T)
    for got, ref in zip((y, x.grad, layer.weight.grad), want, strict=True):
        assert (got.detach().double() - ref).abs().max() <= 2e-5 * ref.abs().max()
    for v, scope in (("switch_all", "all"), ("switch_fwd", "forward"), ("switch_bwd", "backward")):
        assert variant_recipe(base, v, 0, Path("/tmp")).precision_switch.scope == scope
    m = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0))
    hf_nvfp4.set_precision(m, "bf16", scope="backward")
    plan = next(iter(_layers(m).values())).plan(torch.device("cpu"))
    assert plan.roles["fprop_input"].format == "nvfp4" and plan.roles["wgrad_input"].format == "bf16"
    assert fingerprint(variant_recipe(base, "nvfp4", 0, Path("/a"))) == fingerprint(
        variant_recipe(base, "nvfp4", 0, Path("/b")))
    assert fingerprint(variant_recipe(base, "nvfp4", 0, Path("/a"))) != fingerprint(
        variant_recipe(base, "no_rht", 0, Path("/a")))


def test_shadow_allocation_paper_share_or_nvfp4():
    model = hf_nvfp4.from_config(tiny("llama", 4).config, NVFP4Config(bf16_last_blocks=1))
    names = [n for n, _ in model.named_parameters()]
    for alloc, want in (("paper", [True] * 4), ("nvfp4", [True, True, True, False])):
        shadow = ShadowRun("fp8_block", allocation=alloc).build(model, [{"names": names, "lr": 1e-3}])
        assert _blocks_converted(shadow) == want
        assert {m.recipe.format for m in _layers(shadow).values()} == {"fp8_block"}
    explicit = ShadowRun("fp8_block", bf16_first_blocks=1, bf16_last_blocks=2).build(model, [{"names": names}])
    assert _blocks_converted(explicit) == [False, True, False, False]
    with pytest.raises(ValueError, match="allocation"):
        FP8ShadowCallback(allocation="half")


# -- statistics ---------------------------------------------------------------------------------------
def test_t_intervals_and_resolution():
    assert abs(t_quantile(0.975, 2) - 4.302653) < 1e-5 and abs(t_quantile(0.975, 4) - 2.776445) < 1e-5
    assert abs(t_quantile(0.995, 1) - 63.656741) < 1e-4
    s = paired_summary([-0.0108 - 0.003, -0.0108, -0.0108 + 0.003])  # sd 0.003, n 3
    assert s["resolved"] and abs(s["hi"] - (-0.0108 + 4.302653 * 0.003 / math.sqrt(3))) < 1e-9
    noisy = paired_summary([0.03, -0.01, 0.02])  # mean/se = 1.4 < 4.30: not resolved at n = 3
    assert not noisy["resolved"] and noisy["lo"] < 0 < noisy["hi"]
    assert not paired_summary([0.5])["resolved"]


def test_write_markdown_keeps_what_a_person_wrote(tmp_path):
    md = tmp_path / "ablation.md"
    write_markdown(md, "table v1")
    md.write_text("# Reading\n\nmine\n\n" + md.read_text() + "\nmore of mine\n")
    write_markdown(md, "table v2")
    text = md.read_text()
    assert "mine" in text and "more of mine" in text and "table v2" in text and "table v1" not in text
    other = tmp_path / "notes.md"
    other.write_text("# My notes\n")
    with pytest.raises(ValueError, match="not written by hf-nvfp4 ablate"):
        write_markdown(other, "x")


# -- diagnostics on synthetic tensors with a known answer ----------------------------------------------
def test_sr_removes_the_gradient_bias_that_nearest_rounding_has():
    # each 16-block is [6, 1.2 x 15]: the scale is exact (amax 6), 1.2 lies between 1 and 1.5
    g = torch.full((64, 16), 1.2)
    g[:, 0] = 6.0
    rn = hf_nvfp4.fake_quantize_nvfp4(g)
    assert torch.all(rn[:, 1:] == 1.0)  # nearest: every 1.2 -> 1.0, a 17% bias
    gens = [torch.Generator().manual_seed(k) for k in range(32)]
    draws = [hf_nvfp4.fake_quantize_nvfp4(g, stochastic=True, generator=gk) for gk in gens]
    exact_bias = float((rn - g).norm() / g.norm())
    b_rn, lo_rn, hi_rn = bias_interval([rn] * 3, g)
    assert abs(b_rn - exact_bias) < 1e-6 and abs(lo_rn - hi_rn) < 1e-9
    b, lo, hi = bias_interval(draws, g)
    assert lo == 0.0 and hi < 0.2 * exact_bias  # unbiased: the interval reaches 0, far below RN's bias
    # the same through the per-layer diagnostics, on a gradient whose rounding is biased
    x = torch.randn(64, 32)
    w = torch.randn(16, 32) * 0.1
    out = layer_metrics(x, w, g, NVFP4Recipe(), draws=16)
    assert out["dgrad_bias_sr_hi"] < 0.2 * out["dgrad_bias_rn"]


def test_rht_spreads_an_outlier_over_its_block():
    t = torch.zeros(8, 64)
    t[:, ::16] = 5.0  # one spike per 16-block: max/rms = 4, row kurtosis = 16
    k0, c0 = outlier_stats(t, 16)
    assert abs(c0 - 4.0) < 1e-5 and abs(k0 - 16.0) < 1e-4
    k1, c1 = outlier_stats(hf_nvfp4.hadamard_transform(t, 16), 16)
    assert abs(c1 - 1.0) < 1e-5 and abs(k1 - 1.0) < 1e-4  # flat after the transform
    # the per-layer diagnostics see the same on a Wgrad operand with one outlier per block along M
    torch.manual_seed(0)
    x = torch.randn(256, 32) * 0.05
    x[::16] = 8.0 * torch.sign(torch.randn(16, 32))
    out = layer_metrics(x, torch.randn(16, 32), torch.randn(256, 16), NVFP4Recipe(), draws=4)
    assert out["wgrad_act_crest"] > 3.5 and out["wgrad_act_crest_rht"] < 1.5
    assert out["wgrad_act_kurtosis"] > 10 and out["wgrad_act_kurtosis_rht"] < 2
    assert out["wgrad_act_underflow"] < 0.2  # before RHT the spike's scale zeroes most of its block:
    assert quant_health(x.t(), role_table(NVFP4Recipe(disable_rht=True))["wgrad_input"])[0] > 0.5


def test_underflow_and_saturation_rates_are_exact():
    spec = role_table(NVFP4Recipe())["fprop_input"]
    t = torch.zeros(1, 32)
    t[0, 0], t[0, 1] = 6.0, 0.01  # block 1: amax 6 sets an exact scale; 0.01 < 0.25 quantizes to 0
    t[0, 16], t[0, 17] = 5.7, 1.0  # block 2: 5.7 * 448/6 = 425.6 -> E4M3 416 (rounded down): 5.7 clamps
    under, sat = quant_health(t, spec)
    assert abs(under - 1 / 4) < 1e-9 and abs(sat - 1 / 32) < 1e-9
    mx = role_table(NVFP4Recipe(format="mxfp4", rht_size=32))["fprop_input"]
    assert quant_health(torch.randn(64, 64), mx)[1] == 0.0  # UE8M0 rounded up never clamps


# -- diagnose on a tiny model -----------------------------------------------------------------------------
def test_diagnose_returns_every_metric_for_every_layer_and_gemm():
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(tiny("llama", 3).config, NVFP4Config(bf16_last_blocks=1))
    batch = {"input_ids": torch.randint(0, 256, (2, 32))}
    before = torch.get_rng_state()
    rep = hf_nvfp4.diagnose(model, batch, draws=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters()) and model.training  # untouched, restored
    names = [n for n, _, _ in target_layers(model)]
    assert [r["name"] for r in rep["layers"]] == names and len(names) == 3 * 7
    assert sum(r["converted"] for r in rep["layers"]) == 2 * 7  # the BF16 block is diagnosed too
    keys = [f"{g}_relerr{s}" for g in ("fprop", "dgrad", "wgrad") for s in ("", "_bf16")]
    keys += [f"{g}_bias_{k}" for g in ("dgrad", "wgrad") for k in ("rn", "sr", "sr_lo", "sr_hi")]
    keys += ["wgrad_relerr_rht", "wgrad_relerr_no_rht", "weight_mismatch_1d", "weight_mismatch_2d",
             "weight_err_1d", "weight_err_2d"]
    keys += [f"{t}_{k}{r}" for t in ("wgrad_grad", "wgrad_act") for k in ("kurtosis", "crest") for r in ("", "_rht")]
    keys += [f"{t}_{k}" for t in TENSORS for k in ("underflow", "saturation")]
    for r in rep["layers"]:
        for k in keys:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r["name"], k, r.get(k))
        assert r["fprop_relerr_bf16"] < r["fprop_relerr"]  # values: checked by hand below
        assert r["weight_mismatch_2d"] == 0.0 < r["weight_mismatch_1d"]
        assert r["wgrad_bias_sr_lo"] <= r["wgrad_bias_sr"] <= r["wgrad_bias_sr_hi"]
    assert set(rep["summary"]) == set(MECHANISMS) and rep["summary"]["2d_mismatch"]["resolved"]
    # the replay is the training op: the diagnosed Fprop equals the layer's own output
    name, layer = next(iter(_layers(model).items()))
    caps = capture(model, batch, [(name, layer, 0)])
    x = caps[name]["x"]
    with torch.no_grad():
        y = layer(x) - layer.bias if layer.bias is not None else layer(x)
    roles = role_table(model.nvfp4_state.recipe)
    ref = hf_nvfp4.fake_quantize_nvfp4(x, tile=roles["fprop_input"].tile) @ hf_nvfp4.fake_quantize_nvfp4(
        layer.weight.detach(), tile=roles["fprop_weight"].tile).T
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    # the report's Fprop errors against a by-hand computation with the numpy reference
    import reference

    def deq(t, tile):
        codes, scale, amax = reference.nvfp4(t.detach().reshape(-1, t.shape[-1]).contiguous(), tile=tile)
        return torch.from_numpy(reference.nvfp4_dequant(codes, scale, amax)).double()

    x2, w = x.detach().reshape(-1, x.shape[-1]).double(), layer.weight.detach().double()
    exact = x2 @ w.T
    rel = lambda a: float((a - exact).norm() / exact.norm())
    row = next(r for r in rep["layers"] if r["name"] == name)
    assert row["fprop_relerr"] == pytest.approx(rel(deq(x2.float(), (1, 16)) @ deq(w.float(), (16, 16)).T), rel=1e-4)
    assert row["fprop_relerr_bf16"] == pytest.approx(rel(x2.bfloat16().double() @ w.bfloat16().double().T), rel=1e-4)


def test_diagnose_command_and_callback(tmp_path):
    from transformers import Trainer

    from hf_nvfp4.cli import main

    model = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=1))
    model.save_pretrained(tmp_path / "ckpt")
    recipe = tmp_path / "data.yaml"
    recipe.write_text(
        "model: {config: {model_type: llama}}\ndata: {source: stdlib, max_files: 4, seq_len: 32, eval_fraction: 0.2}\n"
    )
    assert main(["diagnose", str(tmp_path / "ckpt"), "--recipe", str(recipe), "--batch-size", "2",
                 "--draws", "3", "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "diagnostics.md").read_text()
    assert "Each mechanism, paired over layers" in md and "model.layers.0.mlp.down_proj" in md
    assert (tmp_path / "rep" / "diagnostics_depth.png").read_bytes()[:4] == b"\x89PNG"

    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.arange(16) * (i + 1) % 256
            return {"input_ids": ids, "labels": ids}

    cb = hf_nvfp4.DiagnoseCallback(every_n_steps=2, draws=3)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    tr = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[cb])
    cb.bind(tr)
    tr.train()
    assert (tmp_path / "run" / "diagnostics" / "step-2.json").exists()
    assert any("nvfp4_diag/sr_wgrad_bias" in h for h in tr.state.log_history)
