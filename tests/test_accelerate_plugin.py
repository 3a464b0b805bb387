"""NVFP4Plugin: conversion like from_config, bit-identical save_state/load_state resume with SR,
the late-switch and shadow keys, clear errors, no unpickling of planted files, DDP and FSDP2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from launch import run_script
from models import tiny
from test_te_backend import standin  # noqa: F401 - the TE stand-in fixture
from transformers import AutoModelForCausalLM

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, NVFP4Plugin

ROOT = Path(__file__).resolve().parents[1]
CFG = NVFP4Config(bf16_last_blocks=1)  # SR, RHT and 2D scaling on: the paper's recipe


def _accelerator(**kwargs) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kwargs)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=32):
        self.x = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _setup(**plugin_kwargs):
    """Fresh process objects: accelerator, model, optimizer, scheduler, loader, plugin."""
    acc = _accelerator(mixed_precision="bf16")
    model = tiny("llama", 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    loader = torch.utils.data.DataLoader(_Data(), batch_size=4)  # no generator of its own: draws from torch's
    plugin = NVFP4Plugin(CFG, **plugin_kwargs)
    model, opt, loader, sched = plugin.prepare(acc, model, opt, loader, sched)
    return acc, plugin, model, opt, sched, loader


def _train(acc, plugin, model, opt, sched, loader, steps):
    losses, logs = [], []
    batches = acc.skip_first_batches(loader, plugin.completed_steps) if plugin.completed_steps else loader
    for batch in batches:
        loss = model(**batch).loss
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        logs.append(plugin.step(batch=batch, loss=loss))
        losses.append(loss.item())
        if len(losses) == steps:
            return losses, logs


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


PLUGIN = dict(switch_at=1 / 3, switch_scope="forward", max_steps=6, fp8_shadow=True, log_every=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    full = _setup(**PLUGIN)
    losses, logs = _train(*full, 6)
    first = _setup(**PLUGIN)
    _train(*first, 3)
    first[0].save_state(str(tmp / "step-3"))
    again = _setup(**PLUGIN)  # fresh objects, as in a new process
    again[0].load_state(str(tmp / "step-3"))
    assert again[1].completed_steps == 3
    switched = {m.forward_precision for m in again[2].modules() if isinstance(m, NVFP4Linear)}
    losses2, logs2 = _train(*again, 3)
    return {"tmp": tmp, "full": full, "losses": losses, "logs": logs, "again": again, "losses2": losses2,
            "logs2": logs2, "switched_after_load": switched}


def test_resume_is_bit_identical_with_sr(runs):
    full, again = runs["full"], runs["again"]
    assert full[2].nvfp4_state.uses_stochastic()  # SR is on (the backward still runs NVFP4)
    assert runs["switched_after_load"] == {"bf16"}  # the switch (at step 2) came back with load_state
    assert runs["losses"][3:] == runs["losses2"]
    assert runs["logs"][3:] == runs["logs2"]  # switch/shadow metrics too, EMA and pending losses included
    a, b = _weights(full[2]), _weights(again[2])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _weights(full[1].shadow.model), _weights(again[1].shadow.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_switch_and_shadow_keys_at_the_right_steps(runs):
    logs = runs["logs"]
    assert [i + 1 for i, m in enumerate(logs) if "precision_switch_step" in m] == [2]
    assert logs[1]["precision_switch_step"] == 2.0
    shadow = [i + 1 for i, m in enumerate(logs) if "loss_gap_vs_fp8" in m]
    assert shadow == [2, 4, 6]  # log_every=2
    losses = runs["losses"]
    for step in shadow:
        m = logs[step - 1]
        assert set(m) >= {"shadow_fp8_loss", "loss_gap_vs_fp8", "loss_gap_vs_fp8_smoothed"}
        main = (losses[step - 2] + losses[step - 1]) / 2  # the mean over the reported steps
        assert m["loss_gap_vs_fp8"] == pytest.approx((main - m["shadow_fp8_loss"]) / m["shadow_fp8_loss"])
        assert abs(m["loss_gap_vs_fp8"]) < 0.05  # same model, same batches
    model, shadow_model = runs["full"][2], runs["full"][1].shadow.model
    assert {m.forward_precision for m in model.modules() if isinstance(m, NVFP4Linear)} == {"bf16"}
    assert {m.precision for m in shadow_model.modules() if isinstance(m, NVFP4Linear)} == {"fp8_block"}
    # the shadow follows the learning rate the model's optimizer stepped with: warmup from 1e-3 to 3e-3
    assert [g["lr"] for g in runs["full"][1].shadow.optimizer.param_groups] == [pytest.approx(3e-3)]


def test_checkpoint_file_is_weights_only_and_a_planted_pickle_never_runs(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(runs["tmp"] / "step-3", ckpt)
    state = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)  # plain tensors/ints/strings
    assert state["completed_steps"] == 3 and state["switch"]["switched"]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"version": 1, "x": Evil()}, ckpt / "custom_checkpoint_0.pkl")
    torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)  # the payload is real: it runs here
    assert marker.exists()
    marker.unlink()
    fresh = _setup(**PLUGIN)
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl.*weights_only=True"):
        fresh[0].load_state(str(ckpt))
    assert not marker.exists()


def test_prepare_converts_like_from_config():
    cfg = tiny("llama", 4).config
    ref = hf_nvfp4.from_config(cfg, CFG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    plain_keys = list(model.state_dict())
    acc = _accelerator(mixed_precision="bf16")
    out = NVFP4Plugin(CFG).prepare(acc, model)
    assert out is model  # one object in, what accelerator.prepare returns out

    def converted(m):
        return {n: (m.backend, m.precision) for n, m in m.named_modules() if isinstance(m, NVFP4Linear)}

    assert converted(out) == converted(ref) and 0 < len(converted(out)) < sum(
        isinstance(m, torch.nn.Linear) for m in out.modules()
    )
    assert out.nvfp4_state.recipe == ref.nvfp4_state.recipe == CFG.to_recipe()
    assert out.config.quantization_config.quant_method == "hf_nvfp4"  # same kind of model: the quantizer attached
    assert list(out.state_dict()) == plain_keys


def test_prepare_returns_what_accelerate_returns():
    acc = _accelerator()
    model = tiny("llama", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_Data(8), batch_size=4)
    out = NVFP4Plugin(NVFP4Config(bf16_last_blocks=0)).prepare(acc, model, opt, loader)
    assert isinstance(out, tuple) and len(out) == 3
    assert [type(o).__name__ for o in out] == ["LlamaForCausalLM", "AcceleratedOptimizer", "DataLoaderShard"]


def test_accelerate_fp8_is_refused(monkeypatch):
    # Accelerate builds an fp8 Accelerator only where TE (or MS-AMP/torchao) is installed; here its
    # availability checks are patched so the real fp8 Accelerator (TE backend) is built.
    import accelerate.accelerator
    import accelerate.state
    import accelerate.utils.dataclasses

    monkeypatch.setattr(accelerate.state, "is_fp8_available", lambda: True)
    monkeypatch.setattr(accelerate.accelerator, "is_transformer_engine_available", lambda: True)
    monkeypatch.setattr(accelerate.utils.dataclasses, "is_transformer_engine_available", lambda: True)
    acc = _accelerator(mixed_precision="fp8")
    assert acc.mixed_precision == "fp8"
    model = tiny("llama", 2)
    with pytest.raises(ValueError, match=r"mixed_precision='fp8'.*mixed_precision='bf16'"):
        NVFP4Plugin(CFG).prepare(acc, model)
    assert not any(isinstance(m, NVFP4Linear) for m in model.modules())  # refused before touching the model


def test_prewrapped_models_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    acc = _accelerator(mixed_precision="bf16")
    prepared = acc.prepare(tiny("llama", 2))
    with pytest.raises(ValueError, match="already prepared by this Accelerator"):
        NVFP4Plugin(CFG).prepare(acc, prepared)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="converted before Accelerate wraps it.*DistributedDataParallel"):
            NVFP4Plugin(CFG).prepare(_accelerator(), DistributedDataParallel(tiny("llama", 2)))
        sharded = tiny("llama", 2)
        fully_shard(sharded)
        with pytest.raises(ValueError, match="fully_shard"):
            NVFP4Plugin(CFG).prepare(_accelerator(), sharded)
    finally:
        dist.destroy_process_group()


def test_other_errors():
    with pytest.raises(ValueError, match="pass max_steps"):
        NVFP4Plugin(CFG, switch_at=0.82)
    with pytest.raises(ValueError, match=r"NVFP4Plugin: scope must be one of"):
        NVFP4Plugin(CFG, switch_at=10, switch_scope="sideways")
    with pytest.raises(RuntimeError, match="call plugin.prepare"):
        NVFP4Plugin(CFG).step()
    acc = _accelerator()
    with pytest.raises(ValueError, match="exactly one model"):
        NVFP4Plugin(CFG).prepare(acc, torch.utils.data.DataLoader(_Data(4)))
    model = tiny("llama", 4)
    with pytest.raises(ValueError, match="pass exactly one optimizer"):
        NVFP4Plugin(CFG, fp8_shadow=True).prepare(acc, model)
    other = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0, disable_rht=True))
    with pytest.raises(ValueError, match="another recipe.*disable_rht"):
        NVFP4Plugin(CFG).prepare(acc, other)
    plugin = NVFP4Plugin(None)  # keeps the model's own recipe
    plugin.prepare(acc, other)
    assert plugin.recipe.disable_rht and other.nvfp4_state.recipe.disable_rht
    with pytest.raises(RuntimeError, match="called already"):
        plugin.prepare(acc, tiny("llama", 2))


def test_gradient_accumulation_counts_optimizer_steps():
    acc = _accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    model = tiny("llama", 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_Data(16), batch_size=4)
    plugin = NVFP4Plugin(CFG, switch_at=1, fp8_shadow=True)
    model, opt, loader = plugin.prepare(acc, model, opt, loader)
    logs = []
    for batch in loader:
        with acc.accumulate(model):
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            logs.append(plugin.step(batch=batch, loss=loss))
    assert plugin.completed_steps == 2
    assert [sorted(m) for m in logs] == [
        [],
        ["loss_gap_vs_fp8", "loss_gap_vs_fp8_smoothed", "precision_switch_step", "shadow_fp8_loss"],
        [],
        ["loss_gap_vs_fp8", "loss_gap_vs_fp8_smoothed", "shadow_fp8_loss"],
    ]


def test_sr_stream_does_not_depend_on_the_process():
    """A resumed run lives in a new process: the SR generators must not depend on str hashing."""
    code = (
        "import torch, hf_nvfp4\n"
        "def draws():\n"
        "    st = hf_nvfp4.NVFP4State(hf_nvfp4.NVFP4Recipe(), rank=1)\n"
        "    st.draw_generator = torch.Generator().manual_seed(5)\n"
        "    st.begin_forward()\n"
        "    return torch.rand(4, generator=st.generator(torch.device('cpu'))).tolist()\n"
    )
    here: dict = {}
    exec(code, here)  # this process
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # another str hash than this process's
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code + "print(draws())\n"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == str(here["draws"]())


def _example(tmp_path, name, batch, launcher=None, steps=4):
    out = tmp_path / name
    args = ["--max-steps", str(steps), "--batch-size", str(batch), "--seq-len", "64", "--hidden", "64",
            "--layers", "2", "--max-files", "4", "--warmup", "2", "--log-every", "1", "--switch-at", "0.5",
            "--output-dir", str(out), "--losses-json", str(tmp_path / f"{name}.json")]
    res = run_script(ROOT / "examples" / "accelerate_loop.py", args, cwd=tmp_path, pythonpath=ROOT,
                     accelerate_config=launcher)
    run = json.loads((tmp_path / f"{name}.json").read_text())
    run["stdout"] = res.stdout
    return run


def test_example_ddp_two_processes_matches_one(tmp_path):
    one = _example(tmp_path, "one", 8)
    ddp = _example(tmp_path, "ddp", 4, launcher="cpu_ddp.yaml")
    assert one["world_size"] == 1 and ddp["world_size"] == 2
    a, b = [x for _, x in one["losses"]], [x for _, x in ddp["losses"]]
    assert len(a) == len(b) == 4
    # the same global batch of 8; each rank draws its own SR stream and takes its own activation
    # amax over 4 sequences: within 2% of the loss at every step
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 0.02 * x, (a, b)
    assert "precision_switch_step=2" in ddp["stdout"]
    assert ddp["stdout"].count("precision_switch_step") == 1  # printed by the main process only
    saved = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "hf_nvfp4"


def test_fsdp2_through_the_plugin_on_cpu(tmp_path):
    """Accelerate's own FSDP2 preparation (fsdp2_prepare_model), with the distributed type it
    refuses on CPU forced, on 2 gloo processes, against one process (see tests/fsdp2_plugin.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    script = str(ROOT / "tests" / "fsdp2_plugin.py")
    res = subprocess.run([sys.executable, script, str(tmp_path / "one.json")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", script, str(tmp_path / "two.json")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["param_type"] == "DTensor" and two["world"] == 2 and two["fsdp2_modules"] > 0 == one["fsdp2_modules"]
    assert two["converted"] == one["converted"] > 0
    assert two["switch_steps"] == one["switch_steps"] == [3]
    assert two["sr_ranks"] == [0, 1] and two["sr_bases_distinct"]  # each process draws its own SR stream
    for x, y in zip(one["losses"] + one["shadow_losses"], two["losses"] + two["shadow_losses"], strict=True):
        assert abs(x - y) <= 0.02 * x, (one, two)  # the model and its FP8 shadow


def test_plugin_on_the_te_standin(standin):  # noqa: F811 - the fixture imported above
    """With the TE STAND-IN (tests/te_standin, not Transformer Engine) on a pretended Blackwell, the
    plugin converts through the shared path, so backend="auto" picks TE as convert_model does, and
    a custom loop with the late switch and the FP8 shadow computes what the emulated backend
    computes (to the GEMM output's rounding), through te.Linear calls with the expected TE recipes."""
    runs = {}
    for backend in ("auto", "emulated"):
        acc = _accelerator(mixed_precision="bf16")
        model = tiny("llama", 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = NVFP4Config(bf16_last_blocks=0, disable_stochastic_rounding=True, backend=backend)
        plugin = NVFP4Plugin(cfg, switch_at=1, switch_scope="forward", fp8_shadow=True)
        model, opt = plugin.prepare(acc, model, opt)
        standin.linear.CALLS.clear()
        calls, logs, grads = [], [], []
        for step in range(2):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            batch = {"input_ids": ids, "labels": ids}
            loss = model(**batch).loss
            acc.backward(loss)
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
            logs.append(plugin.step(batch=batch, loss=loss))
            calls.append(sorted({c for c, _ in standin.linear.CALLS}))
            standin.linear.CALLS.clear()
        layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
        runs[backend] = (logs, grads, {m.backend for m in layers}, calls)
    (logs, g, backends, calls), (elogs, eg, ebackends, ecalls) = runs["auto"], runs["emulated"]
    assert backends == {"te"} and ebackends == {"emulated"}
    # step 1: NVFP4 on TE (+ the FP8 shadow on TE); step 2, after the forward-only switch: CustomRecipe
    assert calls == [["Float8BlockScaling", "NVFP4BlockScaling"], ["CustomRecipe", "Float8BlockScaling"]]
    assert ecalls == [["Float8BlockScaling"], ["Float8BlockScaling"]]  # the emulated run's shadow: TE too
    # Not bit-equal: the stand-in rounds its GEMM output once after an fp32 GEMM (as cuBLAS does),
    # the emulation's bf16 GEMM rounds before scaling; the quantized operands are bit-identical
    # (test_te_backend.test_standin_operands_are_the_emulations). So the same run agrees to rounding.
    assert logs[0]["precision_switch_step"] == 1.0 and [log.keys() for log in logs] == [log.keys() for log in elogs]
    for log, elog in zip(logs, elogs, strict=True):
        assert log["shadow_fp8_loss"] == elog["shadow_fp8_loss"]  # the FP8 shadow runs on TE in both
        loss, eloss = log["shadow_fp8_loss"] + log["loss_gap_vs_fp8"], elog["shadow_fp8_loss"] + elog["loss_gap_vs_fp8"]
        assert abs(loss - eloss) <= 1e-3 * eloss, (logs, elogs)
    # Gradients: a one-ulp difference in a GEMM output moves some elements of the next layer's input
    # across an E2M1 rounding boundary, so whole-model gradients differ by FP4 quantization noise
    # (layer by layer, with a fixed upstream gradient, test_te_backend checks them to rounding). What
    # must hold end to end: both backends' gradients point the same way and have the same size (a
    # wrong transpose, missing RHT inverse or wrong scale would not).
    cos = [torch.nn.functional.cosine_similarity(a[k].double().flatten(), b[k].double().flatten(), dim=0).item()
           for a, b in zip(g, eg, strict=True) for k in a]
    ratio = [(a[k].double().norm() / b[k].double().norm()).item() for a, b in zip(g, eg, strict=True) for k in a]
    print("gradient cosine, norm ratio between the backends:", min(cos), min(ratio), max(ratio))
    assert len(cos) == 2 * len(g[0]) and min(cos) >= 0.8 and 0.8 <= min(ratio) <= max(ratio) <= 1.25


def test_fsdp2_save_state_load_state_resumes_bit_for_bit_and_on_another_world_size(tmp_path):
    """Accelerate's FSDP2 save_state/load_state (forced on CPU as above; sharded distributed checkpoint):
    2 processes resume bit for bit; 1 FSDP2 process resumes the same checkpoint through the distributed
    checkpoint (resharded), within 2% of the loss; a non-FSDP Accelerator is refused, naming what to do."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    script = str(ROOT / "tests" / "fsdp2_resume.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551"]
    one = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29553")  # what torchrun would set for one process, without its agent
    for cmd, extra in ((torchrun + [script, "run"], {}), ([sys.executable, script, "resume-fsdp"], one)):
        res = subprocess.run(cmd + [str(tmp_path)], env={**env, **extra}, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((tmp_path / "run.json").read_text())
    full, again = run["full"], run["resumed"]
    assert full["param_type"] == again["param_type"] == "DTensor" and full["world"] == again["world"] == 2
    assert (tmp_path / "ckpt" / "pytorch_model_fsdp_0").is_dir()  # accelerate's sharded distributed checkpoint
    assert again["steps"] == 6 and again["losses"] == full["losses"][3:]
    assert again["logs"] == full["logs"][3:]  # shadow metrics too (the switch fired at step 3, before the save)
    assert full["logs"][2]["precision_switch_step"] == 3.0
    assert again["weights"] == full["weights"] and again["shadow"] == full["shadow"]  # sha256 of every tensor
    one = json.loads((tmp_path / "resume-fsdp_1.json").read_text())["resumed"]
    assert one["world"] == 1 and one["param_type"] == "DTensor" and one["steps"] == 6
    for x, y in zip(full["losses"][3:], one["losses"], strict=True):
        assert abs(x - y) <= 0.02 * x, (full["losses"], one["losses"])
    acc = _accelerator(mixed_precision="bf16")  # one process without FSDP: a clear error, nothing loaded
    model = tiny("llama", 4)
    NVFP4Plugin(CFG, switch_at=0.5, max_steps=6, fp8_shadow=True).prepare(acc, model, torch.optim.AdamW(
        model.parameters()))
    with pytest.raises(ValueError, match=r"saved under FSDP.*not FSDP.*FSDP Accelerator.*merge-weights"):
        acc.load_state(str(tmp_path / "ckpt"))
