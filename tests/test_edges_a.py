"""Issue 23 (hard edges, round 3), items 1, 4, 5, 6 and 14: an atomic set_recipe, precision requests
on a model without NVFP4 layers, a switch schedule that cannot take effect, a resumed plugin that
follows its own schedule, and the user guide's Accelerate loop (runnable, resuming bit for bit)."""

import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from models import tiny

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Linear, NVFP4Plugin, PrecisionSwitchCallback
from hf_nvfp4.integrations.switch import LateSwitch

ROOT = Path(__file__).resolve().parents[1]


def _snapshot(model):
    st = model.nvfp4_state
    return {
        "state": st, "recipe": st.recipe, "switch": (st.precision, st.forward_precision), "base": st._base,
        "layers": {n: type(m).__name__ for n, m in model.named_modules()},
        "layer_states": {n: m.nvfp4_state for n, m in model.named_modules() if isinstance(m, NVFP4Linear)},
        "hooks": (dict(model._forward_pre_hooks), dict(model._forward_hooks)),
    }


# -- 1: set_recipe is atomic ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"bf16_first_blocks": 99},  # covers every block: nothing left to convert
    {"modules_to_not_convert": ("no_such_module",)},  # matches nothing
    {"backend": "te"},  # Transformer Engine cannot run here
])
def test_failed_set_recipe_leaves_the_model_exactly_as_it_was(bad):
    model = hf_nvfp4.convert_model(tiny("llama", 4), NVFP4Config(bf16_last_blocks=1))
    hf_nvfp4.set_precision(model, "bf16", scope="forward")  # a switched model: the switch must survive too
    model.eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before, out = _snapshot(model), model(input_ids=ids).logits
    with pytest.raises((ValueError, RuntimeError)):
        hf_nvfp4.set_recipe(model, **bad)
    after = _snapshot(model)
    assert sum(t == "NVFP4Linear" for t in after["layers"].values()) == 7 * 3  # 3 of 4 blocks, 7 Linears each
    assert after == before
    assert torch.equal(model(input_ids=ids).logits, out)
    hf_nvfp4.set_precision(model, "nvfp4")  # still an NVFP4 model: the forward now computes differently
    assert not torch.equal(model(input_ids=ids).logits, out)


# -- 6: every precision request on a model without NVFP4 layers raises ----------------------------------
def test_precision_requests_on_a_plain_model_raise():
    plain = tiny("llama", 2)
    for precision in ("bf16", "nvfp4"):
        with pytest.raises(ValueError, match=r"set_precision.*no NVFP4 layers.*convert_model"):
            hf_nvfp4.set_precision(plain, precision)
    with pytest.raises(ValueError, match="not converted"):
        hf_nvfp4.set_recipe(plain, disable_rht=True)  # the same answer as before: the API agrees
    unconverted = hf_nvfp4.unconvert_model(hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0)))
    with pytest.raises(ValueError, match="no NVFP4 layers"):
        hf_nvfp4.set_precision(unconverted, "bf16")


def test_evaluate_lm_refuses_a_precision_on_a_plain_model():
    from transformers import ByT5Tokenizer

    from hf_nvfp4.integrations.lm_eval import evaluate_lm

    for precision in ("nvfp4", "bf16"):
        with pytest.raises(ValueError, match=rf"evaluate_lm\(precision='{precision}'\).*no NVFP4 layers"):
            evaluate_lm(tiny("llama", 2), ByT5Tokenizer(), "nvfp4_stdlib_ppl", limit=2, precision=precision)


def test_precision_switch_callback_refuses_a_plain_model():
    cb = PrecisionSwitchCallback(0.5)
    with pytest.raises(ValueError, match="PrecisionSwitchCallback.*no NVFP4 layers"):
        cb.bind(SimpleNamespace(model=tiny("llama", 2)))
    state = SimpleNamespace(max_steps=10, global_step=0, is_world_process_zero=True)
    with pytest.raises(ValueError, match="PrecisionSwitchCallback.*no NVFP4 layers"):
        cb.on_train_begin(SimpleNamespace(), state, None, model=tiny("llama", 2))
    converted = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0))
    assert cb.bind(SimpleNamespace(model=converted)) is cb


# -- 5: a switch schedule that cannot take effect ---------------------------------------------------------
def test_schedules_that_never_switch_or_switch_at_step_0_are_refused():
    with pytest.raises(ValueError, match=r"NVFP4Plugin: switch_at=50 .*max_steps=4.*never take effect"):
        NVFP4Plugin(switch_at=50, max_steps=4)
    with pytest.raises(ValueError, match=r"NVFP4Plugin: switch_at=0\.04 of max_steps=10 .*step 0.*switch_at >= 0\.05"):
        NVFP4Plugin(switch_at=0.04, max_steps=10)
    with pytest.raises(ValueError, match=r"switch_at=0\.96 switches after step 10.*max_steps=10"):
        NVFP4Plugin(switch_at=0.96, max_steps=10)  # the nearest step is the last: nothing runs in bf16
    cb = PrecisionSwitchCallback(50)  # the Trainer's max_steps is known at train begin
    state = SimpleNamespace(max_steps=4, global_step=0, is_world_process_zero=True)
    model = hf_nvfp4.convert_model(tiny("llama", 2), NVFP4Config(bf16_last_blocks=0))
    with pytest.raises(ValueError, match=r"PrecisionSwitchCallback: switch_at=50 .*max_steps=4"):
        cb.on_train_begin(SimpleNamespace(), state, None, model=model)
    sw = LateSwitch(tokens=1000)  # a token count, measured from the first batch
    sw.resolve(4)
    with pytest.raises(ValueError, match=r"tokens=1000, tokens_per_step=100 switches after step 10.*max_steps=4"):
        sw.measure(100)


