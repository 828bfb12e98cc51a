"""Batched speculative decoding: several prompts decoded together, each row with its own token tree.

EAGLE's reference code (and `SpeculativeDecoder`) handle one sequence, because after each step every row has
accepted a different number of tokens, so rows no longer line up in the KV cache. Here the cache is ragged by
construction: each row carries a validity mask over the cache slots, and positions are passed explicitly.

    prefill        left-padded prompts; pad slots are invalid
    each step      every active row grows its tree (per-row drafter); the trees are padded to one width N (padding
                   nodes see only themselves); ONE target forward over [rows, N] with a [rows, 1, N, slots + N]
                   mask = row's valid slots + its tree's ancestor mask, and position ids = row length + depth
    accept         per row (greedy or rejection sampling, as in the single-sequence engine); the accepted nodes'
                   slots become valid
    compact        per row, the valid slots are gathered to the front (rows of different lengths are padded with
                   invalid slots); finished rows leave the batch

Why the cache is not kept in logical order per row: attention does not care where a key sits once its position
was rotated in at write time and the mask says who sees whom, so the only bookkeeping is the mask. The target's
KV cache must support per-row gathers: Hugging Face `DynamicCache` (edited in place) and leanlm's full-attention
caches (GQA, MLA, GLA; `LeanCache.gather`). Drafting stays per row (each row's tree has its own shape); on a GPU
the target forward, which is batched, dominates.

Greedy rows are token-identical to decoding each prompt alone up to floating-point differences between a batched
and a single forward (tests check identity in float32 on small models).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from leanlm.speculative.engine import SpecStats, _pick
from leanlm.speculative.target import hf_tree_masks
from leanlm.speculative.tree import TreeStrategy
from leanlm.speculative.verify import greedy_accept, sample_accept


class BatchedSpeculativeDecoder:
    """Speculative decoding of a batch of prompts with one target forward per step for all rows."""

    def __init__(self, model, head, strategy: TreeStrategy, drafter_factory: Callable[[], object] | None = None):
        from leanlm.speculative.draft import DraftSession

        self.model = model.eval()
        self.is_leanlm = type(model).__module__.startswith("leanlm")
        self.device = next(model.parameters()).device
        self.strategy = strategy
        self._session = drafter_factory or (lambda: DraftSession(head, model.get_input_embeddings(),
                                                                 model.get_output_embeddings()))

    def _mask(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        return mask if self.is_leanlm else hf_tree_masks(self.model, mask, q_pos, k_pos)

    def _gather(self, cache, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Keep batch rows `rows` [A'] and, per kept row, cache slots `index` [A', C']."""
        if self.is_leanlm:
            cache.select(rows)
            cache.gather(index)
            return
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)[rows]  # [A', H, S, D]
                idx = index[:, None, :, None].expand(t.shape[0], t.shape[1], index.shape[1], t.shape[3])
                setattr(layer, name, torch.gather(t, 2, idx))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 seed: int = 0) -> tuple[list[list[int]], list[SpecStats], dict]:
        """New tokens per prompt, per-row statistics, and batch totals (target forwards, seconds)."""
        dev = self.device
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        b = len(prompts)
        gens = [torch.Generator().manual_seed(seed + r) for r in range(b)]
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long, device=dev)
        valid = torch.zeros(b, width, dtype=torch.bool, device=dev)  # [B, S] which cache slots a row may see
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, device=dev)
            valid[r, width - len(p):] = True
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        t0 = time.perf_counter()
        kw = {}
        if not self.is_leanlm:
            from transformers import DynamicCache

            kw["past_key_values"] = DynamicCache()  # full layers (see leanlm.speculative.target)
        out = self.model(input_ids=ids, attention_mask=valid.long(), position_ids=pos, use_cache=True,
                         output_hidden_states=True, **kw)
        cache, feats = out.past_key_values, out.hidden_states[-1]
        stats = [SpecStats() for _ in range(b)]
        outs, roots, drafters = [], [], []
        for r, p in enumerate(prompts):
            root = _pick(out.logits[r, -1].float(), temperature, top_k, top_p, gens[r])
            d = self._session()
            d.prefill(feats[r, width - len(p):], list(p[1:]) + [root])
            outs.append([root])
            roots.append(root)
            drafters.append(d)
        length = [len(p) for p in prompts]  # logical length per row (the root's position)
        active = [r for r in range(b) if roots[r] not in eos and max_new_tokens > 1]
        totals = {"forwards": 1, "prefill_seconds": time.perf_counter() - t0, "draft_seconds": 0.0,
                  "verify_seconds": 0.0}
        if active:
            self._gather(cache, torch.tensor(active, dtype=torch.long, device=dev), self._compact(valid[active]))
            valid = self._valid(valid[active])
        while active:
            t1 = time.perf_counter()
            trees = []
            for r in active:
                t = time.perf_counter()
                trees.append(self.strategy.grow(drafters[r], roots[r]))
                drafters[r].end_tree()
                stats[r].draft_seconds += time.perf_counter() - t
            t2 = time.perf_counter()
            a, n, slots = len(active), max(len(t) for t in trees), valid.shape[1]
            ids = torch.zeros(a, n, dtype=torch.long, device=dev)
            pos = torch.zeros(a, n, dtype=torch.long, device=dev)
            mask = torch.zeros(a, 1, n, slots + n, dtype=torch.bool, device=dev)
            mask[:, 0, :, :slots] = valid[:, None, :]
            for i, (r, tree) in enumerate(zip(active, trees)):
                k = len(tree)
                ids[i, :k] = torch.tensor(tree.tokens, device=dev)
                pos[i, :k] = torch.tensor(tree.depths(), device=dev) + length[r]
                pos[i, k:] = length[r]
                mask[i, 0, :k, slots:slots + k] = tree.ancestor_mask(dev)
                mask[i, 0, k:, :slots] = False  # padding nodes see only themselves
                mask[i, 0, range(k, n), range(slots + k, slots + n)] = True
            k_pos = torch.cat([torch.arange(slots, device=dev).expand(a, slots), pos], dim=1)  # compacted slots
            out = self.model(input_ids=ids, attention_mask=self._mask(mask, pos, k_pos), position_ids=pos,
                             past_key_values=cache, use_cache=True, output_hidden_states=True)
            cache, logits, feats = out.past_key_values, out.logits.float(), out.hidden_states[-1]
            valid = torch.cat([valid, torch.zeros(a, n, dtype=torch.bool, device=dev)], dim=1)
            still = []
            for i, (r, tree) in enumerate(zip(active, trees)):
                k = len(tree)
                if temperature <= 0:
                    path, bonus = greedy_accept(tree, logits[i, :k])
                else:
                    path, bonus = sample_accept(tree, logits[i, :k], temperature, top_k, top_p, gens[r])
                valid[i, slots + torch.tensor(path, device=dev)] = True
                new = [tree.tokens[j] for j in path[1:]] + [bonus]
                drafters[r].prefill(feats[i, path], new)
                length[r] += len(path)
                st = stats[r]
                st.steps += 1
                st.accepted += len(path) - 1
                st.candidates += k
                for j, tok in enumerate(new):
                    if tok in eos:
                        new = new[: j + 1]
                        break
                new = new[: max_new_tokens - len(outs[r])]
                outs[r] += new
                roots[r] = new[-1]
                if roots[r] not in eos and len(outs[r]) < max_new_tokens:
                    still.append(i)
            t3 = time.perf_counter()
            totals["forwards"] += 1
            totals["draft_seconds"] += t2 - t1
            totals["verify_seconds"] += t3 - t2
            for r in active:
                stats[r].verify_seconds += (t3 - t2) / a
            active = [active[i] for i in still]
            if active:
                keep = torch.tensor(still, dtype=torch.long, device=dev)
                self._gather(cache, keep, self._compact(valid[keep]))
                valid = self._valid(valid[keep])
        for r in range(b):
            stats[r].new_tokens = len(outs[r])
        return outs, stats, totals

    @staticmethod
    def _compact(valid: torch.Tensor) -> torch.Tensor:
        """Slot index [A, C] that moves each row's valid slots to the front, in slot order (C = most valid slots of
        a row; a shorter row is filled up with invalid slots, which `_valid` masks)."""
        counts = valid.sum(-1)
        c = int(counts.max()) if len(counts) else 0
        order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid slots first, in slot order
        return order[:, :max(c, 1)]

    @staticmethod
    def _valid(valid: torch.Tensor) -> torch.Tensor:
        counts = valid.sum(-1)
        c = max(int(counts.max()) if len(counts) else 0, 1)
        return torch.arange(c, device=valid.device)[None] < counts[:, None]
