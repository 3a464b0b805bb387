"""Generate text from a trained checkpoint (e.g. runs/tiny-cpu after ``hf-nvfp4 train tiny-cpu``).

python examples/generate.py runs/tiny-cpu "def main(" [--max-new-tokens 64]

The prompt is encoded with the plugin's tokenization rule (hf_nvfp4.integrations.tokens):
BOS only where the tokenizer's default call adds one, nothing appended. A default
``tokenizer(prompt)`` call on ByT5's byte tokenizer appends ``</s>``, which tells the model
the text has ended before it starts generating.
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

import hf_nvfp4  # noqa: F401  (registers quant_method "hf_nvfp4", so the checkpoint loads converted)
from hf_nvfp4.integrations.tokens import encode_prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    try:
        tok = AutoTokenizer.from_pretrained(args.model_dir)
    except (OSError, ValueError):
        tok = ByT5Tokenizer()
    ids = torch.tensor([encode_prompt(tok, args.prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(args.prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
