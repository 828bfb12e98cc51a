"""Token trees and the strategies that grow them.

A `TokenTree` is what one verification step checks: node 0 is the root (the last token already emitted, which the
target has not processed yet) and every other node is a drafted token whose parent comes before it. A strategy
grows a tree by asking a `Drafter` for next-token log-probabilities: `root()` for the root's children, and
`expand(nodes, tokens, parents)` to add nodes and get the distributions of *their* children. A new strategy is one
class with a `grow(drafter)` method.

Shipped strategies:
  chain    the top-1 continuation, k tokens deep (classic speculative decoding with a draft head)
  static   a fixed tree shape given as child-rank paths (EAGLE-1 / Medusa style)
  eagle2   EAGLE-2's dynamic tree: each layer expands the top_k nodes of highest joint probability, each proposing its
           top_k children; after `depth` layers all candidates are reranked by joint probability and the best
           `total_tokens - 1` kept (ties go to the shallower node, so the kept set is a connected tree)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Drafter(Protocol):
    def root(self) -> torch.Tensor:
        """Log-probabilities [V] of the root's children."""

    def expand(self, nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Add nodes (new ids; each parent is 0 = root or an id added before) and return the log-probabilities
        [len(nodes), V] of each node's children."""


@dataclass
class TokenTree:
    tokens: list[int]  # [N]; tokens[0] is the root
    parents: list[int]  # [N]; parents[0] == -1, parents[i] < i
    logp: list[float]  # [N]; joint draft log-probability of the path to the node (root 0)
    extras: dict[str, list] = field(default_factory=dict)  # per-node data a strategy wants to keep (e.g. features)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        d = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self) -> list[list[int]]:
        ch: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            ch[self.parents[i]].append(i)
        return ch

    def ancestor_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean [N, N]: row i is True at i and at every ancestor of i."""
        n = len(self.tokens)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask.to(device)

    def check(self) -> None:
        assert self.parents[0] == -1 and all(0 <= p < i for i, p in enumerate(self.parents) if i), "bad parents"


class TreeStrategy(ABC):
    """Grows one `TokenTree` per decoding step."""

    name: str = "strategy"

    @abstractmethod
    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        ...

    def describe(self) -> str:
        return self.name


class Chain(TreeStrategy):
    """The top-1 continuation, `length` tokens deep."""

    name = "chain"

    def __init__(self, length: int = 5):
        if length < 1:
            raise ValueError("chain length must be >= 1")
        self.length = length

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        tokens, parents, logp = [root_token], [-1], [0.0]
        lp = drafter.root()
        for i in range(1, self.length + 1):
            tok = int(lp.argmax())
            tokens.append(tok)
            parents.append(i - 1)
            logp.append(logp[-1] + float(lp[tok]))
            if i < self.length:
                lp = drafter.expand([i], [tok], [i - 1])[0]
        return TokenTree(tokens, parents, logp)

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
    child. Every prefix of a path must be a path too."""

    name = "static"

    def __init__(self, paths: tuple[tuple[int, ...], ...] = STATIC_DEFAULT):
        paths = tuple(sorted(set(tuple(p) for p in paths), key=lambda p: (len(p), p)))
        known = set(paths) | {()}
        for p in paths:
            if p[:-1] not in known:
                raise ValueError(f"static tree path {p} has no parent path {p[:-1]}")
        self.paths = paths

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        tokens, parents, logp = [root_token], [-1], [0.0]
        node_of: dict[tuple[int, ...], int] = {(): 0}
        dist: dict[tuple[int, ...], torch.Tensor] = {(): drafter.root()}
        depth = max(len(p) for p in self.paths)
        for d in range(1, depth + 1):
            layer = [p for p in self.paths if len(p) == d]
            for p in layer:
                parent = node_of[p[:-1]]
                ranked = dist[p[:-1]].topk(p[-1] + 1)
                tok = int(ranked.indices[p[-1]])
                node_of[p] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
                logp.append(logp[parent] + float(ranked.values[p[-1]]))
            to_expand = [p for p in layer if any(q[:-1] == p for q in self.paths if len(q) == d + 1)]
            if to_expand:
                ids = [node_of[p] for p in to_expand]
                out = drafter.expand(ids, [tokens[i] for i in ids], [parents[i] for i in ids])
                for p, row in zip(to_expand, out):
                    dist[p] = row
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

    def grow(self, drafter: Drafter, root_token: int) -> TokenTree:
        k = self.top_k
        # the candidate pool, in layer order: token, parent (pool id, 0 = root), joint log-prob
        tokens, parents, scores = [root_token], [-1], [0.0]
        top = drafter.root().topk(k)
        frontier = []
        for v, t in zip(top.values.tolist(), top.indices.tolist()):
            frontier.append(len(tokens))
            tokens.append(t)
            parents.append(0)
            scores.append(v)
        for _ in range(self.depth - 1):
            out = drafter.expand(frontier, [tokens[i] for i in frontier], [parents[i] for i in frontier])  # [K, V]
            best = out.topk(k, dim=-1)
            cand = torch.tensor([scores[i] for i in frontier], dtype=out.dtype,
                                device=out.device)[:, None] + best.values  # [K, K]
            first = len(tokens)
            for r, node in enumerate(frontier):
                for c in range(k):
                    tokens.append(int(best.indices[r, c]))
                    parents.append(node)
                    scores.append(float(cand[r, c]))
            order = cand.flatten().topk(k).indices.tolist()
            frontier = [first + j for j in order]
        # rerank: best total_tokens - 1 candidates by joint log-prob, shallower (earlier) first on ties
        pool = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], i))[: self.total_tokens - 1]
        keep = [0] + sorted(pool)
        index = {old: new for new, old in enumerate(keep)}
        for i in keep[1:]:
            if parents[i] not in index:  # cannot happen while child scores <= parent scores; guard anyway
                raise RuntimeError("eagle2 rerank produced a disconnected tree")
        return TokenTree([tokens[i] for i in keep], [-1] + [index[parents[i]] for i in keep[1:]],
                         [scores[i] for i in keep], extras={"pool": keep})  # pool = the drafter's node ids

    def describe(self) -> str:
        return f"eagle2(total_tokens={self.total_tokens}, depth={self.depth}, top_k={self.top_k})"


