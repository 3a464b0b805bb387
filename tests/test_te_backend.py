"""The Transformer Engine adapter (hf_nvfp4/nn/te_backend.py) against a TE STAND-IN, and against real TE.

Real TE cannot be installed here (no CUDA). tests/te_standin is a contract read from TE's
source at d0067d0da: the API the adapter calls, the preconditions TE enforces on the tensors
it is given (with TE's error texts) and TE's numerics, from its own small implementation of
TE's reference quantizers (it does not import hf_nvfp4). It runs on the CPU, so the adapter's
TE device type is switched to "cpu" for these tests (te_backend._TE_DEVICE_TYPE, its one seam).

"The TE path equals the emulation" is therefore a comparison of two implementations: the
quantized operands are bit-identical (test_standin_operands_are_the_emulations), while GEMM
outputs agree to the output dtype's rounding (the stand-in rounds once after an fp32 GEMM, as
cuBLAS does; the emulation's bf16 GEMM rounds, then scales). The backward passes use a fixed
upstream gradient so that both backends quantize the same gradient. Passing these checks the
adapter against TE's source; it does not verify TE. The last test runs real TE on a Blackwell
GPU and is skipped everywhere else.
"""

from __future__ import annotations

import copy
import importlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from models import tiny

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear
from hf_nvfp4.config import NVFP4Recipe, as_recipe
from hf_nvfp4.formats._compile import compile_mode
from hf_nvfp4.nn import te_backend
from hf_nvfp4.nn.te_backend import select_backend, te_status

STANDIN = Path(__file__).parent / "te_standin"
EXACT = dict(rtol=0, atol=0)


def _te_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "transformer_engine" or k.startswith("transformer_engine.")}


def _real_te() -> tuple[bool, str]:
    usable, reason = te_status()
    te = sys.modules.get("transformer_engine")
    if usable and getattr(te, "STANDIN", False):
        return False, "only the TE stand-in is importable"
    return usable, reason


@pytest.fixture
def standin(monkeypatch):
    """Import the TE stand-in as ``transformer_engine`` on a pretended GPU; everything is restored after."""
    saved = _te_modules()
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(STANDIN))
    gpu = {"cap": (10, 0)}
    # No torch.compile while CUDA is pretended: inductor would cache a CUDA device interface that
    # later compilations in this process trip over ("Torch not compiled with CUDA enabled").
    # Eager numerics compute the same bits (test_nvfp4.test_fused_matches_eager_bit_for_bit).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "TE stand-in")
    monkeypatch.setattr(te_backend, "_TE_DEVICE_TYPE", "cpu", raising=False)
    reset = getattr(te_backend, "reset", lambda: None)

    def load():
        for k in _te_modules():
            del sys.modules[k]
        import transformer_engine
        import transformer_engine.pytorch as te_pt
        from transformer_engine.pytorch.module import linear

        assert transformer_engine.STANDIN
        transformer_engine.DEVICE_TYPE = "cpu"
        env.te, env.linear, env.te_pt = transformer_engine, linear, te_pt
        reset()

    def set_gpu(cap=(10, 0), version="2.20.0"):
        gpu["cap"] = cap
        env.te.__version__ = version
        reset()

    env = SimpleNamespace(load=load, set=set_gpu)
    with compile_mode("0"):
        load()
        yield env
    for k in _te_modules():
        del sys.modules[k]
    sys.modules.update(saved)
    reset()


def _pair(cfg: NVFP4Config, model: nn.Module | None = None):
    """The same model converted with the TE backend and with the emulated one."""
    model = model if model is not None else nn.Sequential(nn.Linear(64, 32))
    ref = copy.deepcopy(model)
    hf_nvfp4.convert_model(model, cfg)
    hf_nvfp4.convert_model(ref, as_recipe(cfg).replace(backend="emulated"))
    return model, ref


def _run(model, x, autocast=torch.bfloat16):
    x = x.clone().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        y = model(x)
    # a fixed upstream gradient (not one computed from y): both backends then quantize the same dy
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(g)
    grads = [p.grad.clone() for p in model.parameters()]
    return y.detach(), x.grad, grads


