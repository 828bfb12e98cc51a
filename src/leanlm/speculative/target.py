"""The decoding backend: a target model behind one protocol, with a KV cache addressed by slot.

Every decoding loop in leanlm (plain decoding, chain, static trees, EAGLE-2, C2T; one row or a batch) talks to a
`Target`:

    start(batch, capacity)        a cache of `capacity` slots per row (allocated once per generation)
    prefill(ids, lengths)         right-padded prompts [B, T] into slots [0, T); row b's real tokens are [0, lengths[b])
    step(ids, pos, tree, lengths, start)
                                  N new tokens per row [B, N] at absolute positions pos [B, N], written to slots
                                  [start, start + N); row b sees its slots [0, lengths[b]) and, among the new
                                  ones, those `tree` [B, N, N] allows (None = causal: a chain or one token)
    move(dst, index)              row b's slots [dst[b], dst[b] + R) take the old slots index[b] [R]: the accepted
                                  path is moved into place in the same buffer; everything past a row's length is
                                  dead and masked, so rollback costs nothing

Invariant the engines keep: for every row, slot s < lengths[b] holds position s. The tree of the next step starts at
`start = max(lengths)`, so shorter rows of a batch leave a masked gap.

Implementations:
  `HFTarget`      any Hugging Face causal LM (Llama, SmolLM2, Qwen2/3, Mistral, Gemma-3, ...). The cache is a
                  `transformers.Cache` made of `SlotLayer`s: transformers' own `StaticLayer` (preallocated
                  [B, H, capacity, D], static addresses for torch.compile / CUDA graphs) with one change, the write
                  offset is a tensor the target sets (transformers' layer appends at its own running count and
                  cannot be rewound). Sliding-window models get full layers (a windowed static layer overwrites old
                  slots in a ring and cannot roll back) and a per-layer-type mask that hides keys more than
                  `sliding_window - 1` positions back. Masks are given explicitly as additive [B, 1, N, capacity].
                  Optional compilation (`compile=True`): `torch.compile` of the step, one graph per bucketed width
                  N (1, 2, 4, ..., 64; trees are padded with masked dummy nodes), inductor freezing on CPU, CUDA
                  graphs on GPU, inductor's FX graph cache under `.cache/inductor` so later runs reuse the graphs.
                  A failing compile falls back to eager with one warning line.
  `LeanTarget`    leanlm models. Their `LeanCache` states are already position-addressed buffers (GQA, MLA, GLA:
                  `GrowingBuffer`, preallocated with capacity doubling); trees and moves need those full-attention
                  kinds, NSA/ASA layers (sliding-window and block-sparse states) support causal steps of one row,
                  i.e. chain drafting and plain decoding. Not compiled (the cache is Python-side state).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from leanlm.cache import LeanCache, move_slots
from leanlm.corpus import cache_root

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # step widths compiled graphs are made for; wider trees run eager


def bucket_for(n: int) -> int | None:
    """The smallest bucket >= n, or None when n is wider than every bucket (that step runs eager)."""
    return next((b for b in BUCKETS if b >= n), None)


@dataclass
class CompileStats:
    """What compilation cost and did: seconds spent in steps that compiled a new graph, per bucket."""
    enabled: bool = False
    seconds: dict[int, float] = field(default_factory=dict)
    eager_steps: int = 0  # steps run eager while compiled (wider than the largest bucket)
    failed: str | None = None  # the error that turned compilation off

    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def make_target(model, compile: bool | str = False) -> "Target":
    """The `Target` for a model: `LeanTarget` for leanlm models, `HFTarget` for any other causal LM.
    compile: True/"on", False/"off", or "auto": on for Hugging Face targets on a GPU, off otherwise (on a CPU each
    graph takes about a minute to compile for SmolLM2-135M, which pays back only over thousands of tokens; the
    FX graph cache makes later runs cheaper, see docs/results/decoding.md)."""
    if isinstance(model, Target):
        return model
    lean = type(model).__module__.startswith("leanlm")
    if compile == "auto":
        compile = not lean and next(model.parameters()).device.type == "cuda"
    compile = compile in (True, "on")
    if lean:
        return LeanTarget(model, compile=compile)
    return HFTarget(model, compile=compile)


class Target:
    """What the engines need from a target model (see the module docstring)."""

    supports_trees = True
    supports_batch = True

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.compile_stats = CompileStats()
        self.forward_seconds = 0.0  # time inside the model's forwards (steps and prefills), for overhead accounting
        # Which features prefill/step return: None = the last hidden state (after the final norm; EAGLE-1), or ids
        # into HF's `hidden_states` tuple (k = output of layer k-1), concatenated [.., kC] (EAGLE-3's layers).
        self.feature_layers: tuple[int, ...] | None = None

    def features(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The features a draft head reads, from a forward's `hidden_states` (see `feature_layers`)."""
        if self.feature_layers is None:
            return hidden_states[-1]
        return torch.cat([hidden_states[k] for k in self.feature_layers], dim=-1)

    @property
    def embed_tokens(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def start(self, batch: int, capacity: int) -> None:
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] right-padded, lengths [B] -> logits at each row's last real token [B, V] (float32) and
        features [B, T, C] (last hidden states; [B, T, kC] with `feature_layers`)."""
        raise NotImplementedError

    def step(self, ids: torch.Tensor, pos: torch.Tensor, tree: torch.Tensor | None, lengths: torch.Tensor,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, pos [B, N]; tree [B, N, N] bool or None (causal); lengths [B] -> logits [B, N, V] (float32) and
        features [B, N, C] (or [B, N, kC], see `feature_layers`)."""
        raise NotImplementedError

    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        """For each row b: slots [dst[b], dst[b] + R) := old slots index[b] (dst [B], index [B, R])."""
        raise NotImplementedError


