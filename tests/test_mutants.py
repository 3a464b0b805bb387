"""Tests written to kill hand-made mutations that used to survive the suite (issue 28).

Each test checks a value against an independent computation (a hand-computed case or plain
torch/numpy), so the plausible one-line bug named in its docstring makes it fail.
``tools/mutate.py`` applies those mutations to a copy of the tree and checks they are killed.
"""

import json
import math

import pytest
import torch
import torch.nn as nn
from models import tiny
from transformers import ByT5Tokenizer

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, NVFP4Recipe, PrecisionSwitchCallback, evaluate_lm, get_format
from hf_nvfp4.config import paper_fp8_bf16_blocks
from hf_nvfp4.integrations.shadow_run import ShadowRun


# --------------------------------------------------------------------------- lm-eval: trailing whitespace
def test_lm_eval_moves_a_contexts_trailing_whitespace_into_the_continuation(tmp_path):
    """lm-eval's convention: a context ending in whitespace is scored as context.rstrip() followed
    by (the whitespace + the continuation). Dropping the whitespace, or leaving it in the context,
    changes every such score; the perplexity metric of a loglikelihood task exposes the sum."""
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=0))
    model.config.max_position_embeddings = 256
    hf_nvfp4.set_precision(model, "bf16")  # batch-independent numerics: the subject is tokenization
    model.eval()
    docs = [{"context": "def f(x): ", "target": "return x"}, {"context": "a = 1\n", "target": "b = 2"},
            {"context": "import os  ", "target": "sys"}]
    (tmp_path / "ws.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "ws_ll.yaml").write_text(
        f"task: ws_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ws.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "target_delimiter: ''\nshould_decontaminate: false\nmetric_list:\n  - metric: perplexity\n"
        "metadata:\n  version: 1.0\n"
    )
    # by hand: ByT5 ids are bytes + 3, no special tokens; the whitespace is scored with the target
    lls = []
    for d in docs:
        ctx = d["context"].rstrip()
        cont = d["context"][len(ctx):] + d["target"]
        c, t = [b + 3 for b in ctx.encode()], [b + 3 for b in cont.encode()]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([c + t])).logits[0].float(), -1)
        lls.append(sum(lp[len(c) - 1 + j, tok].item() for j, tok in enumerate(t)))
    want = math.exp(-sum(lls) / len(lls))  # lm-eval's perplexity aggregation of per-doc log-likelihoods
    res = evaluate_lm(model, ByT5Tokenizer(), ["ws_ll"], include_path=tmp_path, batch_size=1)
    assert res["results"]["ws_ll"]["perplexity,none"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- the smoothed shadow gap
def test_shadow_gap_and_its_ema_against_hand_computed_values():
    """gap = (loss - shadow) / shadow; ema = s * ema + (1 - s) * gap. A sign flip of the gap or
    swapped EMA weights give other numbers."""
    run = ShadowRun("fp8_block", smoothing=0.9)
    k_loss, k_gap, k_ema = run.keys
    run.pending = [2.0]
    first = run.report(2.2)
    assert first[k_loss] == pytest.approx(2.0) and first[k_gap] == pytest.approx(0.1)
    assert first[k_ema] == pytest.approx(0.1)  # the EMA starts at the first gap
    run.pending = [2.0, 4.0]  # two shadow steps since the last report: their mean is the reference
    second = run.report(2.7)
    assert second[k_loss] == pytest.approx(3.0) and second[k_gap] == pytest.approx(-0.1)
    assert second[k_ema] == pytest.approx(0.9 * 0.1 + 0.1 * -0.1)  # 0.08
    assert run.report(1.0) is None  # no shadow step since the last report


# --------------------------------------------------------------------------- fractional switch step
@pytest.mark.parametrize("frac, max_steps, step", [(0.87, 10, 9), (0.82, 10, 8), (0.5, 3, 2), (0.4, 7, 3)])
def test_fractional_switch_step_is_rounded_to_nearest(frac, max_steps, step):
    """switch_step = round(switch_at * max_steps): 8.7 -> 9 (not floor's 8), 8.2 -> 8 (not ceil's 9)."""
    assert PrecisionSwitchCallback(switch_at=frac).resolve(max_steps) == step


# --------------------------------------------------------------------------- SR noise per layer
class _Twins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_converted_layers_draw_distinct_sr_noise_within_one_step():
    """After convert_model, two layers with the same weights and the same input in one
    forward/backward get different stochastic rounding (one generator shared in a fixed order):
    their Wgrad differs, while with SR off it is identical."""
    x, g = torch.randn(32, 64), torch.randn(32, 64)
    grads = {}
    for sr_off in (False, True):
        torch.manual_seed(0)
        model = hf_nvfp4.convert_model(_Twins(), NVFP4Config(bf16_last_blocks=0, disable_stochastic_rounding=sr_off))
        model.train()
        (model(x) * g).sum().backward()
        grads[sr_off] = (model.a.weight.grad, model.b.weight.grad)
    assert torch.equal(*grads[True])  # the same GEMMs without SR: identical
    assert not torch.equal(*grads[False])
    assert model.a.nvfp4_state is model.b.nvfp4_state is model.nvfp4_state


# --------------------------------------------------------------------------- -0.0
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_negative_zero_quantizes_to_plus_zero_bit_for_bit(name):
    """TE's codes: -0.0 becomes code 0 (+0). fake_quantize must give the same bits as
    dequantize(quantize), so it too returns +0.0 for -0.0; a tiny negative that rounds to zero
    keeps its sign (code 8, -0.0) in both."""
    fmt = get_format(name)
    x = torch.zeros(2, 32)
    x[0, 0] = 1.0
    x[0, 1] = -0.0
    x[1, :] = -0.0
    x[1, 2] = 6.0
    x[1, 3] = -1e-4  # rounds to zero within its block
    fq, dq = fmt.fake_quantize(x), fmt.quantize(x).dequantize(torch.float32)
    assert torch.equal(fq.view(torch.int32), dq.view(torch.int32))
    bits = fq.view(torch.int32)
    assert bits[0, 1] == 0 and bits[1, 0] == 0 and bits[1, 31] == 0  # +0.0
    assert bits[1, 3] == torch.tensor(-0.0).view(torch.int32)  # -0.0


# --------------------------------------------------------------------------- BF16-block shares
def test_bf16_block_shares_are_rounded_not_truncated():
    """NVFP4 default: round(0.15 * n) last blocks (at least 1); FP8 baseline: 1/62 and 2/62 of n,
    rounded half up. Hand-computed where truncation gives another answer."""
    for n, last in [(6, 1), (12, 2), (13, 2), (20, 3), (62, 9)]:  # 0.9, 1.8, 1.95, 3.0, 9.3
        assert NVFP4Recipe().resolved_bf16_blocks(n) == (0, last), n
    for n, want in [(16, (0, 1)), (31, (1, 1)), (46, (1, 1)), (47, (1, 2)), (62, (1, 2))]:
        assert paper_fp8_bf16_blocks(n) == want, n  # 31: 0.5 -> 1 and 1.0 -> 1; 47: 0.76 -> 1, 1.52 -> 2


# --------------------------------------------------------------------------- the property suite runs in CI
def test_hypothesis_is_a_declared_test_dependency():
    """tests/test_properties.py imports hypothesis plainly: the [test] extra (what CI installs) declares it."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extra = re.search(r"^test = \[(.*)\]$", text, re.M)
    assert extra and re.search(r'"hypothesis[>=<~ \d.]*"', extra.group(1)), "add hypothesis to the [test] extra"
    assert "importorskip" not in (Path(__file__).parent / "test_properties.py").read_text()
