"""Evaluation: image metrics, the offline photo bank and tokenizer reconstruction."""
