"""Regenerate the bundled offline lm-eval tasks' data from Python's standard-library sources.

    python tools/make_eval_tasks.py

Held-out files (past the 450th in sorted order; the tiny-cpu recipe trains on the first 300)
give 40 perplexity documents and 200 four-way "which continuation is the real code"
questions. The output is committed, so every machine evaluates on the same text.
"""

import json
import random
from pathlib import Path

from hf_nvfp4.data import stdlib_files

OUT = Path(__file__).resolve().parents[1] / "hf_nvfp4" / "tasks"


def main() -> None:
    files = stdlib_files(100_000)[450:]
    rng = random.Random(0)
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    docs = []
    for t in rng.sample(texts, 40):
        start = rng.randrange(0, max(1, len(t) - 1200))
        docs.append({"text": t[start : start + 1200]})
    lines = [
        ln.rstrip() for t in texts for ln in t.splitlines() if len(ln.strip()) >= 60 and not ln.strip().startswith("#")
    ]
    rng.shuffle(lines)
    items = []
    for ln in lines[:200]:
        cut = len(ln) - 24
        others = rng.sample(lines[200:], 3)
        choices = [ln[cut:]] + [o[-24:] for o in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"context": ln[:cut], "choices": [choices[i] for i in order], "label": order.index(0)})
    with (OUT / "stdlib_ppl.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    with (OUT / "stdlib_mc.jsonl").open("w") as f:
        for d in items:
            f.write(json.dumps(d) + "\n")
    print(f"wrote {len(docs)} documents and {len(items)} questions to {OUT}")


if __name__ == "__main__":
    main()