def _close(p, q, eps: float, equal_nan=False):
    """Equal up to the rounding of one GEMM output: the stand-in rounds once (cuBLAS), the emulation
    may round twice (bf16 GEMM, then the per-tensor factors): 2 epsilons of the compute dtype."""
    scale = q.detach().float().nan_to_num().abs().max().item() if q.numel() else 0.0
    torch.testing.assert_close(p, q, rtol=2 * eps, atol=2 * eps * scale, equal_nan=equal_nan)


def _assert_same(a, b, equal_nan=False):
    """Outputs, input gradient and parameter gradients of two ``_run`` results agree."""
    eps = torch.finfo(b[0].dtype).eps  # y is in the compute dtype
    for p, q in zip([*a[:2], *a[2]], [*b[:2], *b[2]], strict=True):
        _close(p, q, eps, equal_nan)


def _close_rel(a, b, rel_tol):
    # TE's assert_close_relative (tests/pytorch/nvfp4/test_nvfp4_module_exact.py): relative Frobenius error
    a, b = a.detach().float(), b.detach().float()
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert rel <= rel_tol, f"relative error {rel:.5f} > {rel_tol}"


NO_SR = dict(backend="te", disable_stochastic_rounding=True, bf16_last_blocks=0)


# -- 1. the TE module always computes with the layer's current Parameters ------------------------


def test_from_pretrained_first_forward_uses_loaded_weights(standin, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny("llama", layers=2).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NVFP4Config(**NO_SR))
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=NVFP4Config(**{**NO_SR, "backend": "emulated"})
    )
    first = {}
    for name, m in (("te", model), ("emulated", ref)):
        lin = next(x for x in m.modules() if isinstance(x, NVFP4Linear))
        lin.register_forward_hook(lambda mod, i, o, name=name: first.setdefault(name, o.detach()))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, exp = model(ids).logits, ref(ids).logits
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert layers and all(m.backend == "te" for m in layers)
    assert len(standin.linear.CALLS) == len(layers)
    for m in layers:
        assert m._te_module.weight is m.weight and m.weight.device.type == "cpu"
    # The first GEMM sees the same input in both: equal up to one rounding. Later layers' inputs
    # differ by those roundings, which move NVFP4 codes; logits from wrong weights would be ~1.4 away.
    _close(first["te"], first["emulated"], torch.finfo(torch.bfloat16).eps)
    _close_rel(out, exp, 0.5)


@pytest.mark.parametrize("swap", ["load_state_dict_assign", "setattr"])
def test_parameter_swap_is_followed(standin, swap):
    model, ref = _pair(NVFP4Config(**NO_SR))
    x = torch.randn(16, 64)
    _run(model, x)  # builds and binds the te.Linear
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    if swap == "setattr":  # what transformers 5 loading and FSDP2 do
        model[0].weight = nn.Parameter(new["0.weight"])
        model[0].bias = nn.Parameter(new["0.bias"])
    else:
        model.load_state_dict(new, assign=True)
    ref.load_state_dict(new)
    got = _run(model, x)
    assert model[0]._te_module.weight is model[0].weight
    _assert_same(got, _run(ref, x))


# -- 2. token counts TE cannot take ---------------------------------------------------------------


def test_odd_token_counts_are_padded_exactly(standin, caplog):
    caplog.set_level(logging.INFO, logger="hf_nvfp4")
    model, ref = _pair(NVFP4Config(**NO_SR))
    x = torch.randn(1, 5, 64)
    _assert_same(_run(model, x), _run(ref, x))
    _run(model, torch.randn(3, 7, 64))
    assert [s for _, s in standin.linear.CALLS] == [(128, 64), (128, 64)]  # TE's NVFP4 alignment
    assert sum("zero padded" in r.message for r in caplog.records) == 1


def test_generate_one_new_token(standin):
    base = tiny("llama", layers=2)
    model, ref = _pair(NVFP4Config(**NO_SR), base)
    ids = torch.randint(0, 256, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids, max_new_tokens=1, do_sample=False)
        exp = ref.generate(ids, max_new_tokens=1, do_sample=False)
    # the new token itself may differ: two layers of rounding differences move NVFP4 codes
    assert out.shape == exp.shape == (1, 6) and torch.equal(out[:, :5], ids)
    assert standin.linear.CALLS and all(s[0] % 128 == 0 for _, s in standin.linear.CALLS)


# -- 3. dtypes ----------------------------------------------------------------------------------------


