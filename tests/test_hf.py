"""from_pretrained / save_pretrained / from_config / Trainer with NVFP4Config."""

import json
import subprocess
import sys

import pytest
import torch
from models import tiny
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny("llama", 4).save_pretrained(d)
    return d


def test_from_pretrained_converts_and_keeps_weights(saved_dir):
    plain = AutoModelForCausalLM.from_pretrained(saved_dir)
    model = AutoModelForCausalLM.from_pretrained(saved_dir, quantization_config=NVFP4Config(bf16_last_blocks=1))
    assert sum(isinstance(m, NVFP4Linear) for m in model.modules()) == 3 * 7
    sd, ref = model.state_dict(), plain.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable


def test_save_reload_roundtrip_and_dequantize(saved_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_dir, quantization_config=NVFP4Config(disable_rht=True, seed=3))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "hf_nvfp4"
    assert cfg["quantization_config"]["disable_rht"] is True
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.config.quantization_config, NVFP4Config)
    assert again.config.quantization_config.disable_rht and again.config.quantization_config.seed == 3
    assert any(isinstance(m, NVFP4Linear) for m in again.modules())
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain = again.dequantize()
    assert not any(isinstance(m, NVFP4Linear) for m in plain.modules())
    assert not hasattr(plain.config, "quantization_config") or plain.config.quantization_config is None


def test_loading_without_the_plugin_says_what_is_missing(saved_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(saved_dir, quantization_config=NVFP4Config()).save_pretrained(tmp_path)
    # transformers warns and loads the plain master weights as an ordinary (unconverted) model
    code = (
        "import sys; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}); "
        "assert 'hf_nvfp4' not in sys.modules; "
        "print(sorted({type(x).__name__ for x in m.modules() if 'Linear' in type(x).__name__}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Unknown quantization type, got hf_nvfp4" in out.stderr
    assert out.stdout.strip().endswith("['Linear']")


def test_from_config_is_the_same_kind_of_model():
    model = hf_nvfp4.from_config(tiny("qwen2", 2).config, NVFP4Config())
    assert model.hf_quantizer is not None and model.config.quantization_config.quant_method == "hf_nvfp4"
    assert any(isinstance(m, NVFP4Linear) for m in model.modules())
    with pytest.raises(TypeError, match="nvfp4_config"):
        hf_nvfp4.from_config(model.config, quantization_config=NVFP4Config())
    with pytest.raises(TypeError, match="NVFP4Config"):
        hf_nvfp4.from_config(model.config, {"disable_rht": True})


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, n=64, seq=32):
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 256, (8, seq), generator=g)
        self.items = [base[i % 8] for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def test_trainer_trains_the_converted_model(saved_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved_dir, quantization_config=NVFP4Config())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        report_to=[],
        use_cpu=True,
        bf16=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Repeat())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.75 * losses[0], losses
    grads_seen = [m.weight for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert grads_seen and all(w.requires_grad for w in grads_seen)
