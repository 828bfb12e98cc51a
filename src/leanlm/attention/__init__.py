"""Attention kinds, one module each; a config picks one per layer by its registered name."""

from leanlm.attention.base import Attention, causal_padding_mask
from leanlm.attention.registry import ATTENTION_REGISTRY, register_attention
from leanlm.attention import asa, gla, gqa, mla, nsa  # noqa: F401  (register "asa", "gla", "gqa", "mla", "nsa")

__all__ = ["ATTENTION_REGISTRY", "Attention", "causal_padding_mask", "register_attention"]