def test_fp32_model_without_autocast(standin, caplog):
    caplog.set_level(logging.INFO, logger="hf_nvfp4")
    model, ref = _pair(NVFP4Config(**NO_SR))  # RHT on: TE needs bf16, so these calls run emulated
    x = torch.randn(16, 64)
    _assert_same(_run(model, x, autocast=None), _run(ref, x, autocast=None))
    _run(model, x, autocast=None)
    assert standin.linear.CALLS == []
    assert sum("RHT takes bf16" in r.message for r in caplog.records) == 1

    model, ref = _pair(NVFP4Config(**NO_SR, disable_rht=True))  # no RHT: TE computes in fp32
    _assert_same(_run(model, x, autocast=None), _run(ref, x, autocast=None))
    assert len(standin.linear.CALLS) == 1


def test_input_dtype_differs_from_parameters(standin):
    model, ref = _pair(NVFP4Config(**NO_SR))  # fp32 parameters, bf16 input, no autocast
    x = torch.randn(16, 64).bfloat16()
    _assert_same(_run(model, x, autocast=None), _run(ref, x, autocast=None))
    assert len(standin.linear.CALLS) == 1


def test_fp16_autocast_with_rht_runs_emulated(standin):
    model, ref = _pair(NVFP4Config(**NO_SR))
    x = torch.randn(16, 64)
    # equal_nan: the emulated GEMM itself overflows fp16 here (operand values reach 2688)
    _assert_same(_run(model, x, autocast=torch.float16), _run(ref, x, autocast=torch.float16), equal_nan=True)
    assert standin.linear.CALLS == []


# -- 3b. what TE's source says about dtypes and alignment (issue: first Blackwell run) --------------------


def test_fp32_input_under_bf16_autocast_reaches_te_as_bf16(standin):
    """The Trainer's bf16=True: fp32 parameters, fp32 activations (Llama's RMSNorm), bf16 autocast.
    TE's quantized path does not cast its input, and its RHT takes bf16 only."""
    model, ref = _pair(NVFP4Config(**NO_SR))  # RHT on
    x = torch.randn(2, 64, 64)
    _assert_same(_run(model, x), _run(ref, x))
    assert [c for c, _ in standin.linear.CALLS] == ["NVFP4BlockScaling"]
    assert x.dtype == torch.float32 and model[0].weight.grad.dtype == torch.float32


def test_late_switch_fprop_is_a_bf16_gemm(standin):
    """IdentityQuantizer(dtype=None) keeps each tensor's dtype: fp32 master weights met a bf16 input."""
    model, ref = _pair(NVFP4Config(**NO_SR, disable_rht=True))
    for m in (model, ref):
        hf_nvfp4.set_precision(m, "bf16", scope="forward")
    x = torch.randn(128, 64)
    _assert_same(_run(model, x), _run(ref, x))
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    _assert_same(_run(model, x, autocast=None), _run(ref, x, autocast=None))  # fp32 compute: fp32 Fprop
    fprops = [g for g in standin.linear.GEMMS if g[0] == "fprop"]
    assert fprops == [("fprop", "torch.bfloat16", torch.bfloat16), ("fprop", "torch.float32", torch.float32)]
    assert {k[2] for k in model[0]._te_recipes} == {torch.bfloat16, torch.float32}  # one TE recipe per dtype


@pytest.mark.parametrize("late", [False, True])
def test_fp16_nvfp4_runs_emulated_without_rht_too(standin, late):
    """TE: "FP4 GEMM does not support FP16 output!" (cublaslt_gemm.cu), RHT or not, late switch included."""
    model, ref = _pair(NVFP4Config(**NO_SR, disable_rht=True))
    if late:
        for m in (model, ref):
            hf_nvfp4.set_precision(m, "bf16", scope="forward")
    x = torch.randn(128, 64)
    _assert_same(_run(model, x, autocast=torch.float16), _run(ref, x, autocast=torch.float16), equal_nan=True)
    assert standin.linear.CALLS == []


def test_tokens_padded_to_te_nvfp4_alignment(standin):
    """The token dim is the packed-FP4 K of the Wgrad GEMM: padding to 16 is not enough for cuBLAS."""
    model, ref = _pair(NVFP4Config(**NO_SR))
    x = torch.randn(1, 5, 64).bfloat16()  # 5 tokens, already in the compute dtype
    _assert_same(_run(model, x), _run(ref, x))
    assert [s for _, s in standin.linear.CALLS] == [(128, 64)]
    assert all(g[1] == "quantized" for g in standin.linear.GEMMS)


