"""Fine-tune any local or hub causal LM with the NVFP4 recipe through the HF Trainer.

python examples/finetune_from_pretrained.py PATH_OR_HUB_ID
"""

import sys

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, Trainer, TrainingArguments

import hf_nvfp4  # registers quant_method "hf_nvfp4" with transformers

if __name__ == "__main__":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=hf_nvfp4.NVFP4Config())
    tok = ByT5Tokenizer()
    text = open(torch.__file__).read() * 4
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seq = 128
    blocks = ids[: len(ids) // seq * seq].view(-1, seq) % model.config.vocab_size
    data = [{"input_ids": b, "labels": b} for b in blocks]
    args = TrainingArguments(
        output_dir="runs/finetune",
        max_steps=20,
        per_device_train_batch_size=4,
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        logging_steps=5,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    model.save_pretrained("runs/finetune")  # a plain HF checkpoint with the recipe in config.json
