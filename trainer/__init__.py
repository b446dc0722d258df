"""Airlock's trainer: offline pretraining, fine-tuning and GRPO for small causal LMs."""

__version__ = "0.1.0"
