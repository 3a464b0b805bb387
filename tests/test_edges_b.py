"""Hard edges, round 3 (issue 23, items 2, 3, 7, 9-13, 15): each bad input gets a clear error
naming what was wrong, or the right behaviour; nothing silent, no bare error from deep inside a
library. Every test here failed on the code before the fix."""

import json
import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from models import tiny
from transformers import ByT5Tokenizer

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, evaluate_lm, export_nvfp4
from hf_nvfp4.cli import main
from hf_nvfp4.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def model():
    m = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=0))
    m.config.max_position_embeddings = 64
    return m


# -- 2: a NaN or Inf weight is never exported silently -------------------------------------------
@pytest.mark.parametrize("where,value", [("model.layers.0.mlp.up_proj", float("nan")),
                                         ("model.layers.1.self_attn.o_proj", float("inf")),
                                         ("model.embed_tokens", float("nan"))])
def test_export_refuses_non_finite_weights_naming_the_tensor(model, tmp_path, where, value):
    mod = dict(model.named_modules())[where]
    saved = mod.weight.detach().clone()
    with torch.no_grad():
        mod.weight[1, 2] = value
    try:
        with pytest.raises(ValueError, match=rf"non-finite weights.*{where}\.weight.*nothing was written"):
            export_nvfp4(model, tmp_path / "out")
    finally:
        with torch.no_grad():
            mod.weight.copy_(saved)
    assert not (tmp_path / "out").exists()


# -- 3: W4A4 calibration that is empty or too short ----------------------------------------------
def test_w4a4_empty_or_short_calibration_is_named(model, tmp_path):
    empty, short, ok = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "ok.txt"
    empty.write_text("")
    short.write_text("ab")
    ok.write_text("def f(x):\n    return x * 2\n")  # 27 bytes + </s>
    tok = ByT5Tokenizer()
    with pytest.raises(ValueError, match=r"empty\.txt holds no text.*at least 16 tokens"):
        export_nvfp4(model, tmp_path / "a", scheme="NVFP4", calibration=str(empty), tokenizer=tok)
    with pytest.raises(ValueError, match=r"short\.txt' gives 3 token\(s\).*at least 16"):
        export_nvfp4(model, tmp_path / "b", scheme="NVFP4", calibration=str(short), tokenizer=tok)
    with pytest.raises(ValueError, match=r"calibration data gives 4 token\(s\)"):
        export_nvfp4(model, tmp_path / "c", scheme="NVFP4", calibration=torch.randint(0, 256, (1, 4)))
    assert not any((tmp_path / d).exists() for d in "abc")
    rep = export_nvfp4(model, tmp_path / "d", scheme="NVFP4", calibration=str(ok), tokenizer=tok)
    assert (rep.calibration_batches, rep.calibration_tokens) == (1, 28)
    assert "calibrated on 1 batches (28 tokens)" in rep.summary()
    assert json.loads((tmp_path / "d" / "nvfp4_export.json").read_text())["calibration_tokens"] == 28


def test_w4a4_non_finite_activation_amax_is_refused(model, tmp_path):
    def nan_input(mod, args):
        return (args[0] * float("nan"),)

    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(nan_input)
    try:
        with pytest.raises(ValueError, match=r"non-finite activation amax.*down_proj"):
            export_nvfp4(model, tmp_path / "o", scheme="NVFP4", calibration=torch.randint(0, 256, (2, 16)))
    finally:
        h.remove()
    assert not (tmp_path / "o").exists()


# -- 7 and 15: lm-eval edges and noise ------------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    docs = {
        "e_ws": [{"q": "   ", "choices": ["a", "b"], "label": 0}],  # whitespace-only context
        "e_empty0": [{"q": "1 + 1 =", "choices": ["", " 2"], "label": 1}],  # lm-eval reads choice[0] of doc 0
        "e_empty1": [{"q": "1 + 1 =", "choices": [" 3", " 2"], "label": 1},
                     {"q": "2 =", "choices": [" 2", ""], "label": 0}],
        "e_long": [{"q": "x", "choices": ["y" * 100, "z"], "label": 1}],  # longer than 64 positions
    }
    for name, rows in docs.items():
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (d / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d}/{name}.jsonl\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: label\n"
            "doc_to_choice: '{{choices}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
            "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
        )
    return d


