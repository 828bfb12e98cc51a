"""The decoding loop: plain decoding and speculative decoding of one prompt or a batch, in one engine.

    target.prefill over the right-padded prompts -> first token per row (the root of its first tree)
    repeat: strategy.grow(drafter) -> tree per row          (draft time)
            ONE target step over [B, N] (trees padded to one width, each row sees its own slots and its tree)
            accept a path per row (vectorised greedy, or rejection sampling) + one bonus token from the target
            target.move: each row's accepted path into place just after its length (in the same buffer)
            the drafter re-reads the accepted positions with the target's features

Plain decoding is the same loop without a drafter (one token per row per step); single-sequence decoding is the
batch of one. Greedy output is token-for-token what plain greedy decoding gives, and sampled output is distributed
as plain sampling (tests check both); batched greedy rows equal single decoding up to floating-point differences of
a batched forward (tests check identity in float32 on small models).

Rows that finish stay in the batch until all have (their step is a one-node dummy, its result ignored): the batch
shape stays fixed, which is what a compiled target wants; the waste is the finished rows' share of a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from leanlm.speculative.draft import DraftSession
from leanlm.speculative.target import Target, bucket_for, make_target
from leanlm.speculative.tree import TokenTree, TreeStrategy
from leanlm.speculative.verify import greedy_nodes, process_logits, sample_accept


@dataclass
class SpecStats:
    steps: int = 0
    accepted: int = 0  # drafted tokens accepted (excluding the bonus token)
    candidates: int = 0  # tree nodes verified, root included (C2T's γ)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    target_seconds: float = 0.0  # inside the target's forward (part of verify)
    draft_forward_seconds: float = 0.0  # inside the draft head's forwards (part of draft and verify)
    compile_seconds: float = 0.0  # steps that compiled a new graph (part of verify)
    trees: list[TokenTree] = field(default_factory=list, repr=False)
    accepted_paths: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tau(self) -> float:
        """Mean accepted draft tokens per step, bonus excluded (C2T's τ; EAGLE papers report τ + 1)."""
        return self.accepted / max(1, self.steps)

    def as_dict(self) -> dict:
        s = max(1, self.steps)
        decode = self.draft_seconds + self.verify_seconds
        return {"steps": self.steps, "tau": self.tau, "tau_plus_bonus": self.tau + 1,
                "candidates_per_step": self.candidates / s, "draft_ms_per_step": 1000 * self.draft_seconds / s,
                "verify_ms_per_step": 1000 * self.verify_seconds / s, "new_tokens": self.new_tokens,
                "decode_seconds": decode, "compile_seconds": self.compile_seconds,
                "overhead_fraction": max(0.0, decode - self.compile_seconds - self.target_seconds
                                         - self.draft_forward_seconds) / max(1e-9, decode - self.compile_seconds)}


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = process_logits(logits, temperature, top_k, top_p).cpu()  # the CPU generator draws on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


def _eos_set(eos_token_id) -> set[int]:
    return set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))


