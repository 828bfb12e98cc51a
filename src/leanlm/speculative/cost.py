"""Measured costs of one speculative step on the current hardware: verifying n tree tokens, drafting one tree layer.

On a GPU, verifying a few dozen tokens costs about as much as one (the forward is memory-bound); on a CPU the cost
grows with n almost from the start. Strategies that choose their tree size read these numbers instead of assuming
either: C2T's cost-aware beta (`c2t_train.cost_aware_beta`) and EAGLE-2's total_tokens/depth
(`cost_aware_eagle2`), both by replaying trees collected with `leanlm spec c2t-collect` under the same step-cost
model, (tau + 1) / (layers drafted x draft seconds per layer + verification seconds of the tree's tokens +
per-step overhead).

The overhead (`step_overhead_seconds`) is what a real step of the engine costs beyond those two terms: the draft
head re-reading the accepted tokens (which also gives the next root distribution), the tree's masks and
positions, acceptance, the cache move and the Python around them. It is measured by running the engine, once
plainly (against a 1-token verification) and once with a small EAGLE-2 tree (against its modelled step), so plain
decoding's prediction carries its own overhead too. On the 2-core CPU it is a few ms a step (3.5 ms on an idle
core): with it the modelled step of an 8-node tree came within 3% of the engine's, against 6% without
(docs/results/draft-head.md, "The cost model against the engine").
"""

from __future__ import annotations

import statistics
import time

import torch

from leanlm.speculative.draft import DraftSession
from leanlm.speculative.engine import SpeculativeDecoder, cache_capacity, plain_generate
from leanlm.speculative.target import make_target
from leanlm.speculative.tree import Eagle2, TokenTree


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
    width_in = hidden * len(getattr(head, "feature_layers", None) or (0,))  # EAGLE-3 reads several layers
    session.prefill(torch.randn(context, width_in, generator=g), torch.randint(0, vocab, (context,), generator=g))
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


@torch.no_grad()
def step_overhead_seconds(target, head, verify_seconds: dict[int, float], draft_layer_seconds: float,
                          context: int = 256, new_tokens: int = 24, total_tokens: int = 4, depth: int = 2,
                          top_k: int = 10, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds a real engine step costs beyond the cost model's terms, measured (median of `repeats` runs after a
    warm-up) on a random `context`-token prompt, `new_tokens` tokens each run:

    - "plain": a plain decoding step minus `verify_seconds[1]`;
    - "tree": an EAGLE-2 step (`total_tokens`, `depth`, `top_k`) minus (depth - 1) x `draft_layer_seconds` minus
      the interpolated verification of the nodes it verified.

    Clamped at 0. A random prompt makes the head's drafts mostly rejected, so the re-read of accepted tokens is
    measured at about one token a step (real steps re-read tau + 1). `target` may be a compiled `Target`."""
    tgt = make_target(target)
    g = torch.Generator().manual_seed(seed)
    limit = getattr(tgt.config, "max_position_embeddings", None)  # a short-context model gets a shorter prompt
    context = min(context, limit - new_tokens) if limit else context
    ids = torch.randint(0, tgt.config.vocab_size, (1, context), generator=g)
    capacity = cache_capacity(context, new_tokens, 16)
    plain, tree = [], []
    decoder = SpeculativeDecoder(tgt, head, Eagle2(total_tokens, depth, top_k), capacity=capacity)
    for _ in range(repeats + 1):  # the first run warms up (and compiles)
        out, seconds = plain_generate(tgt, ids, new_tokens, capacity=capacity)
        plain.append(seconds / max(1, len(out) - 1) - verify_seconds[1])
        _, st = decoder.generate(ids, new_tokens)
        s = max(1, st.steps)
        modelled = draft_layer_seconds * (depth - 1) + interpolate_seconds(verify_seconds, st.candidates / s)
        tree.append((st.draft_seconds + st.verify_seconds) / s - modelled)
    return {"plain": max(0.0, statistics.median(plain[1:])), "tree": max(0.0, statistics.median(tree[1:]))}


def interpolate_seconds(seconds: dict[int, float], n: float) -> float:
    """Verification seconds of an n-token tree from measured sizes: linear between them, proportional beyond."""
    sizes = sorted(seconds)
    for a, b in zip(sizes, sizes[1:]):
        if n <= b:
            w = (n - a) / (b - a) if n >= a else 0.0
            return seconds[a] + w * (seconds[b] - seconds[a])
    return seconds[sizes[-1]] * n / sizes[-1]


def replay_eagle2(rows: dict[str, torch.Tensor], total_tokens: int, depth: int) -> dict:
    """EAGLE-2's rerank replayed on collected full trees (`c2t_train.collect_trees` rows: joint_logp, depth (0-based
    layer), label (on the accepted path), tree): per tree the `total_tokens - 1` most likely nodes within `depth`
    layers are kept (a parent is never less likely than its child, so the set is a subtree), and the accepted length
    is the number of kept nodes on the accepted path. Returns the mean tau and verified nodes (root included). An
    estimate: the collected trees hold the top-k children of the top-k frontier at the collection's k, so a smaller
    top_k is not replayed."""
    tree, logp = rows["tree"], rows["joint_logp"].float()
    inside = rows["depth"] < depth
    score = torch.where(inside, logp, torch.full_like(logp, float("-inf")))
    order = torch.argsort(-score, stable=True)  # most likely first (earlier node first on ties) ...
    order = order[torch.argsort(tree[order], stable=True)]  # ... within each tree's run
    trees = int(tree.max()) + 1
    first = torch.zeros(trees, dtype=torch.long).scatter_reduce_(0, tree[order], torch.arange(len(order)),
                                                                 reduce="amin", include_self=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - first[tree[order]]  # rank of each node within its tree
    keep = inside & (rank < total_tokens - 1)
    return {"total_tokens": total_tokens, "depth": depth,
            "tau": float((keep & (rows["label"] > 0.5)).sum()) / trees, "nodes": 1 + float(keep.sum()) / trees}


def cost_aware_eagle2(rows: dict[str, torch.Tensor], verify_seconds: dict[int, float], draft_layer_seconds: float,
                      sizes: list[int] | None = None, depths: list[int] | None = None,
                      overhead_seconds: float = 0.0) -> tuple[dict, list[dict]]:
    """EAGLE-2's tree size for this hardware: for each (total_tokens, depth) replay the collected trees
    (`replay_eagle2`) and model a step as (depth - 1) draft layers (EAGLE-2 expands depth - 1 times after the root
    distribution) plus the verification of the kept nodes plus `overhead_seconds` (`step_overhead_seconds`'s
    "tree"); choose the most tokens per second. Returns (the best row, the table)."""
    sizes = sizes or [4, 8, 12, 16, 24, 32, 48, 60, 80, 128]
    depths = depths or [2, 3, 4, 5, 6, 7, 8]
    table = []
    for n in sizes:
        for d in depths:
            r = replay_eagle2(rows, n, d)
            step = draft_layer_seconds * (d - 1) + interpolate_seconds(verify_seconds, r["nodes"]) + overhead_seconds
            table.append({**r, "step_seconds": step, "tokens_per_second": (r["tau"] + 1) / step})
    return max(table, key=lambda r: r["tokens_per_second"]), table
