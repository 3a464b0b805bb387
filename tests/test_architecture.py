"""Layering by AST, one model kind from every entry point, a frozen recipe, resume."""

import ast
import json
from pathlib import Path

import pytest
import torch
from models import COMMON, tiny
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, NVFP4Recipe, NVFP4State

PKG = Path(hf_nvfp4.__file__).resolve().parent
HF_PACKAGES = {"transformers", "accelerate", "datasets", "lm_eval", "evaluate", "huggingface_hub", "peft"}
CORE = ("formats", "config", "ops", "nn")
# formats -> config -> ops -> nn -> integrations -> science and the app -> cli (and the package's
# front door): lower never imports higher
RANK = {"formats": 0, "config": 1, "ops": 2, "nn": 3, "integrations": 4, "science": 5, "cli": 6}
APP = 5


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return RANK.get(parts[1], APP) if len(parts) > 1 else RANK["cli"]


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by one file, at any depth (lazy imports included)."""
    mod = "hf_nvfp4." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out += [f"{name}.{a.name}" for a in node.names if node.level and not node.module]
    return out


def _graph() -> dict[str, set[str]]:
    g = {}
    for f in PKG.rglob("*.py"):
        mod = "hf_nvfp4." + ".".join(f.relative_to(PKG).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        g[mod] = {i for i in _imports(f)}
    return g


def test_core_imports_no_hf_package_and_layers_point_one_way():
    g = _graph()
    for mod, deps in g.items():
        layer = _layer(mod)
        for d in deps:
            top = d.split(".")[0]
            if mod.split(".")[1:2] and mod.split(".")[1] in CORE:
                assert top not in HF_PACKAGES, f"{mod} (core) imports {d}"
            if top == "hf_nvfp4" and d != "hf_nvfp4":
                assert _layer(d) <= layer, f"{mod} (layer {layer}) imports upward: {d} (layer {_layer(d)})"


def test_no_import_cycles_between_modules():
    g = _graph()
    mods = set(g)
    edges = {m: {d for d in g[m] if d in mods and d != m and not m.startswith(d + ".")} for m in g}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in edges[m]:
            if d.endswith("__init__") or d == "hf_nvfp4":
                continue
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [d])}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def _kind(model):
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, NVFP4Linear))
    states = {id(m.nvfp4_state) for m in model.modules() if isinstance(m, NVFP4Linear)}
    qc = model.config.quantization_config
    return layers, len(states), type(model.hf_quantizer).__name__, qc.to_dict(), model.nvfp4_state.recipe


def test_four_entry_points_give_the_same_kind_of_model(tmp_path):
    cfg = NVFP4Config(bf16_last_blocks=1, disable_rht=True, seed=5)
    a = hf_nvfp4.convert_model(tiny("llama", 4), cfg)
    b = hf_nvfp4.from_config(LlamaConfig(num_hidden_layers=4, **COMMON), cfg)
    tiny("llama", 4).save_pretrained(tmp_path / "plain")
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=cfg)
    a.save_pretrained(tmp_path / "converted")  # convert_model -> save_pretrained -> from_pretrained
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["quantization_config"]["seed"] == 5
    d = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    kinds = [_kind(m) for m in (a, b, c, d)]
    assert all(k == kinds[0] for k in kinds), kinds
    layers, n_states, quantizer, _, recipe = kinds[0]
    assert len(layers) == 3 * 7 and n_states == 1 and quantizer == "NVFP4HfQuantizer"
    assert recipe == cfg.to_recipe()
    sd, ref = d.state_dict(), a.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_hand_built_layers_draw_different_noise_until_adopted():
    torch.manual_seed(0)
    net = torch.nn.Sequential(NVFP4Linear(64, 64), NVFP4Linear(64, 64))
    net[1].weight.data.copy_(net[0].weight.data)
    x = torch.randn(32, 64)
    grads = []
    for layer in net:
        w = layer.weight
        grads.append(torch.autograd.grad(layer(x).pow(2).sum(), w)[0])
    assert not torch.equal(grads[0], grads[1])  # same weights and input, different SR streams
    hf_nvfp4.convert_model(net, NVFP4Config(bf16_last_blocks=0))
    assert net[0].nvfp4_state is net[1].nvfp4_state is net.nvfp4_state


def test_recipe_is_frozen_and_set_recipe_revalidates():
    cfg = NVFP4Config(bf16_last_blocks=0)
    model = hf_nvfp4.convert_model(tiny("llama", 2), cfg)
    cfg.disable_stochastic_rounding = True  # the caller's object: no effect on the model
    assert model.nvfp4_state.recipe.disable_stochastic_rounding is False
    with pytest.raises(ValueError, match="disable_stochastic_rounding must be True or False"):
        cfg.disable_stochastic_rounding = "no"  # validated when set, not when first used
    with pytest.raises(AttributeError, match="frozen.*set_recipe"):
        model.config.quantization_config.disable_stochastic_rounding = True
    with pytest.raises(Exception, match="frozen|cannot assign"):
        model.nvfp4_state.recipe.disable_rht = True  # noqa: B018 - the frozen dataclass refuses
    with pytest.raises(ValueError, match="disable_stochastic_rounding must be True or False"):
        hf_nvfp4.set_recipe(model, disable_stochastic_rounding="no")
    with pytest.raises(ValueError, match="rht_size"):
        hf_nvfp4.set_recipe(model, rht_size=2**20)
    hf_nvfp4.set_recipe(model, disable_rht=True)
    assert model.config.quantization_config.disable_rht is True
    assert all(m.recipe.disable_rht for m in model.modules() if isinstance(m, NVFP4Linear))


def test_double_conversion_replans_the_whole_model():
    model = hf_nvfp4.convert_model(tiny("llama", 4), NVFP4Config(bf16_last_blocks=1))
    hf_nvfp4.convert_model(model, NVFP4Config(bf16_last_blocks=0, format="mxfp4", rht_size=32))
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert len(layers) == 4 * 7
    assert {m.recipe.format for m in layers} == {"mxfp4"} and {id(m.nvfp4_state) for m in layers} == {
        id(model.nvfp4_state)
    }
    assert model.config.quantization_config.format == "mxfp4"
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(getattr(h, "__self__", None), NVFP4State)]
    assert len(hooks) == 1


@pytest.mark.parametrize(
    "field,value,effect",
    [("disable_rht", True, "wgrad"), ("rht_size", 32, "wgrad"), ("disable_2d_quantization", True, "fprop"),
     ("disable_stochastic_rounding", True, "dgrad")],
)
def test_every_mxfp4_option_takes_effect(field, value, effect):
    """MXFP4 honours each option (the output or gradient it governs changes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g) * torch.logspace(-2, 1, 64)
    w = torch.randn(64, 64, generator=g)

    def run(**changes):
        torch.manual_seed(1)
        layer = hf_nvfp4.convert_model(torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)),
                                       NVFP4Config(format="mxfp4", bf16_last_blocks=0, **changes))
        layer[0].weight.data.copy_(w)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(torch.ones_like(y) + y.detach())
        return {"fprop": y.detach(), "dgrad": xi.grad, "wgrad": layer[0].weight.grad}

    base, changed = run(), run(**{field: value})
    assert not torch.equal(base[effect], changed[effect])