def test_standin_operands_are_the_emulations():
    """The stand-in's own quantizers (read from TE's reference) give the emulation's operand bits."""
    sys.path.insert(0, str(STANDIN))
    try:
        numerics = importlib.import_module("transformer_engine._numerics")
    finally:
        sys.path.remove(str(STANDIN))
    from hf_nvfp4.formats import get_format

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 5
    x[1, :16] = 0
    for tile in ((1, 16), (16, 16)):
        q = numerics.nvfp4(x, tile)
        assert torch.equal(q.vals * q.g, hf_nvfp4.quantize_nvfp4(x, tile=tile).dequantize())
    xb = x.bfloat16()
    q = numerics.nvfp4(numerics.rht16(xb), (1, 16))
    assert torch.equal(q.vals * q.g, hf_nvfp4.quantize_nvfp4(xb, rht=True).dequantize())
    q = numerics.fp8_tensor(x)
    assert torch.equal(q.vals * q.g, get_format("fp8_tensor").fake_quantize(x))
    for tile in ((1, 128), (128, 128)):
        assert torch.equal(numerics.fp8_block(x, tile, True).vals, get_format("fp8_block").fake_quantize(x, tile=tile))
    assert torch.equal(numerics.mxfp8(x).vals, get_format("mxfp8").fake_quantize(x))
    assert "hf_nvfp4" not in Path(numerics.__file__).read_text().replace("imports hf_nvfp4", "")


def test_standin_support_checks_keep_cuda_conditions(standin):
    q = importlib.import_module("transformer_engine.pytorch.quantization")
    standin.set((8, 9))
    assert q.check_fp8_support() == (True, "")
    q.CUBLASLT_VERSION = 120000
    assert "CublasLt version 12.1.3" in q.check_fp8_support()[1]
    q.CUBLASLT_VERSION, q.CUDA_VERSION = 120900, 12.8
    standin.set((9, 0))
    assert "CUDA >= 12.9" in q.check_fp8_block_scaling_support()[1]


def test_coverage_says_experts_run_emulated_on_te(standin):
    from models import tiny_moe

    model = hf_nvfp4.convert_model(tiny_moe("mixtral", layers=1), NVFP4Config(**NO_SR))
    cov = hf_nvfp4.coverage(model)
    assert cov.emulated_on_te and "Experts run emulated on the TE backend" in cov.summary()
    emulated = hf_nvfp4.convert_model(tiny_moe("mixtral", layers=1), NVFP4Config(**{**NO_SR, "backend": "emulated"}))
    assert hf_nvfp4.coverage(emulated).emulated_on_te == []


# -- 4. which GPUs and TE versions are accepted --------------------------------------------------------


@pytest.mark.parametrize(
    "cap, version, stochastic, ok",
    [
        ((10, 0), "2.8.0", True, True),
        ((10, 3), "2.18.0", True, True),
        ((12, 0), "2.18.0", True, False),  # SR returns all-zero data there (TE PR #3281)
        ((12, 1), "2.19.0.dev0+3c4d5e6", True, False),  # a dev build may predate the fix
        ((12, 0), "2.18.0", False, True),  # without SR the bug does not bite
        ((12, 1), "2.19.0", True, True),
        ((12, 0), "2.20.0", True, True),
        ((11, 0), "2.18.0", True, False),
        ((9, 0), "2.20.0", True, False),  # Hopper: TE's own refusal
    ],
)
def test_availability(standin, cap, version, stochastic, ok):
    standin.set(cap, version)
    cfg = dict(backend="auto", disable_stochastic_rounding=not stochastic)
    assert select_backend(NVFP4Config(**cfg))[0] == ("te" if ok else "emulated")
    usable, reason = te_status("nvfp4", stochastic)
    assert usable is ok, reason
    if not ok:
        expected = "#3281" if cap[0] in (11, 12) else "Device compute capability 10.0 or higher required"
        assert expected in reason
        with pytest.raises(RuntimeError, match="cannot run here"):
            select_backend(NVFP4Config(**{**cfg, "backend": "te"}))
    assert (te_backend.nvfp4_capability_reason(cap, version, stochastic) is None) == ok


# -- 5. the meta device ----------------------------------------------------------------------------------


