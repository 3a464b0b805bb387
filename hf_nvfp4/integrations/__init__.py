"""Glue to transformers, accelerate, the HF Trainer and lm-eval."""
