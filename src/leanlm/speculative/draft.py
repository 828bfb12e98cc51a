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
from pathlib import Path

import torch
from torch import nn

from leanlm.cache import LeanCache
from leanlm.config import LeanLMConfig
from leanlm.errors import CheckpointError
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


class EagleDraftHead(nn.Module):
    def __init__(self, config: LeanLMConfig):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.fc = nn.Linear(2 * c, c)
        self.layer = DecoderLayer(config, 0)

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
        from safetensors.torch import save_file

        from leanlm.checkpoint import write_folder_atomically

        state = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in self.state_dict().items()}

        def write(tmp: Path) -> None:
            (tmp / "draft_config.json").write_text(json.dumps({"config": self.config.to_dict(), **(meta or {})},
                                                              indent=1, default=str))
            save_file(state, str(tmp / "model.safetensors"))

        write_folder_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path, target_config=None) -> tuple["EagleDraftHead", dict]:
        """Read a head written by `save`; a missing, damaged (checksum), garbage or mismatched folder is one
        CheckpointError."""
        from leanlm.checkpoint import (check_finite_tensors, load_state_into, load_tensors, read_json_object,
                                       verify_manifest)
        from leanlm.errors import LeanLMError

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
            head = cls(LeanLMConfig(**fields))
        except LeanLMError as exc:
            raise CheckpointError(f"draft head config {path / 'draft_config.json'} is invalid ({exc})") from None
        if target_config is not None and (head.config.hidden_size, head.config.vocab_size) != (
                target_config.hidden_size, target_config.vocab_size):
            raise CheckpointError(f"draft head {path} was made for hidden size {head.config.hidden_size} / vocab "
                                  f"{head.config.vocab_size}, the target has {target_config.hidden_size} / "
                                  f"{target_config.vocab_size}. Fix: pass the head trained for this target")
        tensors = load_tensors(path / "model.safetensors", "draft head weights", fix)
        check_finite_tensors(tensors, f"draft head {path}", fix)
        load_state_into(head, tensors, f"draft head {path}", fix)
        return head, meta


class DraftSession:
    """The `Drafter` of one generation: the head, its own KV cache and the nodes of the tree being drafted.

    `prefill` adds (feature, token) pairs of accepted positions to the head's cache; `root()` is then the
    distribution after the last one. Tree nodes added with `expand` go into the cache after the prefix, each seeing
    the prefix, its ancestors and itself; `end_tree()` drops them again.
    """

    def __init__(self, head: EagleDraftHead, embed: nn.Module, lm_head: nn.Module):
        self.head, self.embed, self.lm_head = head.eval(), embed, lm_head
        self.device = next(head.parameters()).device
        self.dtype = next(head.parameters()).dtype
        self.cache = LeanCache(1)
        self.prefix = 0  # cached pairs (positions 1 .. prefix)
        self._root_logp: torch.Tensor | None = None
        self._root_feature: torch.Tensor | None = None

    def _logp(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lm_head(feats.to(self.lm_head.weight.dtype)).float(), dim=-1)

    @torch.no_grad()
    def prefill(self, features: torch.Tensor, tokens: list[int]) -> None:
        """features [n, C]: target features of positions prefix .. prefix+n-1; tokens: the n tokens after each."""
        self.end_tree()
        n = len(tokens)
        pos = torch.arange(self.prefix + 1, self.prefix + n + 1, device=self.device)[None]
        emb = self.embed(torch.tensor([tokens], device=self.device)).to(self.dtype)
        out = self.head(features[None].to(self.device, self.dtype), emb, pos, self.cache)  # [1, n, C]
        self.prefix += n
        self._root_feature = out[0, -1]
        self._root_logp = self._logp(out[0, -1])
        self._nodes: dict[int, tuple[torch.Tensor, int, list[int]]] = {0: (self._root_feature, self.prefix, [])}

    def root(self) -> torch.Tensor:
        return self._root_logp

    @torch.no_grad()
    def expand(self, nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        n = len(nodes)
        base = self.cache.get_seq_length()
        feats = torch.stack([self._nodes[p][0] for p in parents])[None]  # [1, n, C]
        pos = torch.tensor([[self._nodes[p][1] + 1 for p in parents]], device=self.device)
        emb = self.embed(torch.tensor([tokens], device=self.device)).to(self.dtype)
        mask = torch.zeros(n, base + n, dtype=torch.bool, device=self.device)
        mask[:, : self.prefix] = True
        slots = []
        for r, p in enumerate(parents):
            own = self._nodes[p][2] + [base + r]
            mask[r, own] = True
            slots.append(own)
        out = self.head(feats, emb, pos, self.cache, mask[None, None])[0]  # [n, C]
        for r, node in enumerate(nodes):
            self._nodes[node] = (out[r], int(pos[0, r]), slots[r])
        return self._logp(out)

    def end_tree(self) -> None:
        self.cache.crop(self.prefix)

    def rollback(self, length: int) -> None:
        """Forget cached pairs beyond position `length`."""
        self.cache.crop(length)
        self.prefix = min(self.prefix, length)


class ModelDrafter:
    """A `Drafter` that runs a whole causal LM over each candidate sequence, without a cache: the target drafting for
    itself (acceptance then limited only by numerics) or any small LM with the target's vocabulary. Slow (one full
    forward per tree layer), for checks and tests. `noise` adds Gaussian noise of that scale to the logits (seeded),
    so that drafts are often, not always, right; `first` is the prompt's first token (the engine's prefill hands the
    drafter the prompt from its second token on)."""

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

    def prefill(self, features, tokens: list[int]) -> None:
        if not self.seq:
            self.seq = [self.first]
        self.seq += tokens
        self.paths = {0: []}

    def root(self) -> torch.Tensor:
        return self._logp([self.seq])[0]

    def expand(self, nodes: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        for n, t, p in zip(nodes, tokens, parents):
            self.paths[n] = self.paths[p] + [t]
        seqs = [self.seq + self.paths[n] for n in nodes]
        if len({len(x) for x in seqs}) == 1:  # one batched forward when the nodes are at one depth
            return self._logp(seqs)
        return torch.cat([self._logp([x]) for x in seqs])

    def end_tree(self) -> None:
        pass