def test_meta_device_respected(standin):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32))
        hf_nvfp4.convert_model(model, NVFP4Config(**NO_SR))
    assert standin.linear.CONSTRUCTED == []  # nothing built (or allocated) on conversion
    model.to_empty(device="cpu")
    nn.init.normal_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    x = torch.randn(16, 64)
    rng = torch.get_rng_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert standin.linear.CONSTRUCTED == ["meta"] and len(standin.linear.CALLS) == 1
    assert torch.equal(torch.get_rng_state(), rng)  # TE's default init would draw from the device RNG


# -- 6. stochastic rounding draws from the default generator under TE -------------------------------------


def test_sr_generator_caveat(standin, caplog):
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    base = nn.Sequential(nn.Linear(64, 32))
    grads = {}
    for seed, torch_seed in ((0, 5), (7, 5), (0, 6)):
        model = hf_nvfp4.convert_model(copy.deepcopy(base), NVFP4Config(backend="te", seed=seed))
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(torch_seed)
        grads[seed, torch_seed] = _run(model, x)[2][0]
    assert torch.equal(grads[0, 5], grads[7, 5])  # NVFP4Config.seed does not apply
    assert not torch.equal(grads[0, 5], grads[0, 6])  # the default generator does
    assert sum("default CUDA generator" in r.message for r in caplog.records) == 1


# -- 7. NVTE_* variables cannot change the recipe ------------------------------------------------------------


