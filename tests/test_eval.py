"""lm-eval hooks, the callback, the eval/compare commands, offline tasks and errors."""

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny
from transformers import ByT5Tokenizer, Trainer, TrainingArguments

import hf_nvfp4
from hf_nvfp4 import LMEvalCallback, NVFP4Config, NVFP4Linear, evaluate_lm
from hf_nvfp4.evaluation import compare_runs

TASKS = Path(hf_nvfp4.__file__).parent / "tasks"


def _bf16_copy(model):
    """The same weights computing in BF16: batch-independent numerics, what precision="bf16" evaluates."""
    m = copy.deepcopy(model).eval()
    hf_nvfp4.set_precision(m, "bf16")
    return m


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _ids(text):
    return [b + 3 for b in text.encode()]  # ByT5: bytes + 3, no special tokens


def _hand_mc(model, docs, delimiter=""):
    """(acc, acc_norm) by hand: lm-eval scores context.rstrip() then (its trailing whitespace +
    delimiter + choice); acc_norm divides each log-likelihood by the choice's length in characters."""
    acc = norm = 0
    for d in docs:
        lls = []
        for ch in d["choices"]:
            ctx = d["context"].rstrip()
            c, t = _ids(ctx), _ids(d["context"][len(ctx):] + delimiter + ch)
            lp = _logprobs(model, c + t)
            lls.append(sum(lp[len(c) - 1 + j, tok].item() for j, tok in enumerate(t)))
        best = max(range(len(lls)), key=lambda i: lls[i])
        acc += best == d["label"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(delimiter + d["choices"][i])) == d["label"]
    return acc / len(docs), norm / len(docs)


def _hand_bits_per_byte(model, texts, max_len, prefix):
    """lm-eval's rolling log-likelihood by hand: the first window predicts up to max_len tokens
    after the prefix token, each later one the next max_len tokens from the max_len tokens before."""
    total, n_bytes = 0.0, 0
    for text in texts:
        ids, n = _ids(text), len(text.encode())
        first = min(max_len, len(ids))
        lp = _logprobs(model, [prefix] + ids[: first - 1])
        total += sum(lp[j, ids[j]].item() for j in range(first))
        pos = first
        while pos < len(ids):
            w = min(len(ids) - pos, max_len)
            end = pos + w
            lp = _logprobs(model, ids[end - max_len - 1 : end - 1])
            total += sum(lp[max_len - w + j, ids[end - w + j]].item() for j in range(w))
            pos = end
        n_bytes += n
    return -total / n_bytes / math.log(2)


@pytest.fixture(scope="module")
def model_and_tok():
    m = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=0))
    m.config.max_position_embeddings = 256
    return m, ByT5Tokenizer()


def test_hook_runs_bundled_tasks_and_restores_modes(model_and_tok):
    model, tok = model_and_tok
    model.train()
    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    layers[0].forward_precision = "mxfp4"
    res = evaluate_lm(model, tok, ["nvfp4_stdlib_mc", "nvfp4_stdlib_ppl"], limit=6, batch_size=4, precision="bf16")
    assert model.training and layers[0].forward_precision == "mxfp4"
    assert all(m.precision == "nvfp4" for m in layers)
    layers[0].forward_precision = None
    # the numbers, against an independent scorer of the first 6 documents (limit=6)
    ref = _bf16_copy(model)
    lines = lambda f: [json.loads(x) for x in (TASKS / f).read_text().splitlines()[:6]]
    acc, acc_norm = _hand_mc(ref, lines("stdlib_mc.jsonl"))
    r = res["results"]
    assert r["nvfp4_stdlib_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert r["nvfp4_stdlib_mc"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    bpb = _hand_bits_per_byte(ref, [d["text"] for d in lines("stdlib_ppl.jsonl")], 256, tok.eos_token_id)
    assert r["nvfp4_stdlib_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)


def test_precision_changes_the_numbers(model_and_tok):
    model, tok = model_and_tok
    a = evaluate_lm(model, tok, "nvfp4_stdlib_ppl", limit=3, precision="nvfp4")
    b = evaluate_lm(model, tok, "nvfp4_stdlib_ppl", limit=3, precision="bf16")
    key = "bits_per_byte,none"
    assert a["results"]["nvfp4_stdlib_ppl"][key] != b["results"]["nvfp4_stdlib_ppl"][key]


def test_user_task_directory(model_and_tok, tmp_path):
    model, tok = model_and_tok
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"q": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 7}"], "label": 0}) for i in range(5))
    )
    (tmp_path / "my_task.yaml").write_text(
        f"task: my_add\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: label\ndoc_to_choice: '{{choices}}'\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n"
    )
    res = evaluate_lm(model, tok, ["my_add"], include_path=tmp_path, precision="bf16")
    docs = [{"context": f"{i} + 1 =", "choices": [f" {i + 1}", f" {i + 7}"], "label": 0} for i in range(5)]
    acc, _ = _hand_mc(_bf16_copy(model), docs, delimiter=" ")  # lm-eval's default target_delimiter
    assert res["results"]["my_add"]["acc,none"] == pytest.approx(acc, abs=1e-9)


def test_unknown_task_lists_where_it_looked(model_and_tok, tmp_path):
    model, tok = model_and_tok
    with pytest.raises(
        ValueError,
        match=r"unknown lm-eval task\(s\) \['no_such_task'\].*bundled tasks.*"
        r"include_path.*built-in registry",
    ):
        evaluate_lm(model, tok, ["no_such_task"], include_path=tmp_path)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        LMEvalCallback(["no_such_task"], every_n_steps=5)
    with pytest.raises(ValueError, match="precision"):
        evaluate_lm(model, tok, ["nvfp4_stdlib_mc"], precision="fp16")


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.arange(32) % 200 + i
        return {"input_ids": x, "labels": x}


def test_callback_logs_metrics(model_and_tok, tmp_path):
    model, tok = model_and_tok
    cb = LMEvalCallback(["nvfp4_stdlib_mc"], every_n_steps=3, limit=4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    tr = Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[cb], processing_class=tok)
    tr.train()
    logged = [h for h in tr.state.log_history if "lm_eval/nvfp4_stdlib_mc/acc" in h]
    assert [h["step"] for h in logged] == [3, 6]
    assert [h["step"] for h in tr.state.log_history if "loss" in h] == [3, 6]  # the loss logs survive
    assert model.training


def test_eval_and_compare_commands(model_and_tok, tmp_path):
    model, tok = model_and_tok
    model.save_pretrained(tmp_path / "ckpt")
    outs = []
    for prec in ("nvfp4", "bf16"):
        out = tmp_path / f"{prec}.json"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "hf_nvfp4.cli",
                "eval",
                str(tmp_path / "ckpt"),
                "--tasks",
                "nvfp4_stdlib_mc",
                "--limit",
                "4",
                "--precision",
                prec,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert "nvfp4_stdlib_mc/acc" in res.stdout
        outs.append(str(out))
    table = compare_runs(outs, ["NVFP4", "BF16"], baseline="BF16")
    assert "| task/metric | NVFP4 | BF16 | NVFP4 vs BF16 |" in table and "nvfp4_stdlib_mc/acc" in table
    res = subprocess.run(
        [sys.executable, "-m", "hf_nvfp4.cli", "eval", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "not a saved model directory" in res.stderr