def test_options_a_format_cannot_honour_raise():
    with pytest.raises(ValueError, match="mxfp4.*rht_size=8"):
        NVFP4Config(format="mxfp4", rht_size=8)
    with pytest.raises(ValueError, match="fp8_block.*stochastic"):
        NVFP4Config(format="fp8_block", disable_rht=True)
    with pytest.raises(ValueError, match="mxfp8.*2D"):
        hf_nvfp4.convert_model(torch.nn.Linear(32, 32), NVFP4Recipe(format="mxfp8", disable_rht=True,
                                                                     disable_stochastic_rounding=True))
    r = NVFP4Recipe.for_format("fp8_block")
    assert r.disable_rht and r.disable_stochastic_rounding and not r.disable_2d_quantization


def test_modules_to_not_convert_prefixes_globs_and_unknown_names():
    plan = hf_nvfp4.nn.plan_conversion(tiny("llama", 4), NVFP4Config(bf16_last_blocks=0,
                                                                      modules_to_not_convert=["self_attn", "layers.1"]))
    kept = {n for n, d in plan.items() if d == "modules_to_not_convert"}
    assert {n for n in plan if ".self_attn." in n} <= kept
    assert {n for n in plan if ".layers.1." in n} <= kept
    assert not any(".layers.10" in n or ".layers.2.mlp" in n for n in kept)
    plan = hf_nvfp4.nn.plan_conversion(tiny("llama", 2), NVFP4Config(modules_to_not_convert=["*.q_proj"]))
    assert {n for n, d in plan.items() if d == "modules_to_not_convert"} == {f"model.layers.{i}.self_attn.q_proj"
                                                                             for i in range(2)}
    with pytest.raises(ValueError, match="'self_atn' matches no module.*self_attn"):
        hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(modules_to_not_convert=["self_atn"]))


