"""EAGLE-style feature-level draft head (Li et al. 2024, arXiv 2401.15077) and the drafter built on it.

The head reads, at each position, the target's feature (last hidden state) of the previous position and the
embedding of the current token, fuses them with one linear map, runs one decoder layer (leanlm's Llama block: GQA
with RoPE, SwiGLU), and predicts the next feature; the target's own LM head turns a feature into next-token
log-probabilities. The target's embedding and LM head are reused, not copied, so the head itself is small
(~4M parameters for SmolLM2-135M).

Position convention: pair j = (feature of token j-1, token j) sits at position j and predicts token j+1.

Saved as a folder: `draft_config.json` (the head's LeanLMConfig fields plus what it was trained on) and
`model.safetensors` (head weights only), written atomically.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from leanlm.cache import LeanCache
from leanlm.checkpoint import (check_finite_tensors, load_state_into, load_tensors, read_json_object, verify_manifest,
                               write_folder_atomically)
from leanlm.config import LeanLMConfig
from leanlm.errors import CheckpointError, LeanLMError
from leanlm.model import DecoderLayer
from leanlm.rope import Positions


def head_config(target_config, **overrides) -> LeanLMConfig:
    """The draft layer's config: the target's widths and heads, one GQA layer."""
    c = target_config
    fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=1,
                  num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                  head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                  intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get(
                      "rope_theta", 10000.0),
                  max_position_embeddings=c.max_position_embeddings, attention="gqa")
    fields.update(overrides)
    return LeanLMConfig(**fields)


def lm_head_rows(lm_head: nn.Module, vocab: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An LM head's weight [N, C] (and bias) restricted to the target ids `vocab` [N] (all V rows for None)."""
    w, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if vocab is None:
        return w, bias
    ids = vocab.to(w.device)
    return w[ids].contiguous(), None if bias is None else bias[ids]


