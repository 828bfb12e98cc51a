"""Measured costs of one speculative step on the current hardware: verifying n tree tokens, drafting one tree layer.

On a GPU, verifying a few dozen tokens costs about as much as one (the forward is memory-bound); on a CPU the cost
grows with n almost from the start. Strategies that choose their tree size (C2T's cost-aware beta) read these
numbers instead of assuming either.
"""

from __future__ import annotations

import statistics
import time

import torch

from leanlm.speculative.target import Target
from leanlm.speculative.tree import TokenTree
from leanlm.speculative.verify import tree_inputs


@torch.no_grad()
def verify_seconds(target, sizes: list[int], context: int = 256, repeats: int = 5,
                   seed: int = 0) -> dict[int, float]:
    """Median seconds of one target forward over a tree of n tokens (a root with a top-1 spine of depth n/4 and
    the rest as siblings, through the tree-mask path) after `context` cached tokens, for each n in `sizes`."""
    tgt = target if isinstance(target, Target) else Target(target)
    g = torch.Generator().manual_seed(seed)
    vocab = tgt.config.vocab_size
    tgt.reset()
    tgt.forward(torch.randint(0, vocab, (1, context), generator=g).to(tgt.device))
    sync = torch.cuda.synchronize if tgt.device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    out = {}
    for n in sizes:
        spine = max(1, n // 4)
        parents = [-1] + [i - 1 for i in range(1, spine)] + [0] * (n - spine)
        tree = TokenTree(torch.randint(0, vocab, (n,), generator=g).tolist(), parents, [0.0] * n)
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            ids, pos, mask = tree_inputs(tree, context, tgt.device)
            sync()
            t = time.perf_counter()
            tgt.forward(ids, pos, mask)
            sync()
            times.append(time.perf_counter() - t)
            tgt.crop(context)
        out[n] = statistics.median(times[1:])
    tgt.reset()
    return out


@torch.no_grad()
def draft_layer_seconds(head, target, width: int = 10, context: int = 256, repeats: int = 5,
                        seed: int = 0) -> float:
    """Median seconds the draft head takes to expand one tree layer of `width` nodes (head forward + LM head over
    the vocabulary + top-k), after a `context`-token prefix."""
    from leanlm.speculative.draft import DraftSession

    tgt = target if isinstance(target, Target) else Target(target)
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = tgt.config.vocab_size, tgt.config.hidden_size
    session = DraftSession(head, tgt.embed_tokens, tgt.lm_head)
    session.prefill(torch.randn(context, hidden, generator=g), torch.randint(0, vocab, (context,), generator=g).tolist())
    sync = torch.cuda.synchronize if session.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        tokens = torch.randint(0, vocab, (width,), generator=g).tolist()
        sync()
        t = time.perf_counter()
        session.expand(list(range(1, width + 1)), tokens, [0] * width).topk(width, dim=-1)
        sync()
        times.append(time.perf_counter() - t)
        session.end_tree()
    return statistics.median(times[1:])
