"""The speculative decoding loop: draft a tree, verify it with one target forward, keep the accepted path.

    target prefill over the prompt -> first token (the root of the first tree)
    repeat: strategy.grow(drafter) -> tree            (draft time)
            target forward over the tree (tree mask)   (verify time)
            accept a path (greedy or rejection sampling) + one bonus token from the target
            target cache keeps the accepted path; the draft re-reads the accepted positions with target features

Greedy output is token-for-token what plain greedy decoding gives, and sampled output is distributed as plain
sampling (tests check both). `plain_generate` is the baseline with the same sampling code path.

Batch size: one sequence per call. Several prompts are served by calling `generate` per prompt; one tree forward
per sequence is what makes the accepted-path cache compaction exact without padding bookkeeping (EAGLE's reference
code has the same limit). Batched trees need per-row cache lengths (a paged or ragged cache); not built yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from leanlm.speculative.target import Target
from leanlm.speculative.tree import TokenTree, TreeStrategy
from leanlm.speculative.verify import greedy_accept, process_logits, sample_accept, tree_inputs


@dataclass
class SpecStats:
    steps: int = 0
    accepted: int = 0  # drafted tokens accepted (excluding the bonus token)
    candidates: int = 0  # tree nodes verified, root included (C2T's γ)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    trees: list[TokenTree] = field(default_factory=list, repr=False)
    accepted_paths: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tau(self) -> float:
        """Mean accepted draft tokens per step, bonus excluded (C2T's τ; EAGLE papers report τ + 1)."""
        return self.accepted / max(1, self.steps)

    def as_dict(self) -> dict:
        s = max(1, self.steps)
        return {"steps": self.steps, "tau": self.tau, "tau_plus_bonus": self.tau + 1,
                "candidates_per_step": self.candidates / s, "draft_ms_per_step": 1000 * self.draft_seconds / s,
                "verify_ms_per_step": 1000 * self.verify_seconds / s, "new_tokens": self.new_tokens,
                "decode_seconds": self.draft_seconds + self.verify_seconds}


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = process_logits(logits, temperature, top_k, top_p).cpu()  # the CPU generator draws on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


class SpeculativeDecoder:
    """Speculative decoding of one target with a draft head (`leanlm.speculative.draft`) and a tree strategy."""

    def __init__(self, target, head, strategy: TreeStrategy, keep_trees: bool = False,
                 drafter_factory: Callable[[], object] | None = None):
        """`head`: an `EagleDraftHead` for this target. `drafter_factory` replaces it with any object offering
        prefill(features, tokens) / root() / expand(...) / end_tree() (tests use the target itself as a drafter)."""
        from leanlm.speculative.draft import DraftSession

        self.target = target if isinstance(target, Target) else Target(target)
        self.head, self.strategy, self.keep_trees = head, strategy, keep_trees
        self._session = drafter_factory or (lambda: DraftSession(head, self.target.embed_tokens,
                                                                 self.target.lm_head))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, seed: int = 0,
                 on_tokens: Callable[[list[int]], None] | None = None) -> tuple[list[int], SpecStats]:
        """New tokens for the prompt `input_ids` [1, T], and statistics."""
        if input_ids.shape[0] != 1:
            raise ValueError("SpeculativeDecoder.generate takes one sequence; call it per prompt")
        gen = torch.Generator().manual_seed(seed)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        stats = SpecStats()
        tgt = self.target
        tgt.reset()
        t0 = time.perf_counter()
        logits, feats = tgt.forward(input_ids.to(tgt.device))
        prompt = input_ids[0].tolist()
        root = _pick(logits[-1], temperature, top_k, top_p, gen)
        drafter = self._session()
        drafter.prefill(feats, prompt[1:] + [root])
        stats.prefill_seconds = time.perf_counter() - t0
        out = [root]
        if on_tokens:
            on_tokens([root])
        while len(out) < max_new_tokens and root not in eos:
            t1 = time.perf_counter()
            tree = self.strategy.grow(drafter, root)
            drafter.end_tree()
            t2 = time.perf_counter()
            past = tgt.length()
            chain = all(p == i - 1 for i, p in enumerate(tree.parents))
            if chain:  # a causal block: no tree mask, so every attention kind (sliding-window, sparse) can verify it
                logits, feats = tgt.forward(torch.tensor([tree.tokens], device=tgt.device))
            else:
                ids, pos, mask = tree_inputs(tree, past, tgt.device)
                logits, feats = tgt.forward(ids, pos, mask)
            if temperature <= 0:
                path, bonus = greedy_accept(tree, logits)
            else:
                path, bonus = sample_accept(tree, logits, temperature, top_k, top_p, gen)
            if chain:
                tgt.crop(past + len(path))
            else:
                tgt.keep(past, path)
            new = [tree.tokens[i] for i in path[1:]] + [bonus]
            drafter.prefill(feats[path], new)
            t3 = time.perf_counter()
            stats.steps += 1
            stats.accepted += len(path) - 1
            stats.candidates += len(tree)
            stats.draft_seconds += t2 - t1
            stats.verify_seconds += t3 - t2
            if self.keep_trees:
                stats.trees.append(tree)
                stats.accepted_paths.append(path)
            for i, tok in enumerate(new):
                if tok in eos:
                    new = new[: i + 1]
                    break
            new = new[: max_new_tokens - len(out)]
            out += new
            root = new[-1]
            if on_tokens:
                on_tokens(new)
        stats.new_tokens = len(out)
        return out, stats


@torch.no_grad()
def plain_generate(target, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, eos_token_id: int | list[int] | None = None, seed: int = 0,
                   on_tokens: Callable[[list[int]], None] | None = None) -> tuple[list[int], float]:
    """Token-by-token decoding with the same sampling code; returns new tokens and decode seconds (after the
    prompt)."""
    tgt = target if isinstance(target, Target) else Target(target)
    gen = torch.Generator().manual_seed(seed)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    tgt.reset()
    logits, _ = tgt.forward(input_ids.to(tgt.device))
    tok = _pick(logits[-1], temperature, top_k, top_p, gen)
    out = [tok]
    if on_tokens:
        on_tokens([tok])
    t = time.perf_counter()
    while len(out) < max_new_tokens and tok not in eos:
        logits, _ = tgt.forward(torch.tensor([[tok]], device=tgt.device))
        tok = _pick(logits[-1], temperature, top_k, top_p, gen)
        out.append(tok)
        if on_tokens:
            on_tokens([tok])
    return out, time.perf_counter() - t
