"""Evaluation scores exactly the continuation (issue 11, case 1): one tokenization of the context
and one of the continuation, no special tokens between or after them, BOS only where the
tokenizer (so the model's training data) has it."""

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from models import tiny
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

import hf_nvfp4
from hf_nvfp4 import NVFP4Config, evaluate_lm
from hf_nvfp4.integrations.tokens import encode_pair, encode_prompt

ALPHA = "abcdefghijklmnopqrstuvwxyz"


def _bos_eos_tokenizer():
    """A char-level fast tokenizer whose default encoding is ``<s> ... </s>`` (built offline)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{chr(i): i - 28 for i in range(32, 127)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def test_encoding_rule_for_byte_and_bos_tokenizers():
    byt5 = ByT5Tokenizer()
    assert byt5.encode("hello wor")[-1] == byt5.eos_token_id  # the default call appends </s>
    ctx, cont = encode_pair(byt5, "hello wor", "ld")
    assert ctx == [b + 3 for b in b"hello wor"] and cont == [b + 3 for b in b"ld"]
    assert encode_prompt(byt5, "hi") == [b + 3 for b in b"hi"]
    tok = _bos_eos_tokenizer()
    ctx, cont = encode_pair(tok, "hello wor", "ld")
    assert ctx[0] == tok.bos_token_id and tok.eos_token_id not in ctx + cont
    assert ctx[1:] == tok.encode("hello wor", add_special_tokens=False)
    assert cont == tok.encode("ld", add_special_tokens=False)
    assert encode_prompt(tok, "hi") == [tok.bos_token_id, *tok.encode("hi", add_special_tokens=False)]


def _alphabet_text(n: int, rng: random.Random) -> str:
    start = rng.randrange(26)
    return "".join(ALPHA[(start + i) % 26] for i in range(n))


@pytest.fixture(scope="module")
def trained():
    """A tiny converted Llama trained for a few steps on the cyclic alphabet (next letter = letter + 1).

    Its layers compute in BF16 (set_precision): batch-independent numerics, so lm-eval's padded
    batches and the one-sequence scorer below see the same function; tokenization is the subject.
    """
    torch.manual_seed(0)
    model = hf_nvfp4.from_config(tiny("llama", 2).config, NVFP4Config(bf16_last_blocks=0))
    model.config.max_position_embeddings = 256
    hf_nvfp4.set_precision(model, "bf16")
    tok = ByT5Tokenizer()
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        ids = torch.tensor([encode_prompt(tok, _alphabet_text(48, rng)) for _ in range(8)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, tok


def _write_tasks(tmp_path, rng):
    mc, ppl = [], []
    for i in range(24):
        text = _alphabet_text(12, rng)
        ctx, right = text[:8], text[8:]
        firsts = [right[0]] + rng.sample([c for c in ALPHA if c != right[0]], 3)
        choices = [f + right[1:] for f in firsts]  # differ only in their first character
        label = i % 4
        choices[0], choices[label] = choices[label], choices[0]
        mc.append({"context": ctx, "choices": choices, "label": label})
    for _ in range(6):
        ppl.append({"text": _alphabet_text(rng.randrange(20, 60), rng)})
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in mc))
    (tmp_path / "ppl.jsonl").write_text("\n".join(json.dumps(d) for d in ppl))
    common = "dataset_path: json\ntest_split: test\nshould_decontaminate: false\nmetadata:\n  version: 1.0\n"
    (tmp_path / "first_char_mc.yaml").write_text(
        f"task: first_char_mc\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n{common}"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_target: label\n"
        "doc_to_choice: '{{choices}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (tmp_path / "alpha_ppl.yaml").write_text(
        f"task: alpha_ppl\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ppl.jsonl'}\n{common}"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n"
    )
    return mc, ppl


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_evaluate_lm_agrees_with_an_independent_scorer(trained, tmp_path):
    model, tok = trained
    mc, ppl = _write_tasks(tmp_path, random.Random(1))
    # the independent scorer: raw bytes + 3 (ByT5's ids), plain torch, no tokenizer calls
    correct = 0
    for d in mc:
        ctx = [b + 3 for b in d["context"].encode()]
        lls = []
        for ch in d["choices"]:
            cont = [b + 3 for b in ch.encode()]
            lp = _logprobs(model, ctx + cont)
            lls.append(sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += max(range(4), key=lambda i: lls[i]) == d["label"]
    acc = correct / len(mc)
    assert acc >= 0.75  # the model learnt the task: scoring the first character matters
    total_ll, total_bytes = 0.0, 0
    for d in ppl:
        ids = [b + 3 for b in d["text"].encode()]
        lp = _logprobs(model, [tok.eos_token_id, *ids[:-1]])  # lm-eval's rolling prefix token
        total_ll += sum(lp[j, t].item() for j, t in enumerate(ids))
        total_bytes += len(d["text"].encode())
    bpb = -total_ll / total_bytes / math.log(2)

    res = evaluate_lm(model, tok, ["first_char_mc", "alpha_ppl"], include_path=tmp_path, batch_size=5)
    r = res["results"]
    assert r["first_char_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert r["first_char_mc"]["acc_norm,none"] == pytest.approx(acc, abs=1e-9)  # equal-length choices
    assert r["alpha_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)


def test_example_generation_continues_the_prompt(trained, tmp_path, capsys):
    model, tok = trained
    ids = torch.tensor([encode_prompt(tok, "abcdefgh")])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]) == "ijk"
    model.save_pretrained(tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("gen_example", Path(__file__).parent.parent / "examples/generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "ckpt"), "mnopq", "--max-new-tokens", "3"]) == 0  # reloaded: NVFP4 numerics
    assert capsys.readouterr().out.strip() == "mnopqrst"