def cache_capacity(prompt: int, max_new_tokens: int, tree: int) -> int:
    """Cache slots for a generation: prompt + new tokens + the widest step (bucketed), rounded up to 256 so that
    prompts of similar length share one compiled graph shape."""
    need = prompt + max_new_tokens + (bucket_for(tree) or tree) + 1
    return -(-need // 256) * 256


class SpeculativeDecoder:
    """Speculative decoding of a target with a draft head (`leanlm.speculative.draft`) and a tree strategy; with
    `strategy=None`, plain decoding through the same backend.

    target: a model or a `Target`; compile: "auto" / "on" / "off" (or a bool), see `leanlm.speculative.target`;
    capacity: cache slots (default: enough for the call, rounded up to 256; give one value for a series of calls
    to keep one compiled graph per step width). `drafter_factory` replaces the head with any object offering
    prefill(features, tokens) / root() / expand(nodes, tokens, parents) / end_tree() (tests use the target itself
    as a drafter)."""

    def __init__(self, target, head, strategy: TreeStrategy | None, keep_trees: bool = False,
                 drafter_factory: Callable[[], object] | None = None, compile: bool | str = False,
                 capacity: int | None = None):

        self.target: Target = make_target(target, compile)
        self.head, self.strategy, self.keep_trees, self.capacity = head, strategy, keep_trees, capacity
        self._new_drafter = drafter_factory or (lambda: DraftSession(head, self.target.embed_tokens,
                                                                 self.target.lm_head))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, seed: int = 0,
                 on_tokens: Callable[[list[int]], None] | None = None) -> tuple[list[int], SpecStats]:
        """New tokens for the prompt `input_ids` [1, T], and statistics (the batch of one)."""
        if input_ids.shape[0] != 1:
            raise ValueError("SpeculativeDecoder.generate takes one sequence; use generate_batch for several")
        outs, stats, _ = self.generate_batch([input_ids[0].tolist()], max_new_tokens, temperature, top_k, top_p,
                                             eos_token_id, seed, on_tokens)
        return outs[0], stats[0]

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                       seed: int = 0, on_tokens: Callable[[list[int]], None] | None = None
                       ) -> tuple[list[list[int]], list[SpecStats], dict]:
        """New tokens per prompt, per-row statistics, and batch totals (target forwards, seconds). Row r samples
        with its own generator seeded `seed + r`. `on_tokens` (batch of one only) receives each step's tokens."""
        tgt, strategy = self.target, self.strategy
        dev = tgt.device
        b = len(prompts)
        if b > 1 and not tgt.supports_batch:
            raise ValueError("this target decodes one sequence at a time (leanlm NSA/ASA layers)")
        eos = _eos_set(eos_token_id)
        gens = [torch.Generator().manual_seed(seed + r) for r in range(b)]
        lens = [len(p) for p in prompts]
        width = max(lens)
        context = getattr(getattr(tgt.config, "get_text_config", lambda **_: tgt.config)(decoder=True),
                          "max_position_embeddings", None)
        if context and width + max_new_tokens > context:
            raise ValueError(f"a {width}-token prompt plus max_new_tokens={max_new_tokens} exceeds the model's context "
                             f"of {context} positions; shorten the prompt or lower max_new_tokens")
        bound = (strategy.node_bound() or 256) if strategy is not None else 1
        capacity = self.capacity or cache_capacity(width, max_new_tokens, bound)
        if width + max_new_tokens + (bucket_for(bound) or bound) + 1 > capacity:
            raise ValueError(f"capacity {capacity} is too small for a {width}-token prompt, {max_new_tokens} new "
                             f"tokens and {bound}-node steps")
        tgt.start(b, capacity)
        # the features the head reads: the last hidden state (EAGLE-1) or several layers' (EAGLE-3)
        tgt.feature_layers = getattr(self.head, "feature_layers", None) if strategy is not None else None
        ids = torch.zeros(b, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p)
        lengths = torch.tensor(lens, device=dev)
        stats = [SpecStats() for _ in range(b)]
        compile0 = tgt.compile_stats.total_seconds()
        t0 = time.perf_counter()
        logits, feats = tgt.prefill(ids.to(dev), lengths)
        roots = [_pick(logits[r], temperature, top_k, top_p, gens[r]) for r in range(b)]
        drafters = []
        if strategy is not None:
            for r, p in enumerate(prompts):
                d = self._new_drafter()
                d.prefill(feats[r, : len(p)], list(p[1:]) + [roots[r]])
                drafters.append(d)
        outs = [[root] for root in roots]
        if on_tokens:
            on_tokens([roots[0]])
        active = [r for r in range(b) if roots[r] not in eos and max_new_tokens > 1]
        prefill_seconds = time.perf_counter() - t0
        for st in stats:
            st.prefill_seconds = prefill_seconds
        totals = {"forwards": 1, "prefill_seconds": prefill_seconds, "draft_seconds": 0.0, "verify_seconds": 0.0}
        while active:
            t1 = time.perf_counter()
            trees: list[TokenTree | None] = [None] * b
            if strategy is not None:
                for r in active:
                    t = time.perf_counter()
                    f0 = getattr(drafters[r], "forward_seconds", 0.0)
                    trees[r] = strategy.grow(drafters[r], roots[r])
                    drafters[r].end_tree()
                    stats[r].draft_seconds += time.perf_counter() - t
                    stats[r].draft_forward_seconds += getattr(drafters[r], "forward_seconds", 0.0) - f0
            t2 = time.perf_counter()
            n = max((len(t) for t in trees if t is not None), default=1)
            start = int(max(lens[r] for r in range(b)))
            step_ids = torch.zeros(b, n, dtype=torch.long, device=dev)
            step_pos = torch.zeros(b, n, dtype=torch.long, device=dev)
            parents = torch.full((b, n), -1, dtype=torch.long, device=dev)
            depths = torch.zeros(b, n, dtype=torch.long, device=dev)
            anc = torch.eye(n, dtype=torch.bool, device=dev)[None].repeat(b, 1, 1)
            chain = True
            for r in range(b):
                tree = trees[r]
                step_pos[r] = lens[r]
                if tree is None:
                    step_ids[r, 0] = roots[r]
                    parents[r, 0] = -1
                    continue
                k = len(tree)
                chain = chain and tree.is_chain() and k == n
                step_ids[r, :k] = tree.tokens.to(dev)
                parents[r, :k] = tree.parents.to(dev)
                depths[r, :k] = tree.depths().to(dev)
                step_pos[r, :k] = depths[r, :k] + lens[r]
                anc[r, :k, :k] = tree.ancestor_mask(dev)
            causal = chain and b == 1  # a causal block needs no tree mask: every attention kind can verify it
            f0 = tgt.forward_seconds
            c0 = tgt.compile_stats.total_seconds()
            logits, feats = tgt.step(step_ids, step_pos, None if causal else anc, lengths, start)
            target_seconds = tgt.forward_seconds - f0
            compile_seconds = tgt.compile_stats.total_seconds() - c0
            paths, bonus = self._accept(trees, step_ids, parents, anc, depths, logits, active, temperature, top_k,
                                        top_p, gens)
            if any(lens[r] != start or paths[r] != list(range(len(paths[r]))) for r in active):
                span = max(len(paths[r]) for r in active)  # each row's path to just after its own length
                index = [[start + j for j in paths[r]] + [lens[r] + k for k in range(len(paths[r]), span)]
                         if r in paths else [lens[r] + k for k in range(span)] for r in range(b)]
                tgt.move(torch.tensor(lens, device=dev), torch.tensor(index, device=dev))
            still = []
            for r in active:
                path = paths[r]
                tree = trees[r]
                new = ([int(t) for t in tree.tokens[path[1:]].tolist()] if tree is not None and len(path) > 1
                       else []) + [bonus[r]]
                if strategy is not None:
                    f1 = getattr(drafters[r], "forward_seconds", 0.0)
                    drafters[r].prefill(feats[r, path], new)
                    stats[r].draft_forward_seconds += getattr(drafters[r], "forward_seconds", 0.0) - f1
                lens[r] += len(path)
                st = stats[r]
                st.steps += 1
                st.accepted += len(path) - 1
                st.candidates += len(tree) if tree is not None else 1
                st.target_seconds += target_seconds / len(active)
                st.compile_seconds += compile_seconds / len(active)
                if self.keep_trees and tree is not None:
                    st.trees.append(tree)
                    st.accepted_paths.append(path)
                for j, tok in enumerate(new):
                    if tok in eos:
                        new = new[: j + 1]
                        break
                new = new[: max_new_tokens - len(outs[r])]
                outs[r] += new
                roots[r] = new[-1]
                if on_tokens:
                    on_tokens(new)
                if roots[r] not in eos and len(outs[r]) < max_new_tokens:
                    still.append(r)
            lengths = torch.tensor(lens, device=dev)
            t3 = time.perf_counter()
            totals["forwards"] += 1
            totals["draft_seconds"] += t2 - t1
            totals["verify_seconds"] += t3 - t2
            for r in active:
                stats[r].verify_seconds += (t3 - t2) / len(active)
            active = still
        for r in range(b):
            stats[r].new_tokens = len(outs[r])
        totals["compile_seconds"] = tgt.compile_stats.total_seconds() - compile0
        return outs, stats, totals

    @staticmethod
    def _accept(trees, ids, parents, anc, depths, logits, active, temperature, top_k, top_p, gens
                ) -> tuple[dict[int, list[int]], dict[int, int]]:
        """Accepted path (node indices from the root) and bonus token per active row."""
        if temperature <= 0:
            best = logits.argmax(-1)  # [B, N]
            node = greedy_nodes(ids, parents, anc, depths, best)  # [B]
            rows = torch.arange(ids.shape[0], device=ids.device)
            on_path = anc[rows, node].cpu()  # [B, N]: one small host copy per step
            bonus = best[rows, node].tolist()
            return ({r: on_path[r].nonzero().flatten().tolist() for r in active}, {r: bonus[r] for r in active})
        paths, bonus = {}, {}
        for r in active:
            tree = trees[r] or TokenTree(ids[r, :1], torch.tensor([-1]), torch.zeros(1))
            paths[r], bonus[r] = sample_accept(tree, logits[r, : len(tree)], temperature, top_k, top_p, gens[r])
        return paths, bonus


class BatchedSpeculativeDecoder(SpeculativeDecoder):
    """`SpeculativeDecoder` for several prompts: `generate(prompts)` is `generate_batch` (the same engine)."""

    def __init__(self, model, head, strategy: TreeStrategy | None, drafter_factory: Callable[[], object] | None = None,
                 compile: bool | str = False, capacity: int | None = None):
        super().__init__(model, head, strategy, drafter_factory=drafter_factory, compile=compile, capacity=capacity)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int = 0) -> tuple[list[list[int]], list[SpecStats], dict]:
        return self.generate_batch(prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed)


@torch.no_grad()
def plain_generate(target, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, eos_token_id: int | list[int] | None = None, seed: int = 0,
                   on_tokens: Callable[[list[int]], None] | None = None, compile: bool | str = False,
                   capacity: int | None = None) -> tuple[list[int], float]:
    """Token-by-token decoding through the same backend and sampling code; returns new tokens and decode seconds
    (after the prompt). Pass a `Target` (`make_target`) to reuse its cache and compiled graphs across calls."""
    dec = SpeculativeDecoder(target, None, None, compile=compile, capacity=capacity)
    out, st = dec.generate(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, on_tokens)
    return out, st.draft_seconds + st.verify_seconds
