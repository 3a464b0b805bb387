"""Export to NVFP4 serving checkpoints: compressed-tensors (read back through transformers) and ModelOpt."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from models import tiny, tiny_moe
from safetensors.torch import load_file

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, export_nvfp4, quantize_nvfp4
from hf_nvfp4.cli import main
from hf_nvfp4.integrations.export import fused_groups

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
CONFIG = NVFP4Config(bf16_last_blocks=1, modules_to_not_convert=["model.layers.0.mlp.down_proj"])
EXPECTED_HIGH = {
    "lm_head": "lm_head",
    "model.embed_tokens": "embedding",
    "model.layers.0.mlp.down_proj": "modules_to_not_convert",
    **{f"model.layers.3.{m}": "bf16 block" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
    **{f"model.layers.3.{m}": "bf16 block" for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")},
    "model.layers.3.mlp.down_proj": "bf16 block",
}


def _train(model, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return _train(hf_nvfp4.convert_model(tiny("llama", layers=4), CONFIG))


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def _reference(model, tile=(16, 16)):
    """What the export must hold: training-time quantization, or joint-amax quantization for fused siblings."""
    layers = _layers(model)
    group_of = {m: g for g in fused_groups(list(layers)) for m in g}
    ref = {}
    for n, mod in layers.items():
        g = group_of.get(n)
        amax = torch.stack([layers[m].weight.detach().abs().max().float() for m in g]).max() if g else None
        ref[n] = quantize_nvfp4(mod.weight.detach(), tile=tile, amax=amax)
    return ref, group_of


def _decode(packed, scale):
    """Codes by hand: even element in the low nibble, bit 3 the sign, bits 0-2 index E2M1; times the E4M3 scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    vals = torch.tensor(E2M1)[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    return vals * scale.float().repeat_interleave(16, dim=1)


def _same_bits(a, b):
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_compressed_tensors_layout_is_the_training_quantization(trained, tmp_path):
    report = export_nvfp4(trained, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    ref, group_of = _reference(trained)
    assert set(report.quantized) == set(ref) and len(ref) == 3 * 7 - 1
    assert report.high_precision == EXPECTED_HIGH
    for n, mod in _layers(trained).items():
        q = ref[n]
        assert f"{n}.weight" not in sd
        assert _same_bits(sd[f"{n}.weight_packed"], q.data)
        assert sd[f"{n}.weight_packed"].shape == (mod.out_features, mod.in_features // 2)
        assert _same_bits(sd[f"{n}.weight_scale"], q.scale)
        assert sd[f"{n}.weight_scale"].shape == (mod.out_features, mod.in_features // 16)
        assert _same_bits(sd[f"{n}.weight_global_scale"], (torch.tensor(2688.0) / q.amax).reshape(1))
        if n not in group_of:  # served alone: the exact operand the Fprop GEMM used in training
            assert _same_bits(sd[f"{n}.weight_packed"], quantize_nvfp4(mod.weight, tile=(16, 16)).data)
            served = _decode(sd[f"{n}.weight_packed"], sd[f"{n}.weight_scale"]) / sd[f"{n}.weight_global_scale"]
            fq = hf_nvfp4.fake_quantize_nvfp4(mod.weight.detach(), tile=(16, 16))
            torch.testing.assert_close(served, fq, rtol=2e-7, atol=0)
    for g in {tuple(g) for g in group_of.values()}:  # one tensor scale per fused GEMM, from the joint amax
        scales = [sd[f"{m}.weight_global_scale"] for m in g]
        assert all(torch.equal(s, scales[0]) for s in scales)
        assert sum(report.fused[m]["identical"] for m in g) >= 1
    for n in EXPECTED_HIGH:
        w = dict(trained.named_modules())[n].weight.detach()
        assert _same_bits(sd[f"{n}.weight"], w.to(torch.bfloat16))
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors",
        "nvfp4-pack-quantized",
        "compressed",
    )
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"], w["dynamic"]) == (
        4,
        "float",
        "tensor_group",
        16,
        True,
        False,
    )
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    assert qc["ignore"] == sorted(EXPECTED_HIGH) and cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "nvfp4_export.json").read_text())["quantized"] == report.quantized
    assert report.payload_bytes < 0.6 * report.bf16_bytes and (tmp_path / "generation_config.json").is_file()
    moved = [v for v in report.fused.values() if not v["identical"]]
    assert moved and all(0 < v["rel_change"] < 1 and 0 < v["changed_fraction"] <= 1 for v in moved)
    assert "fused siblings requantized" in report.summary()