def test_converting_zero_layers_is_an_error_and_leaves_the_model_plain():
    model = tiny("llama", 2)
    with pytest.raises(ValueError, match="no Linear layer.*bf16 block"):
        hf_nvfp4.convert_model(model, NVFP4Config(bf16_first_blocks=1, bf16_last_blocks=1))
    assert not getattr(model, "is_quantized", False) and getattr(model, "nvfp4_state", None) is None
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 256, (32,), generator=g)
        return {"input_ids": ids, "labels": ids}


def test_from_pretrained_trainer_resume_is_bit_identical_without_callbacks(tmp_path):
    tiny("llama", 2).save_pretrained(tmp_path / "base")

    def trainer(out):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=NVFP4Config(
            bf16_last_blocks=0))
        args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, save_steps=3,
                                 logging_steps=1, report_to="none", use_cpu=True, seed=0, learning_rate=1e-3,
                                 disable_tqdm=True)
        return Trainer(model=model, args=args, train_dataset=_Data())

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [h["loss"] for h in full.state.log_history if "loss" in h][3:]
    lb = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert la == lb[-3:]
    assert not any(p.name.startswith("nvfp4_") for p in (tmp_path / "full" / "checkpoint-3").iterdir())


def test_rht_size_is_bounded_wherever_a_config_is_built(tmp_path):
    """2**20 from a constructor, a dict, a recipe file or a checkpoint's config.json
    is refused before anything is allocated."""
    from hf_nvfp4.recipe import RecipeError, load_recipe

    for make in (lambda: NVFP4Config(rht_size=2**20), lambda: NVFP4Config.from_dict({"rht_size": 4096}),
                 lambda: NVFP4Recipe(rht_size=512)):
        with pytest.raises(ValueError, match="rht_size must be a power of two from 2 to 256"):
            make()
    with pytest.raises(RecipeError, match="rht_size"):
        load_recipe("tiny-cpu", [f"nvfp4.rht_size={2**20}"])
    model = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["rht_size"] = 2**20
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rht_size"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_the_recipe_field_list_exists_once():
    """NVFP4Config's fields are NVFP4Recipe's (plus quant_method); it holds a recipe and validates on set."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(NVFP4Recipe)]
    assert [f.name for f in dataclasses.fields(NVFP4Config)] == ["quant_method", *names]
    cfg = NVFP4Config(seed=3)
    cfg.seed = 4
    assert cfg.to_recipe() == NVFP4Recipe(seed=4)
    assert dataclasses.replace(cfg, rht_size=32).to_recipe() == NVFP4Recipe(seed=4, rht_size=32)
    with pytest.raises(AttributeError, match="no field 'sed'"):
        cfg.sed = 1


def test_temporary_precision_restores_any_format_even_on_error():
    model = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(format="mxfp4", bf16_last_blocks=0))
    with pytest.raises(RuntimeError), hf_nvfp4.nn.temporary_precision(model, "bf16", scope="forward"):
        assert {(m.precision, m.forward_precision) for m in model.modules() if isinstance(m, NVFP4Linear)} == {
            ("mxfp4", "bf16")}
        raise RuntimeError
    assert {(m.precision, m.forward_precision) for m in model.modules() if isinstance(m, NVFP4Linear)} == {
        ("mxfp4", None)}
