"""Late precision switch and the FP8 shadow run: logs, resume, reference mode, errors."""

import json
import shutil

import pytest
import torch
from models import tiny
from transformers import Trainer, TrainingArguments

import hf_nvfp4
from hf_nvfp4 import FP8ShadowCallback, NVFP4Config, NVFP4Linear, PrecisionSwitchCallback
from hf_nvfp4.integrations.callbacks import parse_tokens


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=80, seq=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(out, callbacks, max_steps=20):
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(tiny("llama", 4).config, NVFP4Config(bf16_last_blocks=1))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=5,
        save_strategy="steps",
        save_steps=10,
        report_to=[],
        use_cpu=True,
        bf16=True,
        seed=0,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    return Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    shadow = FP8ShadowCallback()
    tr = _trainer(out, [PrecisionSwitchCallback(0.5), shadow])
    tr.train()
    return out, tr, shadow


def test_switch_and_shadow_logs(full_run):
    out, tr, shadow = full_run
    hist = tr.state.log_history
    switch = [h for h in hist if "precision_switch_step" in h]
    assert len(switch) == 1 and switch[0]["precision_switch_step"] == 10
    layers = [m for m in tr.model.modules() if isinstance(m, NVFP4Linear)]
    assert layers and all(m.precision == "bf16" for m in layers)
    gaps = [h for h in hist if "loss_gap_vs_fp8" in h]
    assert [h["step"] for h in gaps] == [5, 10, 15, 20]
    for h in gaps:
        assert set(h) >= {"shadow_fp8_loss", "loss_gap_vs_fp8", "loss_gap_vs_fp8_smoothed"}
        assert abs(h["loss_gap_vs_fp8"]) < 0.2  # same model, same batches: a small gap
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    assert any("loss_gap_vs_fp8" in h for h in state["log_history"])
    assert (out / "checkpoint-10" / "nvfp4_shadow.pt").exists()
    # the SR stream needs no side file: it follows torch's generator, which the Trainer saves
    assert not (out / "checkpoint-10" / "nvfp4_sr_rng.pt").exists()
    # the shadow runs the paper's FP8 baseline numerics
    fmts = {m.precision for m in shadow.shadow.modules() if isinstance(m, NVFP4Linear)}
    assert fmts == {"fp8_block"}


def test_resume_from_step_10_is_bit_identical(full_run, tmp_path):
    out, tr, shadow = full_run
    shutil.copytree(out / "checkpoint-10", tmp_path / "checkpoint-10")
    shadow2 = FP8ShadowCallback()
    tr2 = _trainer(tmp_path, [PrecisionSwitchCallback(0.5), shadow2])
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    a, b = _weights(tr.model), _weights(tr2.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _weights(shadow.shadow), _weights(shadow2.shadow)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(m.precision == "bf16" for m in tr2.model.modules() if isinstance(m, NVFP4Linear))


def test_shadow_file_is_weights_only_and_a_planted_pickle_never_runs(full_run, tmp_path):
    out, _, _ = full_run
    ckpt = tmp_path / "checkpoint-10"
    shutil.copytree(out / "checkpoint-10", ckpt)
    blob = torch.load(ckpt / "nvfp4_shadow.pt", weights_only=True)  # what is saved is plain data
    assert set(blob) >= {"model", "optimizer", "scheduler", "ema", "pending", "sr"}
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Evil()}, ckpt / "nvfp4_shadow.pt")
    torch.load(ckpt / "nvfp4_shadow.pt", weights_only=False)  # the payload is real: it runs here
    assert marker.exists()
    marker.unlink()
    tr = _trainer(tmp_path, [FP8ShadowCallback()])
    with pytest.raises(ValueError, match=r"nvfp4_shadow.pt.*weights_only=True"):
        tr.train(resume_from_checkpoint=str(ckpt))
    assert not marker.exists()


def test_resume_before_the_switch_switches_later(full_run, tmp_path):
    out, tr, _ = full_run
    shutil.copytree(out / "checkpoint-10", tmp_path / "checkpoint-10")
    cb = PrecisionSwitchCallback(15)
    tr2 = _trainer(tmp_path, [cb])
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    new = [h for h in tr2.state.log_history if h["step"] > 10]  # the rest came with the checkpoint
    assert [h["precision_switch_step"] for h in new if "precision_switch_step" in h] == [15]