class EagleDraftHead(nn.Module):
    """The head: fc over [embedding ; feature], one decoder layer. `draft_vocab` (target token ids [N], optional) is
    the reduced draft vocabulary of FR-Spec / EAGLE-3: drafting scores only those rows of the target's LM head
    (N = 8k of SmolLM2's 49k ids costs ~1/6 of the full head) and maps the drafted ids back to target ids, so
    verification, and with it losslessness, is unchanged. None drafts over the whole vocabulary."""

    arch = "eagle1"
    feature_layers = None  # the target's last hidden state (after its final norm), what its LM head reads

    def __init__(self, config: LeanLMConfig, draft_vocab: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.fc = nn.Linear(2 * c, c)
        self.layer = DecoderLayer(config, 0)
        self.draft_vocab: torch.Tensor | None
        if draft_vocab is None:
            self.draft_vocab = None
        else:
            ids = torch.as_tensor(draft_vocab, dtype=torch.long)
            if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size \
                    or len(torch.unique(ids)) != len(ids):
                raise LeanLMError(f"draft_vocab must be distinct target ids in [0, {config.vocab_size}), got "
                                  f"{len(ids)} ids. Fix: build it with select_draft_vocab")
            self.register_buffer("draft_vocab", ids)  # [N] target ids, saved with the weights
            t2d = torch.full((config.vocab_size,), -100, dtype=torch.long)
            t2d[ids] = torch.arange(len(ids))
            self.register_buffer("target_to_draft", t2d, persistent=False)  # [V] draft index or -100

    def draft_head_rows(self, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight [N, C] (and bias) restricted to the draft vocabulary: gathered once per session or
        training run (gathering 8k x 576 floats per call would cost more than the matmul saves)."""
        return lm_head_rows(lm_head, self.draft_vocab)

    def draft_logits(self, lm_head: nn.Module, feats: torch.Tensor,
                     rows: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits [..., N] over the draft vocabulary (all V ids without one) from predicted features [..., C];
        `rows`: `draft_head_rows(lm_head)`, computed once by the caller."""
        w, bias = rows if rows is not None else self.draft_head_rows(lm_head)
        return nn.functional.linear(feats.to(w.dtype), w, bias)

    def draft_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target ids -> indices into the draft vocabulary (-100 for ids outside it); identity without one."""
        return tokens if self.draft_vocab is None else self.target_to_draft[tokens]

    def from_target(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features as the head reads them: unchanged (EAGLE-1 reads the target's last hidden state and
        its own predicted features alike; EAGLE-3 fuses several layers first, see `eagle3.Eagle3DraftHead`)."""
        return features

    def forward(self, features: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor,
                cache: LeanCache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features, embeds [B, T, C] (feature of the previous token, embedding of this token); returns the
        predicted features [B, T, C] of this token."""
        x = self.fc(torch.cat([embeds, features], dim=-1))
        return self.layer(x, Positions(position_ids), cache, attention_mask)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Write the head (atomically). `dtype` (e.g. torch.float16) stores the weights smaller; `load` casts them
        back into a float32 module."""

        state = {k: v.detach().to(dtype or v.dtype if v.is_floating_point() else v.dtype).cpu().contiguous()
                 for k, v in self.state_dict().items()}

        vocab = None if self.draft_vocab is None else len(self.draft_vocab)

        def write(tmp: Path) -> None:
            (tmp / "draft_config.json").write_text(json.dumps({"config": self.config.to_dict(), **(meta or {}),
                                                               "draft_vocab_size": vocab}, indent=1, default=str))
            save_file(state, str(tmp / "model.safetensors"))

        write_folder_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path, target_config=None) -> tuple["EagleDraftHead", dict]:
        """Read a head written by `save`; a missing, damaged (checksum), garbage or mismatched folder is one
        CheckpointError."""

        path = Path(path)
        if not (path / "draft_config.json").exists() or not (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} is not a draft head (needs draft_config.json and model.safetensors). "
                                  f"Fix: train one with `leanlm spec train-draft` or pass --spec none")
        fix = "retrain it with `leanlm spec train-draft`, or restore the folder"
        verify_manifest(path)
        meta = read_json_object(path / "draft_config.json", "draft head config", fix, required=("config",))
        if not isinstance(meta["config"], dict):
            raise CheckpointError(f"draft head config {path / 'draft_config.json'}: 'config' is not an object. "
                                  f"Fix: {fix}")
        fields = {k: v for k, v in meta["config"].items() if k in LeanLMConfig.__annotations__}
        try:
            config = LeanLMConfig(**fields)
        except LeanLMError as exc:
            raise CheckpointError(f"draft head config {path / 'draft_config.json'} is invalid ({exc})") from None
        if target_config is not None and (config.hidden_size, config.vocab_size) != (
                target_config.hidden_size, target_config.vocab_size):
            raise CheckpointError(f"draft head {path} was made for hidden size {config.hidden_size} / vocab "
                                  f"{config.vocab_size}, the target has {target_config.hidden_size} / "
                                  f"{target_config.vocab_size}. Fix: pass the head trained for this target")
        tensors = load_tensors(path / "model.safetensors", "draft head weights", fix)
        check_finite_tensors(tensors, f"draft head {path}", fix)
        reduced = meta.get("draft_vocab_size") is not None
        if reduced != ("draft_vocab" in tensors):
            raise CheckpointError(f"draft head {path}: draft_config.json and model.safetensors disagree on the draft "
                                  f"vocabulary. Fix: {fix}")
        try:
            head = cls(config, tensors["draft_vocab"] if reduced else None)
        except LeanLMError as exc:
            raise CheckpointError(f"draft head {path}: {exc}. Fix: {fix}") from None
        load_state_into(head, tensors, f"draft head {path}", fix)
        return head, meta


class DraftSession:
    """The `Drafter` of one generation: the head, its own KV cache and the nodes of the tree being drafted.

    `prefill` adds (feature, token) pairs of accepted positions to the head's cache; `root()` is then the
    distribution after the last one. Tree nodes added with `expand` go into the cache after the prefix, each seeing
    the prefix, its ancestors and itself; `end_tree()` drops them again. Per node the session keeps, in tensors
    indexed by node id, the predicted feature, the position and the cache slots of its ancestors, so `expand` is a
    few gathers and one head forward, with no loop over nodes.
    """

    def __init__(self, head: nn.Module, embed: nn.Module, lm_head: nn.Module):
        self.head, self.embed, self.lm_head = head.eval(), embed, lm_head
        self._rows = head.draft_head_rows(lm_head)  # the LM-head rows drafting scores (all, or the draft vocabulary)
        self.device = next(head.parameters()).device
        self.dtype = next(head.parameters()).dtype
        self.cache = LeanCache(1)
        self.prefix = 0  # cached pairs (positions 1 .. prefix)
        self._root_logp: torch.Tensor | None = None
        self.forward_seconds = 0.0  # time in head + LM-head forwards, for the engine's overhead accounting
        self._slots = 0  # tree slots used after the prefix
        c = head.config.hidden_size
        self._feat = torch.zeros(64, c, device=self.device, dtype=self.dtype)  # [nodes, C] predicted features
        self._pos = torch.zeros(64, dtype=torch.long, device=self.device)  # [nodes] positions
        self._anc = torch.zeros(64, 64, dtype=torch.bool, device=self.device)  # [nodes, slots] ancestors' slots

    def _logp(self, feats: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [..., V] over target ids: over the draft vocabulary when the head has one (-inf
        elsewhere, so strategies see target ids and never propose an id outside it)."""
        logp = torch.log_softmax(self.head.draft_logits(self.lm_head, feats, self._rows).float(), dim=-1)
        if self.head.draft_vocab is None:
            return logp
        full = logp.new_full((*logp.shape[:-1], self.head.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head.draft_vocab, logp)

    def _room(self, nodes: int, slots: int) -> None:
        """Grow the node tables (capacity doubling) to hold `nodes` node ids and `slots` tree slots."""
        cap_n, cap_s = self._feat.shape[0], self._anc.shape[1]
        if nodes > cap_n:
            n = max(nodes, 2 * cap_n)
            self._feat = torch.cat([self._feat, self._feat.new_zeros(n - cap_n, self._feat.shape[1])])
            self._pos = torch.cat([self._pos, self._pos.new_zeros(n - cap_n)])
            self._anc = torch.cat([self._anc, self._anc.new_zeros(n - cap_n, self._anc.shape[1])])
        if slots > cap_s:
            s = max(slots, 2 * cap_s)
            self._anc = torch.cat([self._anc, self._anc.new_zeros(self._anc.shape[0], s - cap_s)], dim=1)

    @torch.no_grad()
    def prefill(self, features: torch.Tensor, tokens) -> None:
        """features [n, C]: target features of positions prefix .. prefix+n-1; tokens [n] (tensor or list): the
        token after each."""
        self.end_tree()
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        n = tokens.shape[0]
        pos = torch.arange(self.prefix + 1, self.prefix + n + 1, device=self.device)[None]
        t0 = time.perf_counter()
        emb = self.embed(tokens[None]).to(self.dtype)
        hidden = self.head.from_target(features[None].to(self.device, self.dtype))  # [1, n, C]
        out = self.head(hidden, emb, pos, self.cache)  # [1, n, C]
        self.prefix += n
        self._root_logp = self._logp(out[0, -1])
        self.forward_seconds += time.perf_counter() - t0
        self._feat[0] = out[0, -1]
        self._pos[0] = self.prefix
        self._anc[0] = False

    def root(self) -> torch.Tensor:
        return self._root_logp

    @torch.no_grad()
    def expand(self, nodes: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        nodes, tokens, parents = (torch.as_tensor(x, dtype=torch.long, device=self.device)
                                  for x in (nodes, tokens, parents))
        n, s = nodes.shape[0], self._slots
        self._room(int(nodes.max()) + 1, s + n)
        feats = self._feat[parents][None]  # [1, n, C] the parents' predicted features
        pos = self._pos[parents] + 1  # [n]
        own = self._anc[parents, : s + n]  # [n, s + n] the parents' ancestors' slots (a copy: advanced indexing)
        own[torch.arange(n, device=self.device), s + torch.arange(n, device=self.device)] = True
        mask = torch.cat([torch.ones(n, self.prefix, dtype=torch.bool, device=self.device), own], dim=1)
        t0 = time.perf_counter()
        emb = self.embed(tokens[None]).to(self.dtype)
        out = self.head(feats, emb, pos[None], self.cache, mask[None, None])[0]  # [n, C]
        logp = self._logp(out)
        self.forward_seconds += time.perf_counter() - t0
        self._feat[nodes] = out
        self._pos[nodes] = pos
        self._anc[nodes, : s + n] = own
        self._slots += n
        return logp

    def end_tree(self) -> None:
        self.cache.crop(self.prefix)
        self._slots = 0


class ModelDrafter:
    """A `Drafter` that runs a whole causal LM over each candidate sequence, without a cache: the target drafting
    for itself (acceptance then limited only by numerics) or any small LM with the target's vocabulary. Slow (one
    full forward per tree layer): the reference drafter of the tests and of benchmarks/gpu_check.py's self-drafting
    runs. `noise` adds Gaussian noise of that scale to the logits (seeded), so that drafts are often, not always,
    right; `first` is the prompt's first token (the engine's prefill hands the drafter the prompt from its second
    token on)."""

    def __init__(self, model, noise: float = 0.0, seed: int = 0, first: int | None = None):
        self.model, self.noise = model, noise
        self.device = next(model.parameters()).device
        self.gen = torch.Generator().manual_seed(seed)
        self.first = first
        self.seq: list[int] = []
        self.paths: dict[int, list[int]] = {}

    def _logp(self, seqs: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(torch.tensor(seqs, device=self.device), use_cache=False).logits[:, -1].float()
        if self.noise:
            logits = logits + self.noise * torch.randn(logits.shape, generator=self.gen).to(logits.device)
        return torch.log_softmax(logits, -1)

    def prefill(self, features, tokens) -> None:
        if not self.seq:
            self.seq = [self.first]
        self.seq += torch.as_tensor(tokens).tolist()
        self.paths = {0: []}

    def root(self) -> torch.Tensor:
        return self._logp([self.seq])[0]

    def expand(self, nodes, tokens, parents) -> torch.Tensor:
        nodes, tokens, parents = (torch.as_tensor(x).tolist() for x in (nodes, tokens, parents))  # a check, not fast
        for n, t, p in zip(nodes, tokens, parents):
            self.paths[n] = self.paths[p] + [t]
        seqs = [self.seq + self.paths[n] for n in nodes]
        if len({len(x) for x in seqs}) == 1:  # one batched forward when the nodes are at one depth
            return self._logp(seqs)
        return torch.cat([self._logp([x]) for x in seqs])

    def end_tree(self) -> None:
        pass
