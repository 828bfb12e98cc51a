"""Measured costs of one speculative step on the current hardware: verifying n tree tokens, drafting one tree layer.

On a GPU, verifying a few dozen tokens costs about as much as one (the forward is memory-bound); on a CPU the cost
grows with n almost from the start. Strategies that choose their tree size (C2T's cost-aware beta) read these
numbers instead of assuming either.
"""

from __future__ import annotations

import statistics
import time

import torch

from leanlm.speculative.draft import DraftSession
from leanlm.speculative.engine import cache_capacity
from leanlm.speculative.target import make_target
from leanlm.speculative.tree import TokenTree


@torch.no_grad()
def verify_seconds(target, sizes: list[int], context: int = 256, repeats: int = 5,
                   seed: int = 0) -> dict[int, float]:
    """Median seconds of one target step over a tree of n tokens (a root with a top-1 spine of depth n/4 and the
    rest as siblings, through the tree-mask path) after `context` cached tokens, for each n in `sizes`. `target` may
    be a compiled `Target` (`make_target(model, compile=True)`): the warm-up run compiles each size's graph."""
    tgt = make_target(target)
    g = torch.Generator().manual_seed(seed)
    vocab = tgt.config.vocab_size
    tgt.start(1, cache_capacity(context, 0, max(sizes)))
    lengths = torch.tensor([context], device=tgt.device)
    tgt.prefill(torch.randint(0, vocab, (1, context), generator=g).to(tgt.device), lengths)
    sync = torch.cuda.synchronize if tgt.device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously
    out = {}
    for n in sizes:
        spine = max(1, n // 4)
        parents = [-1] + [i - 1 for i in range(1, spine)] + [0] * (n - spine)
        tree = TokenTree(torch.randint(0, vocab, (n,), generator=g), parents, [0.0] * n)
        ids = tree.tokens.to(tgt.device)[None]
        pos = (tree.depths().to(tgt.device) + context)[None]
        anc = tree.ancestor_mask(tgt.device)[None]
        times = []
        for _ in range(repeats + 1):  # the first run warms up (and compiles)
            sync()
            t = time.perf_counter()
            tgt.step(ids, pos, anc, lengths, context)
            sync()
            times.append(time.perf_counter() - t)
        out[n] = statistics.median(times[1:])
    return out


@torch.no_grad()
def draft_layer_seconds(head, target, width: int = 10, context: int = 256, repeats: int = 5,
                        seed: int = 0) -> float:
    """Median seconds the draft head takes to expand one tree layer of `width` nodes (head forward + LM head over
    the vocabulary + top-k), after a `context`-token prefix."""

    tgt = make_target(target)
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = tgt.config.vocab_size, tgt.config.hidden_size
    session = DraftSession(head, tgt.embed_tokens, tgt.lm_head)
    session.prefill(torch.randn(context, hidden, generator=g), torch.randint(0, vocab, (context,), generator=g))
    sync = torch.cuda.synchronize if session.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        tokens = torch.randint(0, vocab, (width,), generator=g).to(session.device)
        nodes = torch.arange(1, width + 1, device=session.device)
        sync()
        t = time.perf_counter()
        session.expand(nodes, tokens, torch.zeros_like(nodes)).topk(width, dim=-1)
        sync()
        times.append(time.perf_counter() - t)
        session.end_tree()
    return statistics.median(times[1:])
