"""Lossless verification of a token tree against the target's logits at every node.

Greedy: from the root, follow the child whose token is the target's argmax at the current node, as long as one
exists; the target's argmax after the last accepted node is the bonus token. Computed for all nodes at once
(`greedy_nodes`): a node is acceptable when every node on its path matches, and the deepest acceptable node wins. The emitted tokens are exactly those
plain greedy decoding would produce.

Sampling: recursive rejection sampling with deterministic (one-hot) proposals, as in EAGLE (and SpecInfer's
multi-candidate form). At the current node with target distribution p, the children's distinct tokens are tried in
order; token x is accepted with probability p(x) (its proposal probability is 1); on rejection p(x) is set to 0 and p
renormalised; if every child is rejected the bonus token is drawn from what is left of p (or from p itself at a
leaf). Each emitted token is then distributed exactly as plain sampling from the target's processed distribution.

`process_logits` is shared with plain sampling so both draw from the same distribution (temperature, top-k, top-p).
"""

from __future__ import annotations

import torch

from leanlm.speculative.tree import TokenTree


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities [..., V] after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def greedy_nodes(tokens: torch.Tensor, parents: torch.Tensor, anc: torch.Tensor, depths: torch.Tensor,
                 best: torch.Tensor) -> torch.Tensor:
    """Vectorised greedy acceptance for a batch of (padded) trees: the deepest node whose every ancestor-or-self
    carries the target's argmax at its parent (earliest node on ties). tokens, parents, depths [B, N]; anc [B, N, N]
    (padding nodes: parent -1 and only themselves in anc, so they never match); best [B, N] the target's argmax per
    node. Returns the accepted node per row [B]; its ancestors in `anc` are the accepted path."""
    n = tokens.shape[1]
    at_parent = best.gather(1, parents.clamp(min=0))  # [B, N] target's choice after each node's parent
    match = tokens == at_parent
    match[:, 0] = True  # the root is emitted already
    match &= (parents >= 0) | (torch.arange(n, device=tokens.device) == 0)
    ok = ~(anc & ~match[:, None, :]).any(-1)  # [B, N] the whole path to the node matches
    key = torch.where(ok, depths * n + (n - 1 - torch.arange(n, device=tokens.device)), -1)
    return key.argmax(-1)


def greedy_accept(tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Accepted path (node indices, starting with the root) and the bonus token. logits [N, V]."""
    best = logits.argmax(-1).to(tree.device)[None]  # [1, N]
    anc = tree.ancestor_mask()
    node = greedy_nodes(tree.tokens[None], tree.parents[None], anc[None], tree.depths()[None], best)[0]
    return anc[node].nonzero().flatten().tolist(), int(best[0, node])


def sample_accept(tree: TokenTree, logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Accepted path and bonus token under sampling; see the module docstring. The walk is sequential by nature
    (one accept/reject draw per tried child), but visits only the nodes on the accepted path and their children."""
    # [N, V] on the CPU: the draws use a CPU generator, so sampled output does not depend on the device
    probs = process_logits(logits, temperature, top_k, top_p).cpu()
    tokens, parents = tree.tokens.cpu(), tree.parents.cpu()
    path = [0]
    while True:
        node = path[-1]
        p = probs[node].clone()
        accepted = None
        tried: set[int] = set()
        for c in (parents == node).nonzero().flatten().tolist():
            x = int(tokens[c])
            if x in tried:
                continue
            tried.add(x)
            if torch.rand((), generator=generator).item() < p[x].item():
                accepted = c
                break
            p[x] = 0.0
            total = p.sum()
            if total <= 0:
                break
            p /= total
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