def test_nvte_variables_do_not_change_the_recipe(standin, monkeypatch):
    env = {
        "NVTE_BACKWARD_OVERRIDE": "high_precision",
        "NVTE_NVFP4_ROW_SCALED_ACTIVATION": "1",
        "NVTE_NVFP4_4OVER6": "weights",
        "NVTE_NVFP4_4OVER6_ERR_MODE": "MSE",
        "NVTE_NVFP4_DISABLE_RHT": "1",
        "NVTE_NVFP4_DISABLE_2D_QUANTIZATION": "1",
        "NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    standin.load()  # TE reads them at import
    model, ref = _pair(NVFP4Config(**NO_SR))
    x = torch.randn(16, 64)
    _assert_same(_run(model, x), _run(ref, x))
    r = model[0]._te_recipes["nvfp4", None, torch.bfloat16][0]
    assert (r.backward_override, r.row_scaled_activation, r.nvfp4_4over6, r.nvfp4_4over6_err_mode) == (
        None,
        False,
        "none",
        "MAE",
    )
    assert (r.disable_rht, r.disable_2d_quantization, r.disable_stochastic_rounding) == (False, False, True)

    standin.set((9, 0))
    model, ref = _pair(NVFP4Recipe.for_format("fp8_tensor", backend="te", bf16_last_blocks=0))
    _assert_same(_run(model, x), _run(ref, x))
    r = model[0]._te_recipes["fp8_tensor", None, torch.bfloat16][0]
    assert not r.fp8_quant_fwd_inp.power_2_scale and r.backward_override is None


# -- 8. late switch, TE's FP8 / MXFP8 recipes, rht_size, unconvert ----------------------------------------------


def test_late_switch_runs_on_te(standin):
    model, ref = _pair(NVFP4Config(**NO_SR))
    for m in (model, ref):
        hf_nvfp4.set_precision(m, "bf16", scope="forward")
    x = torch.randn(16, 64)
    _assert_same(_run(model, x), _run(ref, x))
    assert [c for c, _ in standin.linear.CALLS] == ["CustomRecipe"]


def test_late_switch_without_hybrid_quantizer_says_the_cost(standin, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.tensor.hybrid_tensor", None)  # TE <= 2.18
    model, ref = _pair(NVFP4Config(**NO_SR))
    for m in (model, ref):
        hf_nvfp4.set_precision(m, "bf16", scope="forward")
    x = torch.randn(16, 64)
    _assert_same(_run(model, x), _run(ref, x))
    assert standin.linear.CALLS == []
    assert sum("TE >= 2.19" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(
    "fmt, cap, recipe",
    [
        ("fp8_block", (9, 0), "Float8BlockScaling"),
        ("fp8_tensor", (9, 0), "Float8CurrentScaling"),
        ("mxfp8", (10, 0), "MXFP8BlockScaling"),
        ("mxfp8", (12, 0), None),  # TE: "MXFP8 (for all gemm layouts) is not supported on 12.0+"
    ],
)
def test_comparison_formats_use_te_recipes(standin, fmt, cap, recipe):
    standin.set(cap)
    cfg = NVFP4Recipe.for_format(fmt, backend="auto", bf16_last_blocks=0)
    assert select_backend(cfg)[0] == ("te" if recipe else "emulated")
    model, ref = _pair(cfg)
    x = torch.randn(2, 5, 64)  # 10 tokens: padded to TE's multiple
    _assert_same(_run(model, x), _run(ref, x))
    assert [c for c, _ in standin.linear.CALLS] == ([recipe] if recipe else [])


def test_set_precision_all_switches_te_recipe(standin):
    model, ref = _pair(NVFP4Config(**NO_SR, disable_rht=True))  # fp8_block has no RHT
    for m in (model, ref):
        hf_nvfp4.set_precision(m, "fp8_block")
    x = torch.randn(16, 64)
    _assert_same(_run(model, x), _run(ref, x))
    hf_nvfp4.set_precision(model, "bf16")  # plain torch GEMMs: no TE call
    _run(model, x)
    assert [c for c, _ in standin.linear.CALLS] == ["Float8BlockScaling"]


def test_rht_size_rejects_te_only_with_rht(standin):
    assert select_backend(NVFP4Config(backend="te", rht_size=32, disable_rht=True))[0] == "te"
    with pytest.raises(RuntimeError, match="16-point"):
        select_backend(NVFP4Config(backend="te", rht_size=32))


def test_unconvert_removes_all_te_attributes(standin):
    model = tiny("llama", layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf_nvfp4.convert_model(model, NVFP4Config(**NO_SR))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 256, (1, 16)))
    assert any(getattr(m, "_te_module", None) is not None for m in model.modules())
    hf_nvfp4.unconvert_model(model)
    for m in model.modules():
        assert not [a for a in m.__dict__ if a.startswith("_te")], type(m)
    assert model.state_dict().keys() == before.keys()


# -- real Transformer Engine (Blackwell); skipped without it -----------------------------------------------------

REAL_TE, REAL_TE_REASON = _real_te()


@pytest.mark.skipif(not REAL_TE, reason=f"Transformer Engine backend unavailable: {REAL_TE_REASON}")
def test_real_te_llama_gemms_training_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = torch.device("cuda")
    # Per-GEMM agreement with the emulation, without SR (deterministic), at TE's own tolerances:
    # fp32 / no RHT at atol=rtol=1e-6 and bf16 + RHT at relative error 2e-2 (test_nvfp4_module_exact.py).
    for dtype, rht in ((torch.float32, False), (torch.bfloat16, True)):
        cfg = dict(disable_rht=not rht, disable_stochastic_rounding=True, bf16_last_blocks=0)
        base = nn.Sequential(nn.Linear(256, 512, bias=False)).to(dev)
        model, ref = _pair(NVFP4Config(backend="te", **cfg), base)
        x = torch.randn(4, 128, 256, device=dev)
        ac = torch.bfloat16 if dtype == torch.bfloat16 else None
        outs = []
        for m in (model, ref):
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=ac, enabled=ac is not None):
                y = m(xx)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), xx.grad, m[0].weight.grad))
        assert model[0]._te_module is not None
        for a, b in zip(*outs, strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            else:
                _close_rel(a, b, 2e-2)

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        m = AutoModelForCausalLM.from_config(cfg).to(dev)
        hf_nvfp4.convert_model(m, NVFP4Config(backend="te"))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    def steps(m, opt, n):
        losses = []
        ids = torch.randint(0, 512, (4, 128), device=dev, generator=torch.Generator(dev).manual_seed(100))
        for _ in range(n):  # one batch, memorised: the loss must fall
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    model, opt = build()
    first = steps(model, opt, 3)
    assert all(m.backend == "te" and m._te_module is not None for m in model.modules() if isinstance(m, NVFP4Linear))
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "cuda_rng": torch.cuda.get_rng_state()},
        tmp_path / "ckpt.pt",
    )
    cont = steps(model, opt, 5)
    assert all(torch.isfinite(torch.tensor(first + cont))) and cont[-1] < 0.8 * first[0]
    resumed, opt2 = build()
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    torch.cuda.set_rng_state(state["cuda_rng"])  # TE's SR stream (default CUDA generator)
    torch.testing.assert_close(torch.tensor(steps(resumed, opt2, 5)), torch.tensor(cont))
