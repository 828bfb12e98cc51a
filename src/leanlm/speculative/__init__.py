"""Speculative decoding: draft heads, token-tree strategies, lossless tree verification, the decoding loop."""

from leanlm.speculative.engine import BatchedSpeculativeDecoder, SpecStats, SpeculativeDecoder, plain_generate
from leanlm.speculative.target import HFTarget, LeanTarget, Target, make_target
from leanlm.speculative.generation import generate
from leanlm.speculative.tree import Chain, Eagle2, StaticTree, TokenTree, TreeStrategy, make_strategy

__all__ = ["BatchedSpeculativeDecoder", "HFTarget", "LeanTarget", "Target", "make_target", "Chain", "Eagle2", "SpecStats", "SpeculativeDecoder", "StaticTree", "TokenTree", "TreeStrategy",
           "generate", "make_strategy", "plain_generate"]
