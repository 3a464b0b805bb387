"""Export to NVFP4 serving checkpoints: compressed-tensors (read back through transformers) and ModelOpt."""

import copy
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
    moved = {n: v for n, v in report.fused.items() if not v["identical"]}
    assert moved
    import reference  # how far the joint amax moved each sibling, by hand with the numpy reference

    for n, v in moved.items():
        w = dict(trained.named_modules())[n].weight.detach()
        own, joint = reference.nvfp4(w, tile=(16, 16)), reference.nvfp4(w, tile=(16, 16), amax=v["joint_amax"])
        a, b = (torch.from_numpy(reference.nvfp4_dequant(*q)).double() for q in (own, joint))
        assert v["rel_change"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)
        assert v["changed_fraction"] == pytest.approx(float((own[0] != joint[0]).mean()), abs=1e-9)
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


def test_write_safetensors_shards_with_an_index(tmp_path, monkeypatch):
    """Sharding and its index come from huggingface_hub, in transformers' layout."""
    from safetensors.torch import load_file

    from hf_nvfp4.integrations import serving_formats

    tensors = {f"w{i}": torch.full((64,), float(i)) for i in range(5)}
    monkeypatch.setattr(serving_formats, "SHARD_BYTES", 600)
    written = serving_formats.write_safetensors(tensors, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"]) == set(tensors)
    assert written == sum(p.stat().st_size for p in shards)
    loaded = {k: v for p in shards for k, v in load_file(p).items()}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
# ----------------------------------------------------------------------------- fused_global_scale


def _served_outputs(model, sd, ids):
    """Each NVFP4 layer's output in the model's own forward, and the same GEMM computed with the weight
    decoded from the ModelOpt export (codes x E4M3 scale x weight_scale_2, fp32) in place of training's."""
    from hf_nvfp4.formats.nvfp4 import nvfp4_gemm_operand

    seen, hooks = {}, []
    for n, m in _layers(model).items():
        hooks.append(m.register_forward_hook(lambda mod, a, y, n=n: seen.__setitem__(n, (a[0], y))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for n, (x, y) in seen.items():
        xv, gx = nvfp4_gemm_operand(x.reshape(-1, x.shape[-1]), dtype=torch.float32)
        wv = _decode(sd[f"{n}.weight"], sd[f"{n}.weight_scale"])  # exact in fp32
        out[n] = (y.reshape(-1, y.shape[-1]), (xv @ wv.t()).mul_(gx * sd[f"{n}.weight_scale_2"]))
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_fused_global_scale_serves_exactly_what_trained(fused, tmp_path):
    torch.manual_seed(0)
    recipe = NVFP4Config(bf16_last_blocks=0, fused_global_scale=fused)
    model = _train(hf_nvfp4.convert_model(tiny("llama", layers=2), recipe), 2).eval()
    groups = [list(g.names) for g in model.__dict__.get("nvfp4_fused_groups", [])]
    report = export_nvfp4(model, tmp_path / "mo", format="modelopt")
    sd = load_file(tmp_path / "mo" / "model.safetensors")
    outputs = _served_outputs(model, sd, torch.randint(0, 256, (2, 24)))
    assert len(outputs) == 14 and set(report.layers) == set(outputs)
    same = {n: torch.equal(y, y_served) for n, (y, y_served) in outputs.items()}
    if fused:  # groups found by tracing, not by names: q/k/v and gate/up of both blocks
        assert groups == fused_groups(list(_layers(model)))
        assert all(same.values()) and all(v["bit_identical"] for v in report.layers.values())
        for g in groups:  # one tensor scale per fused GEMM, as vLLM wants it, and the one training used
            assert len({float(sd[f"{m}.weight_scale_2"]) for m in g}) == 1
        assert "bit-identical to the weights training computed with: 14 of 14 layers" in report.summary()
        assert "worst per-element change" not in report.summary()
    else:  # TE's per-layer scales: the smaller siblings are re-quantized at export, and their outputs move
        assert not groups
        moved = {n for n, v in report.layers.items() if not v["bit_identical"]}
        assert moved and moved == {n for n, s in same.items() if not s}
        assert all(report.layers[n]["max_abs_change"] > 0 for n in moved)
        assert "worst per-element change" in report.summary()


def test_fused_groups_found_at_a_first_forward_under_autocast_or_generate():
    recipe = NVFP4Config(bf16_last_blocks=0, fused_global_scale=True)
    model = hf_nvfp4.convert_model(tiny("llama", layers=2), recipe)
    ids = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast caches parameter casts: no fake one may leak
        model(input_ids=ids, labels=ids).loss.backward()
    assert [len(g.names) for g in model.nvfp4_fused_groups] == [3, 2, 3, 2]
    model = hf_nvfp4.convert_model(tiny("llama", layers=2), recipe).eval()
    prompt = torch.randint(3, 200, (1, 8))  # generate(): the first call carries a KV cache
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11) and len(model.nvfp4_fused_groups) == 4


def test_traced_groups_are_the_ones_vllm_fuses_in_mla_and_moe_models():
    from hf_nvfp4.nn.fused import named_groups

    model = hf_nvfp4.convert_model(tiny_moe("deepseek_v3"), NVFP4Config(bf16_last_blocks=0, fused_global_scale=True))
    model(torch.randint(0, 256, (1, 16)))  # the first forward finds them: no name list involved
    traced = [list(g.names) for g in model.nvfp4_fused_groups]
    assert sorted(traced) == sorted(named_groups(model))  # q_a_proj + kv_a_proj_with_mqa, gate/up (dense, shared)
    assert any(g[0].endswith("q_a_proj") for g in traced) and any(g[0].endswith("gate_proj") for g in traced)


def test_fused_global_scale_refusals_and_groups_without_forward(tmp_path):
    from hf_nvfp4.nn.fused import find_fused_groups
    from hf_nvfp4.nn.te_backend import te_unsupported_reason

    with pytest.raises(ValueError, match="no per-tensor scale, so fused_global_scale"):
        NVFP4Config(format="mxfp4", fused_global_scale=True)
    with pytest.raises(ValueError, match="fused_global_scale must be True or False"):
        NVFP4Config(fused_global_scale="yes")
    assert "fused_global_scale" in te_unsupported_reason(NVFP4Config(fused_global_scale=True))
    # exported before any forward: the exporter traces the groups itself
    model = hf_nvfp4.convert_model(tiny("llama", layers=1), NVFP4Config(bf16_last_blocks=0, fused_global_scale=True))
    assert "nvfp4_fused_groups" not in model.__dict__
    report = export_nvfp4(model, tmp_path / "a")
    assert len(model.nvfp4_fused_groups) == 2 and all(v["bit_identical"] for v in report.layers.values())
    # a forward that cannot run on fake tensors falls back to sibling names, loudly
    groups = find_fused_groups(model, input_ids="not a tensor")
    assert groups == fused_groups(list(_layers(model))) and len(model.nvfp4_fused_groups) == 2
    twin = copy.deepcopy(model)  # a copy's groups hold the copy's layers
    assert twin.nvfp4_fused_groups[0].weights()[0] is twin.model.layers[0].self_attn.q_proj.weight
    hf_nvfp4.unconvert_model(model)
    assert "nvfp4_fused_groups" not in model.__dict__ and not any("nvfp4_group" in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- MoE export

SERVE_MOE = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme

path, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(path)  # bf16, as compressed-tensors decompresses
sd = load_file(path + "/model.safetensors")
qc = json.load(open(path + "/config.json"))["quantization_config"]
scheme = QuantizationScheme(targets=["Linear"], **{k: v for k, v in qc["config_groups"]["group_0"].items()
                                                   if k in ("weights", "input_activations")})
comp = BaseCompressor.get_value_from_registry(qc["format"])
patched = []
for name, mod in model.named_modules():
    if not hasattr(mod, "gate_up_proj") or getattr(mod, "is_transposed", True):
        continue
    # the checkpoint's experts as compressed-tensors decompresses them, names from the report
    rep = json.load(open(path + "/nvfp4_export.json"))["experts"][name]
    base = rep["checkpoint_names"][0].rsplit(".", 2)[0]
    mixtral = any(k.startswith(f"{base}.0.w1.") for k in sd)
    g, u, d = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    def dq(e, p):
        part = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"{base}.{e}.{p}.")}
        return comp.decompress(part, scheme)["weight"].to(mod.gate_up_proj.dtype)
    E = mod.gate_up_proj.shape[0]
    gate_up = torch.stack([torch.cat([dq(e, g), dq(e, u)]) for e in range(E)])
    down = torch.stack([dq(e, d) for e in range(E)])
    if not (torch.equal(mod.gate_up_proj.data, gate_up) and torch.equal(mod.down_proj.data, down)):
        # transformers <= 5.25 drops weight_global_scale on this path (huggingface/transformers#48371)
        mod.gate_up_proj.data.copy_(gate_up); mod.down_proj.data.copy_(down); patched.append(name)
ids = torch.arange(48).reshape(2, 24) * 5 % 256
logits = model(ids).logits.detach()  # the first forward decompresses the dense layers
tensors = {k: v.contiguous() for k, v in model.state_dict().items() if v.is_floating_point() and v.dtype.itemsize > 1}
tensors["logits"] = logits
save_file(tensors, out)
assert "hf_nvfp4" not in sys.modules
print(json.dumps({"patched": patched}))
"""


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_export_round_trips_through_transformers(arch, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from hf_nvfp4.formats.nvfp4 import quantize_nvfp4 as q16

    torch.manual_seed(0)
    recipe = NVFP4Config(bf16_last_blocks=0, fused_global_scale=True)
    model = _train(hf_nvfp4.convert_model(tiny_moe(arch), recipe), 2).eval()
    report = export_nvfp4(model, tmp_path / "ct")
    experts = {n: m for n, m in model.named_modules() if getattr(m, "nvfp4_experts", None) is not None}
    assert set(report.experts) == set(experts) and len(experts) == 2
    # traced with the experts in the model: q/k/v of each block (the MLPs are experts: one matrix each)
    assert [len(g.names) for g in model.nvfp4_fused_groups] == [3, 3]
    assert all(v["bit_identical"] for v in report.layers.values())
    sd = load_file(tmp_path / "ct" / "model.safetensors")
    mlp = "mlp" if arch == "qwen3_moe" else "block_sparse_moe"
    gate, up, down = ("gate_proj", "up_proj", "down_proj") if arch == "qwen3_moe" else ("w1", "w3", "w2")
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.embed_tokens", f"model.layers.0.{mlp}.gate", f"model.layers.1.{mlp}.gate"]
    for n, mod in experts.items():  # the layout vLLM's FusedMoE loads: one Linear per expert and projection
        layer = n.split(".")[2]
        for e in range(8):
            p = f"model.layers.{layer}.{mlp}.experts.{e}"
            gu = q16(mod.gate_up_proj[e].detach(), tile=(16, 16))
            i = mod.gate_up_proj.shape[1] // 2
            assert _same_bits(sd[f"{p}.{gate}.weight_packed"], gu.data[:i])
            assert _same_bits(sd[f"{p}.{up}.weight_scale"], gu.scale[i:])
            assert _same_bits(sd[f"{p}.{gate}.weight_global_scale"], sd[f"{p}.{up}.weight_global_scale"])
            assert _same_bits(sd[f"{p}.{down}.weight_packed"], q16(mod.down_proj[e].detach(), tile=(16, 16)).data)
    out = tmp_path / "served.safetensors"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", SERVE_MOE, str(tmp_path / "ct"), str(out)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    served = load_file(out)
    state = {}  # a plain model computing with the training-time operands, rounded to bf16 as compressed-tensors does
    for k, t in model.state_dict().items():
        mod_name, _, leaf = k.rpartition(".")
        if mod_name in experts:
            ref = torch.stack([hf_nvfp4.fake_quantize_nvfp4(w, tile=(16, 16)) for w in t.detach()])
            ref = ref.to(torch.bfloat16)
            assert torch.equal(served[k], ref), k  # the experts' dequantized weights are the training operands
            state[k] = ref
        elif mod_name in _layers(model):  # its fused group's amax: q/k/v and gate/up of the shared expert
            group = _layers(model)[mod_name].__dict__.get("nvfp4_group")
            amax = None if group is None else group.amax()
            state[k] = hf_nvfp4.fake_quantize_nvfp4(t.detach(), tile=(16, 16), amax=amax).to(torch.bfloat16)
        else:
            state[k] = t.detach().to(torch.bfloat16)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(cfg), dtype=torch.bfloat16)
    plain.load_state_dict(state)
    for k, t in state.items():  # every tensor the served model computes with
        assert torch.equal(served[k], t), k
    ids = torch.arange(48).reshape(2, 24) * 5 % 256
    expected = plain(ids).logits.detach()
    assert torch.equal(served["logits"], expected)  # same weights to the bit, same bf16 forward


def test_moe_w4a4_modelopt_per_expert_scales(tmp_path):
    torch.manual_seed(0)
    model = _train(hf_nvfp4.convert_model(tiny_moe("mixtral", layers=1), NVFP4Config(bf16_last_blocks=0)), 1)
    batches = [torch.randint(0, 256, (2, 16))]
    report = export_nvfp4(model, tmp_path / "mo", format="modelopt", scheme="NVFP4", calibration=batches)
    sd = load_file(tmp_path / "mo" / "model.safetensors")
    mod = model.model.layers[0].mlp.experts
    seen = {}  # the experts' two GEMM inputs, measured independently: hidden states, and the gate's output
    h1 = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("up", a[0].abs().max().float()))
    gate = mod._apply_gate
    mod.__dict__["_apply_gate"] = lambda h: seen.setdefault("down", []).append(gate(h).abs().max().float()) or gate(h)
    with torch.no_grad():
        model.eval()(batches[0])
    h1.remove()
    del mod.__dict__["_apply_gate"]
    up_amax, down_amax = seen["up"], torch.stack(seen["down"]).max()
    p = "model.layers.0.block_sparse_moe.experts"
    assert report.input_amax["model.layers.0.mlp.experts.gate_up_proj"] == float(up_amax)
    for e in range(8):
        gu = quantize_nvfp4(mod.gate_up_proj[e].detach(), tile=(16, 16))
        i = mod.gate_up_proj.shape[1] // 2
        assert _same_bits(sd[f"{p}.{e}.w1.weight"], gu.data[:i]) and _same_bits(sd[f"{p}.{e}.w3.weight"], gu.data[i:])
        for w in ("w1", "w3"):  # one decode factor for gate and up: vLLM's w13_weight_scale_2[:, 0] is exact
            assert _same_bits(sd[f"{p}.{e}.{w}.weight_scale_2"], gu.amax / (6 * 448.0))
            assert _same_bits(sd[f"{p}.{e}.{w}.input_scale"], up_amax / (6 * 448.0))
        assert _same_bits(sd[f"{p}.{e}.w2.input_scale"], down_amax / (6 * 448.0))
    hq = json.loads((tmp_path / "mo" / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4" and hq["exclude_modules"] == ["lm_head", "model.embed_tokens",
                                                                      "model.layers.0.block_sparse_moe.gate"]