# -- Hugging Face targets ------------------------------------------------------------------------------------------

def _slot_layer_class():
    from transformers.cache_utils import StaticLayer

    class SlotLayer(StaticLayer):
        """transformers' `StaticLayer` whose writes go to slots [offset, offset + n), `offset` being one 0-d tensor
        shared by all layers and set by the target before each forward (no per-layer running count)."""

        def __init__(self, max_cache_len: int, offset: torch.Tensor, span: dict):
            super().__init__(max_cache_len=max_cache_len)
            self.offset = offset
            self.span = span  # {"slots": n or None}: how many leading slots attention reads (None = all)

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.batch_size, self.num_heads = key_states.shape[:2]
            self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
            shape = (self.batch_size, self.num_heads, self.max_cache_len)
            self.keys = torch.zeros(*shape, self.k_head_dim, dtype=self.dtype, device=self.device)
            self.values = torch.zeros(*shape, self.v_head_dim, dtype=self.dtype, device=self.device)
            self.cumulative_length = self.offset
            if self.device.type == "cuda":  # fixed addresses for CUDA graphs; on CPU a static tensor would be frozen
                torch._dynamo.mark_static_address(self.keys)  # as a constant (inductor freezing), see slot_cache
                torch._dynamo.mark_static_address(self.values)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            slots = torch.arange(key_states.shape[-2], device=self.device) + self.offset  # [n]
            self.keys.index_copy_(2, slots, key_states)
            self.values.index_copy_(2, slots, value_states)
            n = self.span["slots"]
            if n is None:
                return self.keys, self.values
            return self.keys[:, :, :n], self.values[:, :, :n]

        def get_seq_length(self) -> int:
            return int(self.offset) if self.is_initialized else 0

    return SlotLayer


_SLOT_LAYER = None


def slot_cache(config, capacity: int, device: torch.device) -> tuple[object, torch.Tensor, dict]:
    """A `transformers.Cache` of `SlotLayer`s (full layers for every layer type), its shared write offset, and the
    shared span (how many leading slots attention reads: eager steps read only the slots in use, compiled steps
    all `capacity`, a static shape).

    The tensors get static addresses (`mark_static_address`) on CUDA only, where CUDA graphs need them. On CPU they
    stay ordinary graph inputs: inductor's freezing folds static tensors in as constants, which for a cache means
    the compiled step would read a snapshot and never see later writes (caught by the compiled-vs-recomputation
    tests)."""
    global _SLOT_LAYER
    from transformers.cache_utils import Cache

    if _SLOT_LAYER is None:
        _SLOT_LAYER = _slot_layer_class()
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    offset = torch.zeros((), dtype=torch.long, device=device)
    if torch.device(device).type == "cuda":
        torch._dynamo.mark_static_address(offset)
    span = {"slots": None}
    cache = Cache(layers=[_SLOT_LAYER(capacity, offset, span) for _ in range(text.num_hidden_layers)])
    return cache, offset, span


def _layer_kinds(config) -> tuple[int | None, set[str]]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = set(getattr(text, "layer_types", None) or [])
    if window and not types:
        types = {"sliding_attention"}
    if not window:
        types = {"full_attention"}
    return window, types


