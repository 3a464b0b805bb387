import copy

import pytest
import reference as ref
import torch
import torch.nn as nn
from models import tiny

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear
from hf_nvfp4.nn import find_blocks, plan_conversion
from hf_nvfp4.nn.te_backend import parse_version, select_backend, te_recipe_kwargs, te_status, te_unsupported_reason


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "nemotron_h"])
def test_convert_hf_models(arch):
    model = tiny(arch, layers=6)
    before = copy.deepcopy(model.state_dict())
    hf_nvfp4.convert_model(model, NVFP4Config())
    name, blocks = find_blocks(model)
    assert len(blocks) == 6 and name.endswith("layers")
    # default: ~15% of 6 blocks -> the last 1 in BF16; the LM head never converts
    for i, blk in enumerate(blocks):
        for m in blk.modules():
            if isinstance(m, nn.Linear):  # Mamba's in_proj (164 wide here) stays high precision
                odd = m.in_features % 16 or m.out_features % 16
                assert isinstance(m, NVFP4Linear) == (i < 5 and not odd), (i, m)
    assert type(model.lm_head) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    # each kind of converted layer (its name within a block): Fprop equals the numpy reference
    # on the input it received (one of each kind keeps the slow reference cheap)
    seen, kinds = [], {}
    for n, m in model.named_modules():
        if isinstance(m, NVFP4Linear):
            kinds.setdefault(n.split(".", 3)[-1], m)

    def check(mod, args, out):
        x2, w = args[0].detach().reshape(-1, mod.in_features), mod.weight.detach()
        want = _deq(x2) @ _deq(w, (16, 16)).T + (0 if mod.bias is None else mod.bias.detach().double())
        err = (out.detach().reshape(want.shape).double() - want).abs().max().item()
        assert err <= 2e-5 * max(1.0, want.abs().max().item()), (mod, err)
        seen.append(mod)

    hooks = [m.register_forward_hook(check) for m in kinds.values()]
    ids = torch.randint(0, 256, (2, 24))
    out = model(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    assert len(seen) == len(hooks) > 0
    want = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 256).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _deq(t, tile=(1, 16)):
    codes, scale, amax = ref.nvfp4(t, tile=tile)
    return torch.from_numpy(ref.nvfp4_dequant(codes, scale, amax)).double()


def test_skip_rules_and_plain_modules():
    seq = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.Linear(48, 40))
    plan = plan_conversion(seq, NVFP4Config(modules_to_not_convert=["0"]))
    assert plan == {"0": "modules_to_not_convert", "2": "convert", "3": "shape 40x48 not divisible by 16"}
    hf_nvfp4.convert_model(seq)
    assert [type(m).__name__ for m in seq] == ["NVFP4Linear", "ReLU", "NVFP4Linear", "Linear"]
    model = tiny("llama", 4)
    plan = plan_conversion(
        model, NVFP4Config(bf16_first_blocks=1, bf16_last_blocks=0, modules_to_not_convert=["*.mlp.down_proj"])
    )
    assert plan["model.layers.0.self_attn.q_proj"] == "bf16 block"
    assert plan["model.layers.3.self_attn.q_proj"] == "convert"
    assert plan["model.layers.2.mlp.down_proj"] == "modules_to_not_convert"
    assert plan["lm_head"] == "lm_head"


def test_config_validation_and_roundtrip():
    cfg = NVFP4Config(bf16_last_blocks=3, modules_to_not_convert=["lm_head"], seed=5)
    assert NVFP4Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.resolved_bf16_blocks(10) == (0, 3) and NVFP4Config().resolved_bf16_blocks(62) == (0, 9)
    assert NVFP4Config().resolved_bf16_blocks(2) == (0, 1)
    for kw, words in [
        ({"backend": "cuda"}, "backend must be one of"),
        ({"format": "fp4"}, "format must be one of"),
        ({"rht_size": 12}, "rht_size"),
        ({"disable_rht": "yes"}, "disable_rht"),
        ({"bf16_last_blocks": -1}, "bf16_last_blocks"),
        ({"modules_to_not_convert": [1]}, "modules"),
    ]:
        with pytest.raises(ValueError, match=words):
            NVFP4Config(**kw)
    with pytest.raises(ValueError, match="unknown field"):
        NVFP4Config.from_dict({"disable_rhtt": True})


def test_set_precision_scopes():
    model = hf_nvfp4.convert_model(tiny("llama", 4))
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert hf_nvfp4.set_precision(model, "bf16", scope="forward") == len(layers)
    assert all(m.precision == "nvfp4" and m.forward_precision == "bf16" for m in layers)
    hf_nvfp4.set_precision(model, "bf16")
    assert all(m.precision == "bf16" and m.forward_precision is None for m in layers)
    with pytest.raises(ValueError, match="precision must be one of"):
        hf_nvfp4.set_precision(model, "fp4")
    hf_nvfp4.set_precision(model, "nvfp4")
    hf_nvfp4.set_precision(model, "bf16", scope="backward")  # the paper's control: Fprop stays NVFP4
    assert all(m.precision == "bf16" and m.forward_precision == "nvfp4" for m in layers)
    with pytest.raises(ValueError, match="scope"):
        hf_nvfp4.set_precision(model, "bf16", scope="sideways")
    with pytest.raises(ValueError, match="precision must be one of"):
        layers[0].precision = "int4"


def test_unconvert_restores_plain_linear():
    model = hf_nvfp4.convert_model(tiny("qwen2", 2))
    hf_nvfp4.unconvert_model(model)
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())


def test_tiny_model_loss_falls_under_full_recipe():
    torch.manual_seed(0)
    model = hf_nvfp4.convert_model(tiny("llama", 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_te_backend_pure_parts():
    cfg = NVFP4Config(disable_rht=True, disable_2d_quantization=True)
    assert te_recipe_kwargs(cfg) == {
        "disable_rht": True,
        "disable_stochastic_rounding": False,
        "disable_2d_quantization": True,
    }
    assert te_unsupported_reason(NVFP4Config(format="mxfp4")) is not None
    assert te_unsupported_reason(NVFP4Config(rht_size=64)) is not None
    assert te_unsupported_reason(NVFP4Config()) is None
    assert parse_version("2.8.0+cu12") == (2, 8) and parse_version("2.10.1") == (2, 10)
    usable, reason = te_status()
    if not usable:  # no TE / no Blackwell here: auto falls back, te refuses with the reason
        assert select_backend(NVFP4Config(backend="auto")) == ("emulated", reason)
        with pytest.raises(RuntimeError, match="cannot run here"):
            select_backend(NVFP4Config(backend="te"))
    assert select_backend(NVFP4Config(backend="emulated"))[0] == "emulated"


def test_te_linear_on_blackwell():
    usable, reason = te_status()
    if not usable:
        pytest.skip(f"Transformer Engine backend unavailable: {reason}")
    layer = nn.Linear(64, 64).cuda()
    model = hf_nvfp4.convert_model(nn.Sequential(layer), NVFP4Config(backend="te"))
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert model[0].backend == "te" and layer.weight.grad is not None
