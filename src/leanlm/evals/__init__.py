"""Evaluation: zero-shot multiple-choice tasks, LAMBADA, perplexity / bits-per-byte, and an lm-eval adapter."""