def hf_tree_masks(model, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """A boolean mask [B, 1, N, S] as transformers takes it: additive floats (0 = attend, large negative =
    masked); for models with sliding-window layers also the windowed mask (keys at positions > q - window), as a
    {layer type: mask} dict when full and sliding layers are mixed. q_pos [B, N], k_pos [B, S] absolute positions."""
    dtype = next(model.parameters()).dtype
    window, types = _layer_kinds(model.config)

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    if types == {"full_attention"}:
        return additive(mask)
    slide = mask & (k_pos[:, None, None, :] > q_pos[:, None, :, None] - window)
    if "full_attention" in types:
        return {"full_attention": additive(mask), "sliding_attention": additive(slide)}
    return additive(slide)


def inductor_cache_dir() -> str:
    """Where inductor's FX graph cache lives: `$TORCHINDUCTOR_CACHE_DIR`, else `<leanlm cache>/inductor`."""

    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.makedirs(path, exist_ok=True)
    return path


class HFTarget(Target):
    """A Hugging Face causal LM on a slot cache, optionally compiled (see the module docstring)."""

    def __init__(self, model, compile: bool = False):
        super().__init__(model)
        self.cache = None
        self.offset: torch.Tensor | None = None
        self.capacity = 0
        self.compile_stats.enabled = compile
        self._compiled = None
        self._freezing = contextlib.nullcontext
        self._seen: set[tuple] = set()  # (batch, width) graphs compiled in this process
        if compile:
            inductor_cache_dir()
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(BUCKETS))
            if self.device.type == "cpu":
                # Freezing folds the weights in as constants and lets inductor use MKL's packed GEMM for them. It is
                # switched on around each compiled call (`_freezing`), where compilation happens: passed as a
                # per-compile option it is not applied (torch 2.13: the generated code then calls plain addmm on
                # weight inputs), and a global setting would leak into the user's other compiles.
                import torch._inductor.config as inductor_config

                self._freezing = lambda: inductor_config.patch(freezing=True)
                self._compiled = torch.compile(self._forward, dynamic=False)
            else:
                self._compiled = torch.compile(self._forward, dynamic=False, mode="reduce-overhead")  # CUDA graphs

    def start(self, batch: int, capacity: int) -> None:
        """A compiled target keeps its cache while it is large enough (a new cache means new graphs); an eager one
        allocates exactly `capacity` slots (attention reads every slot, so a smaller cache is a faster step)."""
        layer = None if self.cache is None else self.cache.layers[0]
        keep = (layer is not None and (not layer.is_initialized or layer.batch_size == batch)
                and (self.capacity >= capacity if self._compiled is not None else self.capacity == capacity))
        if not keep:
            self.cache, self.offset, self.span = slot_cache(self.config, capacity, self.device)
            self.capacity = capacity
        self._slots = torch.arange(self.capacity, device=self.device)

    @torch.no_grad()
    def warmup(self, widths=BUCKETS, batch: int = 1) -> None:
        """Compile the step graphs for these widths now (each costs one compile, or a cache hit on disk), so that
        the first decoding steps are not the ones that pay. Needs `start()` first; leaves no state behind."""
        if self._compiled is None:
            return
        dev = self.device
        if not self.cache.layers[0].is_initialized:
            self.prefill(torch.zeros(batch, 1, dtype=torch.long, device=dev), torch.ones(batch, dtype=torch.long,
                                                                                            device=dev))
        lengths = torch.ones(batch, dtype=torch.long, device=dev)
        for w in widths:
            ids = torch.zeros(batch, w, dtype=torch.long, device=dev)
            pos = (torch.arange(w, device=dev) + 1)[None].expand(batch, w)
            self.step(ids, pos, None, lengths, 1)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=self.cache,
                         use_cache=True, output_hidden_states=True)
        return out.logits, self.features(out.hidden_states)

    def _mask(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        return hf_tree_masks(self.model, visible[:, None], q_pos, k_pos)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        if t > self.capacity:
            raise ValueError(f"prompt of {t} tokens does not fit the cache of {self.capacity} slots")
        q = torch.arange(t, device=self.device)
        slots = self._slots[:t]  # a prefill is eager: attention reads the t slots written
        visible = (slots[None, None, :] <= q[None, :, None]) & (slots[None, None, :] < lengths[:, None, None])
        pos = q[None].expand(b, t)
        self.offset.fill_(0)
        self.span["slots"] = t
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=self._mask(visible, pos, slots[
            None].expand(b, -1)), past_key_values=self.cache, use_cache=True, output_hidden_states=True,
            logits_to_keep=lengths - 1)
        logits = out.logits[torch.arange(b, device=self.device), torch.arange(b, device=self.device)]  # [B, V]
        return logits.float(), self.features(out.hidden_states)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, tree: torch.Tensor | None, lengths: torch.Tensor,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = ids.shape
        width = n
        fn = self._forward
        if self._compiled is not None:
            width = bucket_for(n) or n
            if bucket_for(n) is None:
                self.compile_stats.eager_steps += 1
            else:
                fn = self._compiled
        if start + width > self.capacity:
            raise ValueError(f"step of {width} tokens at slot {start} overflows the cache ({self.capacity} slots)")
        if tree is None:
            tree = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None].expand(b, n, n)
        if width > n:  # padding nodes: token 0 at the row's position, seeing only themselves
            pad = width - n
            ids = torch.cat([ids, ids.new_zeros(b, pad)], 1)
            pos = torch.cat([pos, pos[:, :1].expand(b, pad)], 1)
            full = torch.eye(width, dtype=torch.bool, device=self.device)[None].repeat(b, 1, 1)
            full[:, :n, :n] = tree
            tree = full
        span = self.capacity if fn is self._compiled else start + width  # eager: read only the slots in use
        slots = self._slots[:span]
        visible = slots[None, None, :] < lengths[:, None, None]  # [B, 1, S]
        visible = visible.expand(b, width, span).clone()
        visible[:, :, start:start + width] = tree
        k_pos = slots[None].expand(b, -1).clone()
        k_pos[:, start:start + width] = pos
        mask = self._mask(visible, pos, k_pos)
        self.offset.fill_(start)
        self.span["slots"] = None if fn is self._compiled else span
        t0 = time.perf_counter()
        if fn is self._compiled:
            key = (b, width)
            try:
                with self._freezing():
                    logits, feats = fn(ids, pos, mask)
            except Exception as exc:  # noqa: BLE001 - any compile failure: fall back, never a wrong token
                self._compiled = None
                self.compile_stats.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
                print(f"warning: torch.compile failed ({self.compile_stats.failed}); decoding eager", file=sys.stderr)
                self.offset.fill_(start)
                self.span["slots"] = None  # the mask was built for every slot
                logits, feats = self._forward(ids, pos, mask)
            if key not in self._seen:
                self._seen.add(key)
                self.compile_stats.seconds[width] = self.compile_stats.seconds.get(width, 0.0) + \
                    time.perf_counter() - t0
        else:
            logits, feats = fn(ids, pos, mask)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - t0
        return logits[:, :n].float(), feats[:, :n]

    @torch.no_grad()
    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:

        for layer in self.cache.layers:
            move_slots(layer.keys, dst, index)
            move_slots(layer.values, dst, index)


