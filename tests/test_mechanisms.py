"""Issue 26: the mechanism experiments on a tiny run directory, and the page's multiple-comparison correction."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from hf_nvfp4.formats.registry import get_format
from hf_nvfp4.science import mechanisms as mech
from hf_nvfp4.science.multiple import bh, correct, holm, regression_row, t_row


# -- statistics ------------------------------------------------------------------------------------------------
def test_holm_and_bh_match_their_definitions():
    p = [0.001, 0.02, 0.03, 0.5, 0.0004]
    # Holm: sorted p times (m - rank), running max, capped at 1
    assert holm(p) == pytest.approx([0.004, 0.06, 0.06, 0.5, 0.002])
    # BH: p * m / rank, running min from the top
    assert bh(p) == pytest.approx([0.0025, 0.0333333, 0.0375, 0.5, 0.002], rel=1e-4)


def test_t_row_is_scipys_one_sample_t_test():
    x = [0.3, -0.1, 0.5, 0.2, 0.4]
    r = t_row(x, test="x", unit="u")
    ref = stats.ttest_1samp(x, 0.0)
    assert r["p"] == pytest.approx(ref.pvalue) and r["n"] == 5 and r["unit"] == "u"
    ci = ref.confidence_interval(0.95)
    assert (r["lo"], r["hi"]) == pytest.approx((ci.low, ci.high))


def test_correct_resolves_only_what_survives_the_whole_page():
    # p = 0.015 resolves alone, not among 42 tests (Holm needs p < 0.05/42 = 0.0012 for the smallest)
    alone = [{"rows": [{"p": 0.015}]}]
    assert correct(alone) == 1 and alone[0]["rows"][0]["resolved"]
    page = [{"rows": [{"p": 0.015}]}, {"rows": [{"p": 0.5} for _ in range(41)] + [{"test": "no p"}]}]
    assert correct(page) == 42
    assert page[0]["rows"][0]["resolved"] is False and page[0]["rows"][0]["p_adj"] == pytest.approx(0.63)
    assert page[1]["rows"][-1]["resolved"] is None


def test_regression_row_recovers_a_slope():
    x = np.arange(10.0)
    r = regression_row(x, 2 * x + 1 + 0.01 * np.sin(x))
    assert r["mean"] == pytest.approx(2.0, abs=0.01) and r["lo"] < 2 < r["hi"] and r["p"] < 1e-6


# -- mechanisms on tensors -------------------------------------------------------------------------------------
def test_sr_with_scales_rounded_up_never_clamps_and_is_unbiased():
    torch.manual_seed(0)
    # blocks whose max sits just above an E4M3 scale step: nearest rounding of the scale clamps them
    x = torch.randn(64, 64) * torch.logspace(-1, 1, 64)
    g = mech._gen(0)
    draws = torch.stack([mech.fake_sr_scale_up(x, g) for _ in range(400)])
    fmt = get_format("nvfp4")
    sr = torch.stack([fmt.fake_quantize(x, tile=(1, 16), stochastic=True, generator=g) for _ in range(400)])
    bias_up = float((draws.mean(0) - x).norm() / x.norm())
    bias_sr = float((sr.mean(0) - x).norm() / x.norm())
    assert bias_up < bias_sr  # the clamping part of SR's residual bias is gone
    # no element's magnitude is cut: every block keeps its max within one grid step
    assert (
        float((draws.abs().amax(0).reshape(-1, 16).amax(-1) + 1e-6 >= x.abs().reshape(-1, 16).amax(-1)).float().mean())
        == 1.0
    )


def test_probe_exact_backward_is_the_straight_through_gradient():
    from hf_nvfp4.config import NVFP4Recipe
    from hf_nvfp4.ops.roles import role_table
    from hf_nvfp4.science.diagnose import _q

    torch.manual_seed(0)
    roles = role_table(NVFP4Recipe())
    x = torch.randn(32, 64, requires_grad=True)
    w = torch.randn(48, 64, requires_grad=True)
    y = mech._Probe.apply(x, w, roles, "exact", None)
    dy = torch.randn_like(y)
    y.backward(dy)
    qx, qw = _q(x.detach(), roles["fprop_input"]), _q(w.detach(), roles["fprop_weight"])
    torch.testing.assert_close(y.detach(), qx @ qw.t())
    torch.testing.assert_close(x.grad, dy @ qw)
    torch.testing.assert_close(w.grad, dy.t() @ qx)


# -- every experiment on a tiny run directory ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import yaml

    import hf_nvfp4  # noqa: F401
    from hf_nvfp4.data import build_tokenizer
    from hf_nvfp4.recipe import load_recipe
    from hf_nvfp4.train import build_model

    d = tmp_path_factory.mktemp("mech")
    spec = {
        "name": "mech-test",
        "output_dir": str(d),
        "model": {
            "config": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 32,
            },
            "dtype": "float32",
        },
        "tokenizer": {"kind": "byte"},
        "data": {"source": "stdlib", "seq_len": 32, "max_files": 4, "eval_fraction": 0.5},
        "training": {"max_steps": 10, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "decay_fraction": 0.2},
        "nvfp4": {"bf16_last_blocks": 1},
        "logging": {"report_to": []},
    }
    (d / "r.yaml").write_text(yaml.safe_dump(spec))
    rec = load_recipe(d / "r.yaml")
    tok = build_tokenizer(rec)
    torch.manual_seed(0)
    model = build_model(rec, int(math.ceil(len(tok) / 16) * 16))
    (d / "recipe.json").write_text(json.dumps(rec.to_dict(), default=str))
    for step in (4, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(d / f"checkpoint-{step}")
    return d


def test_every_experiment_writes_json_csv_plot_and_the_page(run_dir, tmp_path):
    tiny = {
        "sr_accumulation": dict(batches=3, sequences=2, batch_size=2),
        "rht": dict(batches=2, batch_size=2, draws=2),
        "consistency": dict(batches=1, batch_size=2, steps=2, seeds=2),
        "depth": dict(batches=3, batch_size=2, grad_batches=1),
        "late_switch": dict(batches=3, batch_size=2, seeds=2, steps=2),
    }
    for name, kw in tiny.items():
        res, paths = mech.run_experiment(name, run_dir, tmp_path, log=lambda *_: None, **kw)
        assert [p.suffix for p in paths] == [".json", ".csv", ".png"] and all(p.stat().st_size for p in paths)
        for t in res["tables"]:
            assert t["unit"] and all(r["unit"] for r in t["rows"])  # the replication unit in every table
    page = mech.write_page(tmp_path).read_text()
    assert "Holm" in page and "replication unit: checkpoint x batch" in page
    late = json.loads((tmp_path / "mechanisms_late_switch.json").read_text())
    assert late["config"]["branch_step"] == 8 and len(late["branch"]) == 2
    assert {r["test"].split(",")[1].split(" minus")[0].strip() for r in late["tables"][1]["rows"]} == {
        "switch all",
        "switch forward",
        "switch backward",
    }


def test_unknown_parameters_and_experiments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter"):
        mech.run_experiment("rht", tmp_path, tmp_path, nope=1)
    with pytest.raises(ValueError, match="unknown experiment"):
        mech.run_experiment("nope", tmp_path, tmp_path)
    assert mech._pick([(41, "a"), (82, "b"), (164, "c")], 164, 2) == [(164, "c")]
    with pytest.raises(ValueError, match="the run has steps"):
        mech._pick([(41, "a")], "7", 1)


def test_the_recorded_sweep_resolves_nothing_under_holm():
    from pathlib import Path

    from hf_nvfp4.science.sweep import corrected

    table = json.loads((Path(__file__).parents[1] / "docs/results/ablation.json").read_text())
    rows, m = corrected(table)
    assert m == 68 and not any(r["resolved"] for r in rows)
    alloc = next(r for r in rows if r["variant"] == "fp8_nvfp4_alloc" and r["comparison"] == "loss vs FP8")
    assert alloc["p"] == pytest.approx(0.0156, abs=1e-3) and alloc["p_adj"] == 1.0