def test_whitespace_only_context_uses_the_prefix_token_as_lm_eval_does(model, task_dir):
    from hf_nvfp4.integrations.lm_eval import _exact_hflm

    tok = ByT5Tokenizer()
    lm = _exact_hflm()(pretrained=model, tokenizer=tok, batch_size=1)
    # lm-eval's loglikelihood for an empty context: [prefix_token_id] then the whole continuation
    assert lm._encode_pair("   ", "a") == ([lm.prefix_token_id], [b + 3 for b in b"   a"])
    res = evaluate_lm(model, tok, ["e_ws"], include_path=task_dir)
    assert 0.0 <= res["results"]["e_ws"]["acc,none"] <= 1.0


@pytest.mark.parametrize("task,message", [
    ("e_empty0", r"a choice of the first document is empty"),
    ("e_empty1", r"task 'e_empty1', document 1: a continuation \(choice\) is empty"),
    ("e_long", r"continuation of 100 tokens .* longer than the model's maximum length of 64"),
])
def test_bad_lm_eval_requests_are_named(model, task_dir, task, message):
    with pytest.raises(ValueError, match=message):
        evaluate_lm(model, ByT5Tokenizer(), [task], include_path=task_dir)


def test_lm_eval_without_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer is None"):
        evaluate_lm(model, None, ["nvfp4_stdlib_mc"], limit=2)


def test_bundled_tasks_run_quietly_outside_a_git_checkout(model, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.chdir(tmp_path)  # not inside any git checkout
    with caplog.at_level(logging.INFO):
        res = evaluate_lm(model, ByT5Tokenizer(), ["nvfp4_stdlib_ppl"], limit=1)
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert res["results"]["nvfp4_stdlib_ppl"]["bits_per_byte,none"] > 0
    assert "not a git repository" not in text
    assert "aggregation is not" not in text and "higher_is_better is not" not in text


def test_huge_metrics_print_readably():
    from hf_nvfp4.evaluation import format_table

    table = format_table({"run": {"ppl/word_perplexity": 13267650779120.8047, "mc/acc": 0.25}})
    assert "1.327e+13" in table and "0.2500" in table and "13267650779120" not in table


def test_fsdp_fallback_notice_on_the_main_process_only(monkeypatch, caplog):
    from hf_nvfp4.train import say_fsdp_fallback

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    trainer = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(distributed_type="MULTI_CPU"))
    with caplog.at_level(logging.WARNING, logger="hf_nvfp4"):
        trainer.is_world_process_zero = lambda: False
        say_fsdp_fallback(trainer)
        assert "enables FSDP only for GPU" not in caplog.text
        trainer.is_world_process_zero = lambda: True
        say_fsdp_fallback(trainer)
    assert caplog.text.count("enables FSDP only for GPU") == 1


# -- 9: diagnose checks for matplotlib before computing ------------------------------------------
def test_diagnose_needs_matplotlib_up_front(monkeypatch, tmp_path, capsys):
    import hf_nvfp4.science.diagnose_report as diag

    def computed(*a, **k):
        raise AssertionError("computed before checking for matplotlib")

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(diag, "load_for_diagnosis", computed)
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    with pytest.raises(ImportError, match="matplotlib"):
        diag.diagnose_checkpoint(tmp_path)