def make_strategy(name: str, **kw) -> TreeStrategy:
    """Strategy by name: chain, static, eagle2 (and c2t, registered by `leanlm.speculative.c2t` when it lands)."""
    table = {"chain": Chain, "static": StaticTree, "eagle2": Eagle2, **EXTRA_STRATEGIES}
    if name not in table:
        raise ValueError(f"unknown speculative strategy {name!r}; use one of {sorted(table)} or none")
    return table[name](**kw)


EXTRA_STRATEGIES: dict[str, type] = {}


def parse_strategy(spec: str, **defaults) -> TreeStrategy:
    """A strategy from text: `name` or `name:key=value:key=value`, e.g. `eagle2:total_tokens=30:depth=5`,
    `c2t:beta=0.3`. Values are read as int, then float, then None/str; `defaults` (e.g. classifier=PATH) fill
    arguments the text leaves out and that the strategy takes."""
    import inspect

    name, *pairs = spec.strip().split(":")
    kw = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"strategy {spec!r}: {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        kw[key] = None if value == "None" else value
    table = {"chain": Chain, "static": StaticTree, "eagle2": Eagle2, **EXTRA_STRATEGIES}
    if name in table:
        accepted = inspect.signature(table[name].__init__).parameters
        bad = [k for k in kw if k not in accepted]
        if bad:
            raise ValueError(f"strategy {spec!r}: {name} takes no {bad}; it takes {sorted(set(accepted) - {'self'})}")
        kw = {k: v for k, v in defaults.items() if k in accepted and v is not None} | kw
    return make_strategy(name, **kw)