def test_transformers_loads_it_with_compressed_tensors(trained, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

    export_nvfp4(trained, tmp_path, tokenizer=ByT5Tokenizer())
    AutoTokenizer.from_pretrained(tmp_path)  # the tokenizer travels with the checkpoint
    served = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert served.dtype == torch.bfloat16
    cfg = trained.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(trained.config).from_dict(cfg), dtype=torch.bfloat16)
    sd = load_file(tmp_path / "model.safetensors")
    ref, _ = _reference(trained)
    state = {k: sd[k] if k in sd else ref[k[: -len(".weight")]].dequantize(torch.bfloat16) for k in plain.state_dict()}
    plain.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 24))
    logits, expected = served(ids).logits, plain(ids).logits  # the first forward decompresses the weights
    got = served.state_dict()
    for n in ref:  # compressed-tensors' dequantization vs ours, after its cast to bf16
        a, b = got[f"{n}.weight"].float(), state[f"{n}.weight"].float()
        assert (a - b).abs().le(b.abs() * 2**-8).all(), n
    torch.testing.assert_close(logits, expected, rtol=0, atol=2**-7 * float(expected.detach().abs().max()))
    prompt = torch.randint(3, 200, (1, 8))
    out = served.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14) and int(out.max()) < 256
    if torch.equal(logits, expected):  # same weights to the bit: greedy decoding must agree too
        same = plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert torch.equal(out, same)


def _input_amax(model, batches):
    """Each quantized layer's input max |x| over batches, measured independently of the exporter."""
    amax, hooks = {}, []
    for n, m in _layers(model).items():
        hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(
            n, torch.maximum(amax.get(n, torch.zeros(())), a[0].detach().abs().max().float()))))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    for g in fused_groups(list(amax)):
        amax.update(dict.fromkeys(g, torch.stack([amax[m] for m in g]).max()))
    return amax