def test_reference_mode(full_run, tmp_path):
    out, tr, _ = full_run
    ref = out / "checkpoint-20" / "trainer_state.json"
    tr3 = _trainer(tmp_path, [PrecisionSwitchCallback(0.5), FP8ShadowCallback("reference", reference=ref)])
    tr3.train()
    gaps = [h["loss_gap_vs_fp8"] for h in tr3.state.log_history if "loss_gap_vs_fp8" in h]
    assert len(gaps) == 4 and all(g == 0.0 for g in gaps)  # same seeds: the run equals its reference
    csv = tmp_path / "ref.csv"
    csv.write_text("step,tokens,loss\n5,640,2.0\n15,1920,1.0\n")
    cb = FP8ShadowCallback("reference", reference=csv)
    assert cb.reference_at(5) == 2.0 and cb.reference_at(10) == 1.5 and cb.reference_at(20) is None


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FP8ShadowCallback("reference", reference=tmp_path / "missing.json")
    empty = tmp_path / "trainer_state.json"
    empty.write_text(json.dumps({"log_history": [{"step": 1, "learning_rate": 0.1}]}))
    with pytest.raises(ValueError, match="no loss entries"):
        FP8ShadowCallback("reference", reference=empty)
    with pytest.raises(ValueError, match="needs reference"):
        FP8ShadowCallback("reference")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        PrecisionSwitchCallback(1.5)
    with pytest.raises(ValueError, match="token count"):
        PrecisionSwitchCallback("soon")
    with pytest.raises(ValueError, match="exactly one"):
        PrecisionSwitchCallback()
    with pytest.raises(ValueError, match="mode"):
        FP8ShadowCallback("sometimes")
    assert parse_tokens("8.2T") == 8_200_000_000_000 and parse_tokens("500M") == 500_000_000
    cb = PrecisionSwitchCallback(tokens="1M", tokens_per_step=2**16)
    assert cb.tokens == 1_000_000


def test_parity_plot(full_run, tmp_path):
    from hf_nvfp4.science.plots import plot_loss_parity

    out, _, _ = full_run
    png = plot_loss_parity(out / "checkpoint-20", tmp_path / "parity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no shadow_bf16_loss"):
        plot_loss_parity(out / "checkpoint-20", tmp_path / "x.png", tag="bf16")


def test_recipe_maps_onto_callbacks():
    from hf_nvfp4.recipe import load_recipe
    from hf_nvfp4.train import callbacks_from_recipe

    cbs = callbacks_from_recipe(
        load_recipe(
            "tiny-cpu", ["precision_switch.at=0.82", "precision_switch.scope=forward", "fp8_shadow.enabled=true"]
        )
    )
    assert [type(c).__name__ for c in cbs] == ["PrecisionSwitchCallback", "FP8ShadowCallback"]
    assert cbs[0].fraction == 0.82 and cbs[0].scope == "forward"
    assert callbacks_from_recipe(load_recipe("tiny-cpu")) == []  # resume needs no callback


def test_quant_health_statistics(tmp_path):
    from hf_nvfp4.integrations.callbacks import QuantHealthCallback, weight_health

    model = hf_nvfp4.convert_model(torch.nn.Sequential(torch.nn.Linear(64, 64)))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 64))
        model[0].weight[0, :16] = 1e-6  # a tile's tiny values next to large ones underflow
        model[0].weight[0, 16] = 50.0
    stats = weight_health(model)
    assert stats["nvfp4_health/weight_underflow_max"] > 0
    # random tiles: a few blocks whose E4M3 scale rounds down clamp their largest element
    assert 0 < stats["nvfp4_health/weight_saturated_mean"] < 0.05
    with torch.no_grad():
        model[0].weight.fill_(0.5)  # amax 0.5: every block scale is exactly 448, nothing clamps or underflows
    assert weight_health(model)["nvfp4_health/weight_saturated_max"] == 0
    assert weight_health(model)["nvfp4_health/weight_underflow_max"] == 0
    tr = _trainer(tmp_path, [QuantHealthCallback(every_n_steps=5)], max_steps=10)
    tr.args.save_strategy = "no"
    tr.train()
    logged = [h["step"] for h in tr.state.log_history if "nvfp4_health/weight_underflow_mean" in h]
    assert logged == [5, 10] and [h["step"] for h in tr.state.log_history if "loss" in h] == [5, 10]
    with pytest.raises(ValueError, match="every_n_steps"):
        QuantHealthCallback(0)
