"""Token trees and the strategies that grow them.

A `TokenTree` is what one verification step checks: node 0 is the root (the last token already emitted, which the
target has not processed yet) and every other node is a drafted token whose parent comes before it. It holds
tensors (tokens, parents, joint log-probabilities, all [N]); depths and the ancestor mask are derived with pointer
jumping (log2(depth) tensor steps, no loop over nodes), so building and verifying a tree has no per-node Python work.

A strategy grows a tree by asking a `Drafter` for next-token log-probabilities: `root()` for the root's children, and
`expand(nodes, tokens, parents)` (long tensors [n]) to add nodes and get the distributions of *their* children. A new
strategy is one class with a `grow(drafter, root_token)` method, added to `STRATEGIES` (or passed as an instance).

Shipped strategies:
  chain    the top-1 continuation, k tokens deep (classic speculative decoding with a draft head)
  static   a fixed tree shape given as child-rank paths (EAGLE-1 / Medusa style)
  eagle2   EAGLE-2's dynamic tree: each layer expands the top_k nodes of highest joint probability, each proposing its
           top_k children; after `depth` layers all candidates are reranked by joint probability and the best
           `total_tokens - 1` kept (ties go to the earlier, so shallower, node: the kept set is a connected tree)
  c2t      C2T's classifier-pruned tree (`leanlm.speculative.c2t`)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Drafter(Protocol):
    def root(self) -> torch.Tensor:
        """Log-probabilities [V] of the root's children."""

    def expand(self, nodes: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Add nodes (long tensors [n]: new ids, their tokens, their parents; each parent is 0 = root or an id
        added before) and return the log-probabilities [n, V] of each node's children."""


def _long(x, device=None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


@dataclass(eq=False)
class TokenTree:
    tokens: torch.Tensor  # [N] long; tokens[0] is the root
    parents: torch.Tensor  # [N] long; parents[0] == -1, parents[i] < i
    logp: torch.Tensor  # [N] float32; joint draft log-probability of the path to the node (root 0)
    extras: dict = field(default_factory=dict)  # per-node data a strategy wants to keep (e.g. the drafter's ids)
    _depths: torch.Tensor | None = field(default=None, init=False, repr=False)
    _anc: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        """Lists are accepted too (tests, hand-built trees) and turned into tensors on the tokens' device."""
        self.tokens = _long(self.tokens)
        self.parents = _long(self.parents, self.tokens.device)
        self.logp = torch.as_tensor(self.logp, dtype=torch.float32, device=self.tokens.device)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def _jump(self) -> torch.Tensor:
        return self.parents.clamp(min=0)  # the root points at itself

    def depths(self) -> torch.Tensor:
        """Depth of every node [N] (root 0), by pointer jumping: d += d[p]; p = p[p]."""
        if self._depths is None:
            d = (self.parents >= 0).long()
            p = self._jump()
            for _ in range(max(1, (len(self) - 1).bit_length())):
                d = d + d[p]
                p = p[p]
            self._depths = d
        return self._depths

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean [N, N]: row i is True at i and at every ancestor of i (pointer jumping: m |= m[p]; p = p[p])."""
        if self._anc is None:
            n = len(self)
            m = torch.eye(n, dtype=torch.bool, device=self.device)
            p = self._jump()
            m[torch.arange(n, device=self.device), p] = True
            for _ in range(max(1, (n - 1).bit_length())):
                m = m | m[p]
                p = p[p]
            self._anc = m
        return self._anc if device is None else self._anc.to(device)

    def is_chain(self) -> bool:
        return bool((self.parents[1:] == torch.arange(len(self) - 1, device=self.device)).all())

    def children(self, node: int) -> torch.Tensor:
        """Child node ids of `node`, in node order [c]."""
        return (self.parents == node).nonzero().flatten()

    def check(self) -> None:
        i = torch.arange(len(self), device=self.device)
        ok = bool(self.parents[0] == -1) and bool(((self.parents[1:] >= 0) & (self.parents[1:] < i[1:])).all())
        assert ok, "bad parents"


class TreeStrategy(ABC):
    """Grows one `TokenTree` per decoding step."""

    name: str = "strategy"

    @abstractmethod
    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        ...

    def node_bound(self) -> int | None:
        """An upper bound on the tree size (root included), so the engine can size its cache; None = unknown (the
        engine then leaves room for 256 nodes)."""
        return None

    def describe(self) -> str:
        return self.name


class Chain(TreeStrategy):
    """The top-1 continuation, `length` tokens deep."""

    name = "chain"

    def __init__(self, length: int = 5):
        if length < 1:
            raise ValueError("chain length must be >= 1")
        self.length = length

    def node_bound(self) -> int:
        return self.length + 1

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        lp = drafter.root()
        dev = lp.device
        tokens, logps = [_long([root_token], dev)], [torch.zeros(1, device=dev)]
        for i in range(1, self.length + 1):
            tok = lp.argmax()[None]  # [1]
            tokens.append(tok)
            logps.append(logps[-1] + lp[tok].float())
            if i < self.length:
                lp = drafter.expand(_long([i], dev), tok, _long([i - 1], dev))[0]
        n = self.length + 1
        return TokenTree(torch.cat(tokens), torch.arange(-1, n - 1, device=dev), torch.cat(logps))

    def describe(self) -> str:
        return f"chain(length={self.length})"


# A 25-node shape in the spirit of EAGLE-1's default tree: wide near the root, a long top-1 spine.
STATIC_DEFAULT: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 2, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 0),
)


class StaticTree(TreeStrategy):
    """A fixed shape: each path lists child ranks from the root, e.g. (0, 1) = the second-best child of the best
    child. Every prefix of a path must be a path too. The shape is compiled into index tensors once."""

    name = "static"

    def __init__(self, paths: tuple[tuple[int, ...], ...] = STATIC_DEFAULT):
        paths = tuple(sorted(set(tuple(p) for p in paths), key=lambda p: (len(p), p)))
        known = set(paths) | {()}
        for p in paths:
            if p[:-1] not in known:
                raise ValueError(f"static tree path {p} has no parent path {p[:-1]}")
        self.paths = paths
        node_of = {(): 0, **{p: i + 1 for i, p in enumerate(paths)}}
        self._parents = [-1] + [node_of[p[:-1]] for p in paths]
        # per layer: node ids, the row (in the previous layer's expansion) of each node's parent, child ranks, and
        # which of the layer's nodes are expanded (they have children)
        self._layers = []
        prev_rows = {0: 0}  # node id -> row in the distributions of the previous expansion
        for d in range(1, max(len(p) for p in paths) + 1):
            layer = [p for p in paths if len(p) == d]
            ids = [node_of[p] for p in layer]
            rows = [prev_rows[node_of[p[:-1]]] for p in layer]
            ranks = [p[-1] for p in layer]
            expanded = [i for i, p in zip(ids, layer) if any(q[:-1] == p for q in paths)]
            self._layers.append((ids, rows, ranks, expanded))
            prev_rows = {node: r for r, node in enumerate(expanded)}

    def node_bound(self) -> int:
        return len(self.paths) + 1

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        dist = drafter.root()[None]  # [1, V]: the distributions of the current layer's parents
        dev = dist.device
        parents = _long(self._parents, dev)
        tokens = torch.zeros(len(self._parents), dtype=torch.long, device=dev)
        logp = torch.zeros(len(self._parents), device=dev)
        tokens[0] = root_token
        for ids, rows, ranks, expanded in self._layers:
            ids_t, rows_t, ranks_t = _long(ids, dev), _long(rows, dev), _long(ranks, dev)
            top = dist.topk(max(ranks) + 1, dim=-1)  # [R, r]
            tokens[ids_t] = top.indices[rows_t, ranks_t]
            logp[ids_t] = logp[parents[ids_t]] + top.values[rows_t, ranks_t].float()
            if expanded:
                e = _long(expanded, dev)
                dist = drafter.expand(e, tokens[e], parents[e])
        return TokenTree(tokens, parents, logp)

    def describe(self) -> str:
        return f"static({len(self.paths)} nodes)"


class Eagle2(TreeStrategy):
    """EAGLE-2's context-aware dynamic tree (Li et al. 2024, arXiv 2406.16858): expansion by joint probability per
    layer, then a global rerank to `total_tokens` (which counts the root, as EAGLE's `total_token` does)."""

    name = "eagle2"

    def __init__(self, total_tokens: int = 60, depth: int = 6, top_k: int = 10):
        if total_tokens < 2 or depth < 1 or top_k < 1:
            raise ValueError("eagle2 needs total_tokens >= 2, depth >= 1, top_k >= 1")
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k

    def node_bound(self) -> int:
        return min(self.total_tokens, 1 + self.top_k + self.top_k ** 2 * (self.depth - 1))

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        k = self.top_k
        top = drafter.root().topk(k)
        dev = top.values.device
        # the candidate pool, in layer order (pool id = position): tokens, parents (0 = root), joint log-probs
        tokens = [_long([root_token], dev), top.indices]
        parents = [_long([-1], dev), torch.zeros(k, dtype=torch.long, device=dev)]
        scores = [torch.zeros(1, device=dev), top.values.float()]
        front = torch.arange(1, k + 1, device=dev)  # pool ids of the frontier [K]
        f_tok, f_par, f_score = top.indices, parents[1], scores[1]
        size = 1 + k
        for _ in range(self.depth - 1):
            out = drafter.expand(front, f_tok, f_par)  # [K, V]
            best = out.topk(k, dim=-1)
            cand = (f_score[:, None] + best.values.float()).flatten()  # [K*K] joint log-probs
            tok = best.indices.flatten()
            par = front.repeat_interleave(k)
            tokens.append(tok)
            parents.append(par)
            scores.append(cand)
            order = cand.topk(k).indices
            front, f_tok, f_par, f_score = size + order, tok[order], par[order], cand[order]
            size += cand.numel()
        tokens_t, parents_t, scores_t = torch.cat(tokens), torch.cat(parents), torch.cat(scores)
        # rerank: the best total_tokens - 1 candidates by joint log-prob; the stable sort puts the earlier pool id
        # first on ties, and a parent (never less likely than its child) always comes before it
        order = torch.sort(-scores_t[1:], stable=True).indices[: self.total_tokens - 1] + 1
        keep = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), order.sort().values])
        new_id = torch.full((size,), -1, dtype=torch.long, device=dev)
        new_id[keep] = torch.arange(keep.numel(), device=dev)
        new_parents = torch.cat([_long([-1], dev), new_id[parents_t[keep[1:]]]])
        return TokenTree(tokens_t[keep], new_parents, scores_t[keep], extras={"pool": keep})

    def describe(self) -> str:
        return f"eagle2(total_tokens={self.total_tokens}, depth={self.depth}, top_k={self.top_k})"