# -- leanlm targets ------------------------------------------------------------------------------------------------

class LeanTarget(Target):
    """A leanlm model on its own `LeanCache` (see the module docstring)."""

    def __init__(self, model, compile: bool = False):
        super().__init__(model)

        self._cache_cls = LeanCache
        self.cache = None
        kinds = set(self.config.layer_attention)
        self.supports_trees = kinds <= {"gqa", "mla", "gla"}
        self.supports_batch = self.supports_trees
        if compile:
            self.compile_stats.failed = "leanlm targets decode eager (their cache is Python-side state)"

    def start(self, batch: int, capacity: int) -> None:
        self.cache = self._cache_cls(self.config.num_hidden_layers)

    def _run(self, ids, pos, mask, keep: torch.Tensor | None = None):
        t0 = time.perf_counter()
        out = self.model.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=self.cache,
                               use_cache=True, output_hidden_states=self.feature_layers is not None)
        h = out.last_hidden_state  # [B, T, C]
        picked = h if keep is None else h[torch.arange(h.shape[0], device=h.device), keep]
        logits = self.model.lm_head(picked).float()
        self.forward_seconds += time.perf_counter() - t0
        return logits, h if self.feature_layers is None else self.features(out.hidden_states)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = ids.shape
        pos = torch.arange(t, device=self.device)[None].expand(b, t)
        mask = None
        if b > 1 or int(lengths[0]) != t:
            q = torch.arange(t, device=self.device)
            mask = ((q[None, :] <= q[:, None])[None] & (q[None, None, :] < lengths[:, None, None]))[:, None]
        return self._run(ids, pos, mask, keep=lengths - 1)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, tree: torch.Tensor | None, lengths: torch.Tensor,
             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = ids.shape
        self.cache.crop(start)
        if tree is None and b == 1 and int(lengths[0]) == start:
            return self._run(ids, pos, None)  # causal: every attention kind, sliding-window and sparse included
        if not self.supports_trees:
            raise ValueError("this leanlm model has sliding-window or sparse (NSA/ASA) layers: it verifies chains "
                             "of one sequence only (use --spec chain, batch size 1)")
        if tree is None:
            tree = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()[None].expand(b, n, n)
        visible = torch.arange(start, device=self.device)[None, None, :] < lengths[:, None, None]  # [B, 1, start]
        mask = torch.cat([visible.expand(b, n, start), tree], dim=2)[:, None]  # [B, 1, N, start + N]
        return self._run(ids, pos, mask)

    @torch.no_grad()
    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        self.cache.move(dst, index)

    def crop(self, length: int) -> None:
        self.cache.crop(length)