def test_modelopt_w4a4_layout_and_scale_directions(trained, tmp_path):
    torch.manual_seed(3)
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(3)]
    report = export_nvfp4(trained, tmp_path / "mo", format="modelopt", scheme="NVFP4", calibration=batches)
    export_nvfp4(trained, tmp_path / "ct", scheme="NVFP4", calibration=batches)
    mo, ct = load_file(tmp_path / "mo" / "model.safetensors"), load_file(tmp_path / "ct" / "model.safetensors")
    hq = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())
    assert hq["producer"]["name"] == "hf_nvfp4"
    assert hq["quantization"] == {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": sorted(EXPECTED_HIGH),
    }
    qc = json.loads((tmp_path / "mo" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["ignore"]) == ("modelopt", "NVFP4", sorted(EXPECTED_HIGH))
    act = _input_amax(trained, batches)
    assert report.calibration_batches == 3 and report.input_amax == {n: float(a) for n, a in act.items()}
    ref, _ = _reference(trained)
    for n, q in ref.items():
        assert _same_bits(mo[f"{n}.weight"], q.data) and _same_bits(mo[f"{n}.weight_scale"], q.scale)
        assert _same_bits(mo[f"{n}.weight_scale_2"], q.amax / (6 * 448.0))  # decode: amax / (6 * 448)
        assert _same_bits(mo[f"{n}.input_scale"], act[n] / (6 * 448.0))
        six448 = torch.tensor(448.0 * 6)  # a tensor: python_scalar / tensor would multiply by a reciprocal
        assert _same_bits(ct[f"{n}.weight_global_scale"], (six448 / q.amax).reshape(1))  # encode: 448 * 6 / amax
        assert _same_bits(ct[f"{n}.input_global_scale"], (six448 / act[n]).reshape(1))
        torch.testing.assert_close(mo[f"{n}.weight_scale_2"] * ct[f"{n}.weight_global_scale"], torch.ones(1))
    a = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert a["input_activations"]["dynamic"] == "local" and a["input_activations"]["strategy"] == "tensor_group"
    export_nvfp4(trained, tmp_path / "wo", format="modelopt")
    hq = json.loads((tmp_path / "wo" / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "W4A16_NVFP4"
    assert not [k for k in load_file(tmp_path / "wo" / "model.safetensors") if k.endswith("input_scale")]


def test_w4a4_compressed_tensors_loads_and_generates(trained, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    export_nvfp4(trained, tmp_path, scheme="NVFP4", calibration=[torch.randint(0, 256, (2, 16))])
    served = AutoModelForCausalLM.from_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    q = served.model.layers[0].self_attn.q_proj
    assert torch.equal(q.input_global_scale.data, sd["model.layers.0.self_attn.q_proj.input_global_scale"])
    prompt = torch.randint(3, 200, (1, 8))
    out = served.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and torch.isfinite(served(prompt).logits).all()


def test_disable_2d_exports_1x16_blocks(tmp_path):
    model = _train(hf_nvfp4.convert_model(tiny("llama", layers=2), NVFP4Config(disable_2d_quantization=True)), 1)
    export_nvfp4(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    ref, group_of = _reference(model, tile=(1, 16))
    n = "model.layers.0.self_attn.o_proj"
    assert n not in group_of and _same_bits(sd[f"{n}.weight_scale"], ref[n].scale)
    assert not _same_bits(sd[f"{n}.weight_scale"], quantize_nvfp4(_layers(model)[n].weight, tile=(16, 16)).scale)


def test_tied_embeddings_are_stored_once(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=256, tie_word_embeddings=True)
    model = hf_nvfp4.from_config(cfg, NVFP4Config(bf16_last_blocks=0))
    report = export_nvfp4(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd and "lm_head" in report.high_precision
    served = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()
    assert _same_bits(served.lm_head.weight, model.model.embed_tokens.weight.to(torch.bfloat16))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint as an hf-nvfp4 run leaves it: save_pretrained (quant_method hf_nvfp4), plus the tokenizer."""
    from transformers import ByT5Tokenizer

    model = _train(hf_nvfp4.convert_model(tiny("llama", layers=3), NVFP4Config(bf16_last_blocks=1)))
    run = tmp_path_factory.mktemp("export") / "run"
    model.save_pretrained(run)
    ByT5Tokenizer().save_pretrained(run)
    assert json.loads((run / "config.json").read_text())["quantization_config"]["quant_method"] == "hf_nvfp4"
    return model, run


def test_cli_exports_a_run_dir_and_refuses_to_overwrite(run_dir, tmp_path, capsys):
    model, run = run_dir
    out = tmp_path / "served"
    assert main(["export", str(run), str(out)]) == 0
    assert "bit-identical to the weights training computed with" in capsys.readouterr().out
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    export_nvfp4(model, tmp_path / "direct")
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)  # directory == in-memory model
    assert main(["export", str(run), str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    (out / "mine.txt").write_text("a file the user put here")
    assert main(["export", str(run), str(out), "--format", "modelopt", "--overwrite"]) == 0
    assert (out / "hf_quant_config.json").is_file() and (out / "mine.txt").is_file()
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert not (out / "hf_quant_config.json").exists() and (out / "mine.txt").is_file()
    before = {f.name: f.stat().st_mtime_ns for f in run.iterdir()}
    assert main(["export", str(run), str(run), "--overwrite"]) == 2  # never into a checkpoint that is no export
    assert "is not an earlier export" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in run.iterdir()} == before
    assert main(["export", str(run), str(tmp_path / "w4a4"), "--scheme", "NVFP4"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), str(tmp_path / "y"), "--format", "gguf"])
    assert not (tmp_path / "w4a4").exists() and not (tmp_path / "x").exists()


def test_cli_w4a4_with_text_calibration_in_a_fresh_process(run_dir, tmp_path):
    _, run = run_dir
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 10)  # 290 bytes: one 512-token sequence
    out = tmp_path / "w4a4"
    cmd = [sys.executable, "-m", "hf_nvfp4.cli", "export", str(run), str(out), "--format", "modelopt"]
    cmd += ["--scheme", "NVFP4", "--calibration", str(text)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "activation amax calibrated on 1 batches" in res.stdout and "calibrating activation amax" in res.stderr
    sd = load_file(out / "model.safetensors")
    assert float(sd["model.layers.0.self_attn.q_proj.input_scale"]) > 0


def test_recipe_calibration_python_and_cli(tmp_path, capsys):
    from transformers import LlamaConfig

    from hf_nvfp4.data import calibration_batches
    from hf_nvfp4.integrations.calibration import calibration_batches as check_batches

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=384)  # the byte tokenizer's 384 ids
    model = hf_nvfp4.from_config(cfg, NVFP4Config(bf16_last_blocks=0))
    model.save_pretrained(tmp_path / "run")
    recipe = tmp_path / "calib.yaml"
    recipe.write_text("model: {config: {model_type: llama}}\ndata: {max_files: 2, seq_len: 32}\n"
                      "training: {batch_size: 2}\n")
    batches = calibration_batches(str(recipe))
    assert 1 <= len(batches) <= 8 and batches[0]["input_ids"].shape == (2, 32)
    report = export_nvfp4(model, tmp_path / "py", scheme="NVFP4", calibration=batches)
    assert report.calibration_batches == len(batches) and min(report.input_amax.values()) > 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "cli"), "--scheme", "NVFP4",
                 "--calibration", str(recipe)]) == 0
    cli = json.loads((tmp_path / "cli" / "nvfp4_export.json").read_text())
    assert cli["input_amax"] == report.input_amax  # the CLI read the same recipe data
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "x"), "--scheme", "NVFP4",
                 "--calibration", "no-such-recipe"]) == 2
    assert "no recipe file 'no-such-recipe'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        check_batches([torch.tensor([[1, 2, 400]])], model)
    with pytest.raises(ValueError, match="not a text file"):
        check_batches("tiny-cpu", model)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        check_batches(str(tmp_path / "run" / "config.json"), model)
    with pytest.raises(TypeError, match="calibration must be"):
        check_batches(3.5, model)


def test_bad_input_gets_clear_errors(trained, tmp_path):
    ids = [torch.randint(0, 256, (1, 8))]
    with pytest.raises(ValueError, match="unknown format 'gguf'"):
        export_nvfp4(trained, tmp_path / "a", format="gguf")
    with pytest.raises(ValueError, match="unknown scheme 'NVFP8'"):
        export_nvfp4(trained, tmp_path / "a", scheme="NVFP8")
    with pytest.raises(ValueError, match="needs calibration data"):
        export_nvfp4(trained, tmp_path / "a", scheme="NVFP4")
    with pytest.raises(ValueError, match="used by scheme='NVFP4'"):
        export_nvfp4(trained, tmp_path / "a", calibration=ids)
    with pytest.raises(TypeError, match="must be a transformers model"):
        export_nvfp4(hf_nvfp4.convert_model(nn.Sequential(nn.Linear(32, 32))), tmp_path / "a")
    with pytest.raises(ValueError, match="no NVFP4Linear"):
        export_nvfp4(tiny("llama", layers=2), tmp_path / "a")
    with pytest.raises(ValueError, match="is not a model directory"):
        export_nvfp4(tmp_path, tmp_path / "a")
    tiny("llama", layers=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not trained with hf_nvfp4"):
        export_nvfp4(tmp_path / "plain", tmp_path / "a")
    with pytest.raises(ValueError, match="is not empty"):
        export_nvfp4(trained, tmp_path / "plain")
    mixed = hf_nvfp4.convert_model(tiny("llama", layers=2), NVFP4Config(modules_to_not_convert=["*.k_proj"]))
    with pytest.raises(ValueError, match=r"q_proj \(NVFP4\), model.layers.0.self_attn.k_proj \(high precision\)"):
        export_nvfp4(mixed, tmp_path / "a")
    moe = hf_nvfp4.convert_model(tiny_moe("gpt_oss"), NVFP4Config(bf16_last_blocks=0))
    with pytest.raises(ValueError, match="GptOssExperts stores its experts transposed"):
        export_nvfp4(moe, tmp_path / "a")
    assert not (tmp_path / "a").exists()  # nothing written by any refused export
