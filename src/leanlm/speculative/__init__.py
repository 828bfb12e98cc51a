"""Speculative decoding: draft heads, token-tree strategies, lossless tree verification, the decoding loop.

    target.py      the decoding backend: `Target` (HF and leanlm models), slot KV cache, optional torch.compile
    engine.py      the one decoding loop (batched; plain decoding is the loop without a draft)
    tree.py        `TokenTree` tensors and the chain / static / EAGLE-2 strategies
    c2t.py         C2T: the node classifier and its tree growth     c2t_train.py  its data collection and training
    strategies.py  the table of strategies by name                   verify.py     greedy and sampling acceptance
    draft.py       the EAGLE draft head and its per-tree session     train_draft.py  the head's data and training
    eagle3.py      the EAGLE-3 head, in vLLM's speculators format   heads.py       loading a head folder of either kind
    generation.py  `generate()` shaped like Hugging Face's           bench.py / cost.py  benchmarks and step costs
    prompts.py     held-out prompt sets and draft-training prompts   c2t_config.py  C2T training settings

Names on the draft side: the *head* is the trained model (`EagleDraftHead` or `Eagle3DraftHead`, `--draft` on the
command line, read by `load_head`); a
*drafter* is what a strategy asks for next-token log-probabilities while it grows one tree (the `Drafter` protocol
of tree.py; `DraftSession` runs a head for one generation, `ModelDrafter` a whole LM, for tests and checks).

Names below are imported on first use, so `import leanlm.speculative.<module>` loads only what that module needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanlm.speculative.eagle3 import Eagle3DraftHead
    from leanlm.speculative.engine import BatchedSpeculativeDecoder, SpecStats, SpeculativeDecoder, plain_generate
    from leanlm.speculative.generation import generate
    from leanlm.speculative.heads import load_head
    from leanlm.speculative.strategies import STRATEGIES, make_strategy, parse_strategy
    from leanlm.speculative.target import HFTarget, LeanTarget, Target, make_target
    from leanlm.speculative.tree import Chain, Eagle2, StaticTree, TokenTree, TreeStrategy

_WHERE = {
    "BatchedSpeculativeDecoder": "engine", "SpecStats": "engine", "SpeculativeDecoder": "engine",
    "plain_generate": "engine", "generate": "generation", "STRATEGIES": "strategies", "make_strategy": "strategies",
    "parse_strategy": "strategies", "HFTarget": "target", "LeanTarget": "target", "Target": "target",
    "make_target": "target", "Chain": "tree", "Eagle2": "tree", "StaticTree": "tree", "TokenTree": "tree",
    "TreeStrategy": "tree", "Eagle3DraftHead": "eagle3", "load_head": "heads",
}
__all__ = ["STRATEGIES", "BatchedSpeculativeDecoder", "Chain", "Eagle2", "Eagle3DraftHead", "HFTarget", "LeanTarget", "SpecStats",
           "SpeculativeDecoder", "StaticTree", "Target", "TokenTree", "TreeStrategy", "generate", "make_strategy",
           "load_head", "make_target", "parse_strategy", "plain_generate"]  # the keys of _WHERE (a test checks)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"leanlm.speculative.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