def test_fractional_switch_rounds_to_the_nearest_step_halves_up():
    assert [LateSwitch(f).resolve(10) for f in (0.05, 0.14, 0.15, 0.25, 0.5, 0.85)] == [1, 1, 2, 3, 5, 9]
    assert LateSwitch(0.82).resolve(1000) == 820 and LateSwitch(0.82).resolve(100) == 82
    assert LateSwitch(0).resolve(10) == 0  # an explicit int 0: BF16 from the start, on purpose


# -- 4: a resumed plugin follows its own schedule --------------------------------------------------------
def _plugin_run(tmp, steps, load=None, save=None, **kwargs):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    model = tiny("llama", 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    plugin = NVFP4Plugin(NVFP4Config(bf16_last_blocks=0, disable_stochastic_rounding=True), **kwargs)
    model, opt = plugin.prepare(acc, model, opt)
    if load:
        acc.load_state(str(tmp / load))
    logs = []
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        acc.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
        logs.append(plugin.step())
    if save:
        acc.save_state(str(tmp / save))
    st = model.nvfp4_state
    return plugin, (st.precision, st.forward_precision), logs


def test_resumed_plugin_follows_its_own_schedule_and_says_so(tmp_path, caplog):
    _plugin_run(tmp_path, 3, save="ckpt", switch_at=0.5, max_steps=10)  # switches after step 5
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    plugin, switch, logs = _plugin_run(tmp_path, 1, load="ckpt", switch_at=0.5, max_steps=100)
    assert plugin.switch.switch_step == 50 and switch == ("nvfp4", None)
    assert plugin.completed_steps == 4 and logs == [{}]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"checkpoint \(switch_at=0.5, max_steps=10\) switches after step 5, this plugin "
                     r"\(switch_at=0.5, max_steps=100\) after step 50", msg), msg
    caplog.clear()
    plugin, switch, logs = _plugin_run(tmp_path, 1, load="ckpt", switch_at=2, switch_scope="forward", max_steps=10)
    assert switch == ("nvfp4", "bf16") and plugin.switch.switched  # due at load (step 3 > 2): switched now
    assert "after step 2" in caplog.text and "precision" in caplog.text
    caplog.clear()
    _plugin_run(tmp_path, 3, load="ckpt", save="ckpt6", switch_at=5, max_steps=10)  # the same schedule: silent
    assert "schedule" not in caplog.text
    plugin, switch, logs = _plugin_run(tmp_path, 1, load="ckpt6", switch_at=8, max_steps=10)
    assert switch == ("nvfp4", None) and not plugin.switch.switched  # the checkpoint had switched; this one not yet
    assert "after step 5" in caplog.text and "after step 8" in caplog.text


# -- 14: the loader's order on resume; the user guide's loop ---------------------------------------------
@pytest.mark.parametrize("seedable", [False, True])
def test_plugin_warns_when_the_loader_cannot_resume_its_order(seedable, caplog):
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable))
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True)
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    NVFP4Plugin(NVFP4Config(bf16_last_blocks=0)).prepare(acc, tiny("llama", 2), loader)
    warned = "use_seedable_sampler=True" in caplog.text and "cannot restore its order" in caplog.text
    assert warned != seedable


def test_user_guide_accelerate_loop_runs_and_resumes_bit_for_bit(tmp_path):
    """The guide's loop is a whole script: it trains, saves, resumes in fresh objects and checks itself."""
    text = (ROOT / "docs" / "user-guide.md").read_text()
    section = text[text.index("## Your own loop with Accelerate"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "use_seedable_sampler=True" in code and "load_state" in code and "set_epoch" in code
    (tmp_path / "my_loop.py").write_text(code)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "my_loop.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed bit for bit" in res.stdout
    assert "cannot restore its order" not in res.stderr
    assert (tmp_path / "runs" / "my-loop" / "step-6" / "custom_checkpoint_0.pkl").exists()


def test_resumed_plugin_without_a_switch_drops_the_checkpoints(tmp_path, caplog):
    _plugin_run(tmp_path, 3, save="ckpt", switch_at=2, max_steps=10)  # switched after step 2
    caplog.set_level(logging.WARNING, logger="hf_nvfp4")
    plugin, switch, logs = _plugin_run(tmp_path, 1, load="ckpt")  # no switch_at: this plugin never switches
    assert switch == ("nvfp4", None) and plugin.completed_steps == 4
    assert "switches after step 2, this plugin (no switch" in caplog.text
    caplog.clear()
    plugin, switch, logs = _plugin_run(tmp_path, 1, load="ckpt", switch_at=2, max_steps=10)  # the same: silent
    assert switch == ("bf16", None) and not caplog.text
