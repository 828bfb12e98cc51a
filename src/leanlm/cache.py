"""The KV-cache interface shared by every attention kind.

A `LeanCache` holds one state object per layer. Each attention kind decides what its state is (full keys and values
for GQA; compressed latents for MLA/GLA; ring buffers and compressed blocks for NSA/ASA) and creates it lazily on
its first call, so layers of different kinds mix freely in one model. Every state implements `LayerState`:
its length, how to drop trailing tokens (speculative decoding rolls back rejected drafts), how to keep a subset of
the batch rows, and how many bytes it holds (for cache accounting).

`LeanCache` is deliberately not a `transformers.Cache`: that class assumes one key and one value tensor per layer,
which latent and sparse attention do not have. `generate()` only needs `get_seq_length()` from it.
"""

from __future__ import annotations

from typing import Callable, Protocol, TypeVar

import torch


class LayerState(Protocol):
    """What every per-layer cache state provides."""

    def seq_length(self) -> int: ...

    def crop(self, length: int) -> None:
        """Keep only the first `length` tokens."""

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) the batch rows given by `index` [B']."""

    def nbytes(self) -> int: ...


S = TypeVar("S", bound=LayerState)


def move_slots(t: torch.Tensor, dst: torch.Tensor, index: torch.Tensor) -> None:
    """In place on t [B, H, S, D]: for each row b, t[b, :, dst[b] + j] = old t[b, :, index[b, j]] (j < R). The
    sources are read before anything is written, so source and destination ranges may overlap."""
    b, h, _, d = t.shape
    r = index.shape[1]
    src = torch.gather(t, 2, index.to(t.device)[:, None, :, None].expand(b, h, r, d))  # [B, H, R, D]
    to = dst.to(t.device)[:, None] + torch.arange(r, device=t.device)  # [B, R]
    t.scatter_(2, to[:, None, :, None].expand(b, h, r, d), src)


class GrowingBuffer:
    """A [B, H, T, D] tensor that grows along T with amortised O(1) appends (capacity doubling)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append `x` [B, H, t, D]; return a view of everything stored so far [B, H, T, D]."""
        t = x.shape[2]
        if self.data is None:
            cap = max(16, t)
            self.data = x.new_empty(x.shape[0], x.shape[1], cap, x.shape[3])
        elif self.length + t > self.data.shape[2]:
            cap = max(2 * self.data.shape[2], self.length + t)
            grown = self.data.new_empty(self.data.shape[0], self.data.shape[1], cap, self.data.shape[3])
            grown[:, :, : self.length] = self.data[:, :, : self.length]
            self.data = grown
        self.data[:, :, self.length : self.length + t] = x
        self.length += t
        return self.data[:, :, : self.length]

    def view(self) -> torch.Tensor | None:
        return None if self.data is None else self.data[:, :, : self.length]

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep tokens [0, start) followed by tokens start + index (tree verification keeps the accepted path)."""
        if self.data is not None:
            picked = self.data[:, :, start + index.to(self.data.device)]
            self.data[:, :, start : start + len(index)] = picked
        self.length = start + len(index)

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        """Per batch row b, slots [dst[b], dst[b] + R) := the old slots index[b] (dst [B], index [B, R]), in place;
        the length is left alone (the caller crops). Speculative decoding moves each row's accepted path this way."""
        if self.data is not None:
            move_slots(self.data, dst, index)

    def select(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))

    def nbytes(self) -> int:
        if self.data is None:
            return 0
        d = self.data
        return d.shape[0] * d.shape[1] * self.length * d.shape[3] * d.element_size()


class WindowBuffer:
    """The last tokens of a [B, H, T, D] sequence: a sliding-window cache.

    A query at position p of a window of `window` tokens reads positions (p - window, p], so the next token needs
    the last `window - 1` tokens. The buffer keeps exactly `window - 1 + margin` of them (or all, while fewer were
    seen); the `margin` extra tokens let speculative decoding roll back (`crop`) that many tokens.
    `start` is the absolute position of the first kept token.
    """

    def __init__(self, window: int, margin: int) -> None:
        self.window, self.keep = window, window - 1 + margin
        self.data: torch.Tensor | None = None
        self.start = 0
        self.length = 0

    def append(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Append `x` [B, H, t, D]; return every kept token plus the new ones [B, H, S, D] and the absolute position
        of the first of them (the new queries may need tokens that are dropped from the buffer right after)."""
        full = x if self.data is None else torch.cat([self.data, x], dim=2)
        first = self.start
        self.length += x.shape[2]
        drop = max(0, full.shape[2] - self.keep)
        self.data = full[:, :, drop:].clone() if drop else full
        self.start += drop
        return full, first

    def crop(self, length: int) -> None:
        if length >= self.length:
            return
        if self.start > max(0, length - (self.window - 1)):
            raise ValueError(f"cannot roll a sliding-window cache back to {length} tokens: only the last "
                             f"{self.keep} of {self.length} are kept; raise window_cache_margin")
        if self.data is not None:
            self.data = self.data[:, :, : length - self.start]
        self.length = length

    def select(self, index: torch.Tensor) -> None:
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))

    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class LeanCache:
    """Per-layer decoding state for a leanlm model; created by the model on the first forward with `use_cache`."""

    def __init__(self, num_layers: int) -> None:
        self.layers: list[LayerState | None] = [None] * num_layers
        self._is_user_defined = False

    def state(self, layer_idx: int, factory: Callable[[], S]) -> S:
        """The state of layer `layer_idx`, created with `factory()` on first use."""
        st = self.layers[layer_idx]
        if st is None:
            st = factory()
            self.layers[layer_idx] = st
        return st  # type: ignore[return-value]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        st = self.layers[layer_idx]
        return 0 if st is None else st.seq_length()

    def crop(self, length: int) -> None:
        """Drop every token at position >= `length` (used to roll back rejected speculative tokens)."""
        for st in self.layers:
            if st is not None:
                st.crop(length)

    def _full_attention_states(self, what: str):
        """The layer states, each of which must support `what` (a method only full-attention states have)."""
        for st in self.layers:
            if st is None:
                continue
            if not hasattr(st, what):
                raise NotImplementedError(f"{type(st).__name__} cannot {what} tokens (sliding-window and "
                                          "block-sparse caches are position-structured); use chain drafting")
            yield st

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep positions [0, start) and then positions start + index [n] (ascending), dropping the rest: one
        sequence's accepted path written in place and the cache cropped after it (the engine uses the batched
        `move` and crops per row; this is the single-sequence form). Only full-attention states (GQA, MLA, GLA)
        support it."""
        for st in self._full_attention_states("keep"):
            st.keep(start, index)

    def select(self, index: torch.Tensor) -> None:
        for st in self.layers:
            if st is not None:
                st.select(index)

    def move(self, dst: torch.Tensor, index: torch.Tensor) -> None:
        """Per batch row b, cached slots [dst[b], dst[b] + R) := old slots index[b] (dst [B], index [B, R]), in
        place (the accepted paths of a tree step). Full-attention states only, like `keep`."""
        for st in self._full_attention_states("move"):
            st.move(dst, index)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam-search hook used by `generate()`."""
        self.select(beam_idx)

    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(st.nbytes() for st in self.layers if st is not None)

    def __len__(self) -> int:
        return len(self.layers)