# -- 10: a truncated model.safetensors in eval or diagnose -----------------------------------------
def test_truncated_weights_are_named_in_eval_and_diagnose(tmp_path, capsys):
    tiny("llama", 1).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["eval", str(tmp_path), "--tasks", "nvfp4_stdlib_mc", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "eval: cannot load" in err and str(f) in err and "truncated" in err
    from hf_nvfp4.science.diagnose_report import load_for_diagnosis

    with pytest.raises(ValueError, match=r"diagnose: cannot load .*model\.safetensors: .*truncated"):
        load_for_diagnosis(tmp_path)


# -- 11: recipe values are range-checked at load, naming the key --------------------------------
@pytest.mark.parametrize("override,key", [
    ("training.lr=.nan", "training.lr"), ("training.lr=-0.001", "training.lr"), ("training.lr=.inf", "training.lr"),
    ("training.beta1=2", "training.beta1"), ("training.beta2=1.0", "training.beta2"),
    ("training.warmup_steps=-5", "training.warmup_steps"), ("training.grad_clip=-1", "training.grad_clip"),
    ("training.weight_decay=-3", "training.weight_decay"), ("training.weight_decay=.nan", "training.weight_decay"),
    ("training.min_lr_ratio=2", "training.min_lr_ratio"), ("training.seed=-1", "training.seed"),
    ("training.save_steps=-1", "training.save_steps"),
    ("training.dataloader_workers=-2", "training.dataloader_workers"),
    ("data.eval_fraction=5", "data.eval_fraction"), ("data.eval_fraction=1", "data.eval_fraction"),
    ("data.max_files=0", "data.max_files"), ("evaluation.limit=0", "evaluation.limit"),
    ("evaluation.batch_size=0", "evaluation.batch_size"),
    ("logging.health_every_n_steps=-1", "logging.health_every_n_steps"),
])
def test_recipe_values_are_range_checked(override, key):
    with pytest.raises(RecipeError, match=rf"recipe\.{key} must be"):
        load_recipe("tiny-cpu", [override])


def test_recipe_keys_the_data_source_ignores_are_errors():
    with pytest.raises(RecipeError, match=r"data\.files is set .* data\.source 'stdlib' does not read it"):
        load_recipe("tiny-cpu", ["data.files=[a.txt]"])
    with pytest.raises(RecipeError, match=r"data\.name is set"):
        load_recipe("tiny-cpu", ["data.name=wikitext"])
    assert load_recipe("tiny-cpu", ["data.eval_fraction=0"]).data.eval_fraction == 0  # 0: no held-out set


def test_binary_recipe_file_is_named(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(RecipeError, match=r"r\.yaml: not a text \(UTF-8 YAML\) file"):
        load_recipe(p)
    assert main(["train", str(p)]) == 2
    assert "r.yaml: not a text" in capsys.readouterr().err


# -- 12: quantizer function arguments ------------------------------------------------------------
def test_rht_size_is_capped_and_checked_in_the_functions():
    x = torch.randn(4, 32)
    for size in (512, 12, 0, True, 16.0, 2**20):  # 2**20 last: before the cap it allocated 4 GiB
        with pytest.raises(ValueError, match="rht_size must be a power of two from 2 to 256"):
            hf_nvfp4.fake_quantize_nvfp4(x, rht=True, rht_size=size)
        with pytest.raises(ValueError, match="rht_size must be a power of two"):
            hf_nvfp4.quantize_nvfp4(x, rht=True, rht_size=size)
    with pytest.raises(ValueError, match="from 2 to 256"):
        hf_nvfp4.hadamard_transform(torch.randn(2, 1024), size=1024)
    with pytest.raises(ValueError, match="from 2 to 256"):
        hf_nvfp4.formats.hadamard_matrix(2**20)
    assert hf_nvfp4.fake_quantize_nvfp4(x, rht=True, rht_size=256).shape == (4, 256)


@pytest.mark.parametrize("amax", [float("nan"), float("inf"), -1.0, torch.tensor(float("nan"))])
def test_non_finite_or_negative_amax_is_rejected(amax):
    x = torch.randn(4, 32)
    for fn in (hf_nvfp4.quantize_nvfp4, hf_nvfp4.fake_quantize_nvfp4, hf_nvfp4.formats.fake_quantize_fp8_tensor):
        with pytest.raises(ValueError, match="amax must be a finite number >= 0"):
            fn(x, amax=amax)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool, torch.float8_e4m3fn, "float32"])
def test_dequantize_refuses_non_floating_dtypes(dtype):
    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match=r"NVFP4Tensor\.dequantize: dtype must be one of"):
        hf_nvfp4.quantize_nvfp4(x).dequantize(dtype)
    with pytest.raises(TypeError, match=r"BlockQuantized\.dequantize: dtype must be one of"):
        hf_nvfp4.formats.quantize_mxfp4(x).dequantize(dtype)
    assert hf_nvfp4.quantize_nvfp4(x).dequantize(torch.float64).dtype == torch.float64


# -- 13: diagnose() with an empty batch ----------------------------------------------------------
@pytest.mark.parametrize("batch,message", [
    ({"input_ids": torch.zeros(0, 8, dtype=torch.long)}, r"batch\['input_ids'\] is empty \(shape \(0, 8\)\)"),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"batch\['input_ids'\] is empty"),
    ({}, "batch holds no tensor"),
    (torch.zeros(0, 4, dtype=torch.long), r"batch is empty \(shape \(0, 4\)\)"),
    ({"input_ids": torch.zeros(2, 1, dtype=torch.long)}, r"batch\['input_ids'\] has 1 token per sequence"),
])
def test_diagnose_refuses_an_empty_batch(model, batch, message):
    from hf_nvfp4.science.diagnose import diagnose

    with pytest.raises(ValueError, match=rf"diagnose: {message}"):
        diagnose(model, batch, draws=3)
