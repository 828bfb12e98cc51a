"""EAGLE-3 draft head (Li et al. 2025, arXiv 2503.01840), stored in the `speculators` format that vLLM serves.

How it differs from EAGLE-1 (`leanlm.speculative.draft.EagleDraftHead`):

- It reads the target's hidden states of several layers, `feature_layers` (indices into Hugging Face's
  `hidden_states` tuple: k is the output of decoder layer k-1, i.e. the input of layer k; the same numbers as
  speculators' `eagle_aux_hidden_state_layer_ids` and vLLM's auxiliary hidden-state layers; EAGLE-3's default is
  low/middle/high: [2, L // 2, L - 3]). They are concatenated [.., kC] and fused by `fc` (no bias) into the head's
  hidden state [.., C] (`from_target`).
- Its one decoder layer attends over [norm(embedding of the token); norm(hidden)] (q/k/v read 2C), with the hidden
  state as the residual (`norm_before_residual`: the normed one).
- A drafted node feeds the head's own output (the layer's output, before the final norm) to its children, not a
  target feature: the head is trained for that by the training-time test (`train_draft.eagle3_loss`).
- Its output goes through its own final norm and its own LM head over the draft vocabulary (rows of the target's LM
  head, copied by `init_from_target` and frozen in training, as speculators does).
- The draft vocabulary is stored as EAGLE-3 / speculators store it: `d2t` [N] offsets (target id = draft index +
  d2t[index]) and `t2d` [V] bool (which target ids are drafted).

On disk the head is a speculators folder: `config.json` (`speculators_model_type: "eagle3"`, the decoder layer's
config as a Llama config, `draft_vocab_size`, `eagle_aux_hidden_state_layer_ids`, `speculators_config` with the
verifier) and `model.safetensors` with speculators' parameter names, written atomically (plus leanlm's
`manifest.json` of checksums, which other readers ignore). `load` also reads folders that speculators' own
`save_pretrained` wrote (it skips their copy of the embedding). What leanlm does not support of the format it refuses
with one line: several decoder layers, `norm_before_fc`, `fc_norm`, `norm_output`, sliding-window layers, or a
`target_hidden_size` other than the layer's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from leanlm.attention.gqa import GroupedQueryAttention
from leanlm.cache import LeanCache
from leanlm.checkpoint import (check_finite_tensors, load_state_into, load_tensors, read_json_object, verify_manifest,
                               write_folder_atomically)
from leanlm.config import LeanLMConfig
from leanlm.errors import CheckpointError, LeanLMError
from leanlm.model import RMSNorm, SwiGLU
from leanlm.speculative.draft import lm_head_rows
from leanlm.rope import Positions

SPECULATORS_VERSION = "0.9.0"  # the speculators release whose schema the files follow (tested against it)
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's (and speculators') default: a low, a middle and a high layer, [2, L // 2, L - 3]."""
    layers = (2, num_layers // 2, num_layers - 3)
    if len(set(layers)) != 3 or min(layers) < 0:
        raise LeanLMError(f"a target with {num_layers} layers has no default EAGLE-3 layers {layers}. Fix: pass "
                          "--feature-layers, distinct ids in [0, num_hidden_layers)")
    return layers


def check_feature_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Feature layer ids as a tuple, or one error naming the fix: distinct, in [0, num_layers) (id num_layers would be
    the final hidden state, which Hugging Face returns after the final norm and vLLM before it)."""
    ids = tuple(int(k) for k in layers)
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= num_layers:
        raise LeanLMError(f"feature layers {list(ids)} must be distinct ids in [0, {num_layers}) for a target with "
                          f"{num_layers} layers. Fix: e.g. {list(default_feature_layers(num_layers))}"
                          if num_layers >= 6 else
                          f"feature layers {list(ids)} must be distinct ids in [0, {num_layers}). Fix: pass ids in "
                          "that range")
    return ids


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over [norm(embeds); norm(hidden)] (q/k/v read 2C) with `hidden` as the
    residual, then the usual SwiGLU block. Parameter names as speculators' `LlamaDecoderEagle3FirstLayer`."""

    def __init__(self, config: LeanLMConfig, norm_before_residual: bool = False):
        super().__init__()
        c, eps = config.hidden_size, config.rms_norm_eps
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = RMSNorm(c, eps)
        self.hidden_norm = RMSNorm(c, eps)
        self.self_attn = GroupedQueryAttention(config, 0)
        attn, bias = self.self_attn, config.attention_bias
        attn.q_proj = nn.Linear(2 * c, attn.num_heads * attn.head_dim, bias=bias)
        attn.k_proj = nn.Linear(2 * c, attn.num_kv_heads * attn.head_dim, bias=bias)
        attn.v_proj = nn.Linear(2 * c, attn.num_kv_heads * attn.head_dim, bias=bias)
        self.post_attention_layernorm = RMSNorm(c, eps)
        self.mlp = SwiGLU(config)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """embeds, hidden [B, T, C] -> [B, T, C]."""
        residual = hidden
        hidden = self.hidden_norm(hidden)
        if self.norm_before_residual:
            residual = hidden
        x = torch.cat([self.input_layernorm(embeds), hidden], dim=-1)  # [B, T, 2C]
        x = residual + self.self_attn(x, positions, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Eagle3DraftHead(nn.Module):
    """The EAGLE-3 head (see the module docstring). Offers what `DraftSession` and training use of any head:
    `from_target` (target features -> the head's input state), `forward`, `draft_head_rows` / `draft_logits`,
    `draft_ids`, `draft_vocab` and `feature_layers` (which target layers the engine must return)."""

    arch = "eagle3"

    def __init__(self, config: LeanLMConfig, feature_layers: Sequence[int], draft_vocab: torch.Tensor | None = None,
                 norm_before_residual: bool = False):
        super().__init__()
        self.config = config
        self.feature_layers = tuple(int(k) for k in feature_layers)
        if not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers) \
                or min(self.feature_layers) < 0:
            raise LeanLMError(f"feature layers {list(self.feature_layers)} must be distinct non-negative layer ids. "
                              "Fix: e.g. [2, L // 2, L - 3] for a target of L layers")
        c, v = config.hidden_size, config.vocab_size
        self.fc = nn.Linear(len(self.feature_layers) * c, c, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(config, norm_before_residual)])
        self.norm = RMSNorm(c, config.rms_norm_eps)
        self.draft_vocab: torch.Tensor | None
        if draft_vocab is None:
            self.draft_vocab = None
            n = v
        else:
            ids = torch.as_tensor(draft_vocab, dtype=torch.long)
            if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= v \
                    or len(torch.unique(ids)) != len(ids):
                raise LeanLMError(f"draft_vocab must be distinct target ids in [0, {v}), got {len(ids)} ids. Fix: "
                                  "build it with select_draft_vocab")
            n = len(ids)  # draft index i <-> target id ids[i] (sorted when built by select_draft_vocab)
            self.register_buffer("d2t", ids - torch.arange(n))  # [N] target id - draft index (EAGLE-3's offsets)
            t2d = torch.zeros(v, dtype=torch.bool)
            t2d[ids] = True
            self.register_buffer("t2d", t2d)  # [V] drafted target ids
            self.register_buffer("draft_vocab", ids, persistent=False)  # [N] target ids
            index = torch.full((v,), -100, dtype=torch.long)
            index[ids] = torch.arange(n)
            self.register_buffer("target_to_draft", index, persistent=False)  # [V] draft index or -100
        self.lm_head = nn.Linear(c, n, bias=False)

    @property
    def norm_before_residual(self) -> bool:
        return self.layers[0].norm_before_residual

    @torch.no_grad()
    def init_from_target(self, lm_head: nn.Module) -> "Eagle3DraftHead":
        """Copy the target's LM-head rows of the draft vocabulary into the head's own LM head (its starting point;
        training keeps it frozen, as speculators does)."""
        self.lm_head.weight.copy_(lm_head_rows(lm_head, self.draft_vocab)[0])
        return self

    def from_target(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features of `feature_layers`, concatenated [..., kC] -> the head's input state [..., C]."""
        return self.fc(features)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor,
                cache: LeanCache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, C] (`from_target` of the previous token's target features, or the head's own output for
        it), embeds [B, T, C] (this token) -> the head's output [B, T, C], which `draft_logits` scores and which a
        child node reads as its `hidden`."""
        return self.layers[0](embeds, hidden, Positions(position_ids), cache, attention_mask)

    def draft_head_rows(self, lm_head: nn.Module | None = None) -> tuple[torch.Tensor, None]:
        """The head's own LM head [N, C] (the target's is not used: it was copied at `init_from_target`)."""
        return self.lm_head.weight, None

    def draft_logits(self, lm_head: nn.Module | None, feats: torch.Tensor,
                     rows: tuple[torch.Tensor, None] | None = None) -> torch.Tensor:
        """Logits [..., N] over the draft vocabulary from the head's outputs [..., C] (final norm, own LM head)."""
        w = rows[0] if rows is not None else self.lm_head.weight
        return nn.functional.linear(self.norm(feats).to(w.dtype), w)

    def draft_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Target ids -> indices into the draft vocabulary (-100 for ids outside it); identity without one."""
        return tokens if self.draft_vocab is None else self.target_to_draft[tokens]

    # -- the speculators folder ------------------------------------------------------------------------------------
    def speculators_config(self, verifier: str | None = None, verifier_architectures: Sequence[str] = (),
                           speculative_tokens: int = 3, dtype: torch.dtype | None = None) -> dict:
        """The `config.json` of speculators' `Eagle3SpeculatorConfig` (schema of speculators 0.9.0)."""
        c = self.config
        layer = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
                 "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": 1,
                 "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                 "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
                 "max_position_embeddings": c.max_position_embeddings, "attention_bias": c.attention_bias,
                 "mlp_bias": c.mlp_bias, "attention_dropout": 0.0, "tie_word_embeddings": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)}}
        n = c.vocab_size if self.draft_vocab is None else len(self.draft_vocab)
        return {"architectures": ["Eagle3DraftModel"], "speculators_model_type": "eagle3",
                "speculators_version": SPECULATORS_VERSION, "transformer_layer_config": layer,
                "draft_vocab_size": n, "norm_before_residual": self.norm_before_residual,
                "target_hidden_size": None, "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
                "norm_before_fc": False, "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
                "tie_word_embeddings": False,
                "dtype": str(dtype or self.lm_head.weight.dtype).removeprefix("torch."),
                "speculators_config": {
                    "algorithm": "eagle3", "default_proposal_method": "greedy",
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                          "accept_tolerance": 0.0, "verifier_accept_k": 1}],
                    "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)}}}

    def save(self, path: str | Path, verifier: str | None = None, verifier_architectures: Sequence[str] = (),
             meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Write the head as a speculators folder (atomically): `vllm serve TARGET --speculative-config
        '{"model": "PATH", ...}'` reads it. `verifier`: the target's name or path as vLLM should find it;
        `meta`: leanlm's training record, kept under `leanlm` in config.json (speculators ignores it)."""
        cfg = self.speculators_config(verifier, verifier_architectures, dtype=dtype)
        if meta:
            cfg["leanlm"] = meta
        state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).cpu()
                 .contiguous() for k, v in self.state_dict().items()}

        def write(tmp: Path) -> None:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        write_folder_atomically(Path(path), write)

    @classmethod
    def load(cls, path: str | Path, target_config=None) -> tuple["Eagle3DraftHead", dict]:
        """Read a speculators EAGLE-3 folder (written by `save` or by speculators / its converters); returns the head
        and the config.json object. Anything this head cannot run is one CheckpointError naming the field."""
        path = Path(path)
        fix = "pass a speculators EAGLE-3 folder (config.json with speculators_model_type 'eagle3' + model.safetensors)"
        if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} is not a speculators draft folder (needs config.json and "
                                  f"model.safetensors). Fix: {fix}")
        verify_manifest(path)
        cfg = read_json_object(path / "config.json", "speculators config", fix,
                               required=("speculators_model_type", "transformer_layer_config"))
        where = f"speculators config {path / 'config.json'}"
        if cfg["speculators_model_type"] != "eagle3":
            raise CheckpointError(f"{where}: speculators_model_type is {cfg['speculators_model_type']!r}; leanlm "
                                  f"runs 'eagle3' heads. Fix: {fix}")
        layer = cfg["transformer_layer_config"]
        if not isinstance(layer, dict):
            raise CheckpointError(f"{where}: transformer_layer_config is not an object. Fix: {fix}")
        if int(layer.get("num_hidden_layers", 1)) != 1:
            raise CheckpointError(f"{where}: transformer_layer_config.num_hidden_layers is "
                                  f"{layer['num_hidden_layers']}; leanlm runs one-layer EAGLE-3 heads. Fix: {fix}")
        for flag in UNSUPPORTED_FLAGS:
            if cfg.get(flag):
                raise CheckpointError(f"{where}: {flag} is true, which leanlm's EAGLE-3 head does not implement. "
                                      f"Fix: {fix} with {flag} false")
        if layer.get("sliding_window") and "sliding_attention" in (layer.get("layer_types") or []):
            raise CheckpointError(f"{where}: the layer uses sliding-window attention, which leanlm's EAGLE-3 head "
                                  f"does not implement. Fix: {fix}")
        hidden = int(layer.get("hidden_size", 0))
        if cfg.get("target_hidden_size") not in (None, hidden):
            raise CheckpointError(f"{where}: target_hidden_size {cfg['target_hidden_size']} differs from the layer's "
                                  f"hidden_size {hidden}; leanlm needs them equal. Fix: {fix}")
        rope = layer.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or layer.get("rope_scaling"):
            raise CheckpointError(f"{where}: rope type {rope.get('rope_type') or layer.get('rope_scaling')} is not "
                                  f"supported (leanlm's EAGLE-3 head uses plain RoPE). Fix: {fix}")
        heads = int(layer.get("num_attention_heads", 0))
        try:
            config = LeanLMConfig(
                vocab_size=int(layer["vocab_size"]), hidden_size=hidden, num_hidden_layers=1,
                num_attention_heads=heads, num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
                head_dim=int(layer.get("head_dim") or hidden // max(heads, 1)),
                intermediate_size=int(layer["intermediate_size"]), rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", layer.get("rope_theta", 10000.0))),
                max_position_embeddings=int(layer.get("max_position_embeddings", 2048)),
                attention_bias=bool(layer.get("attention_bias", False)), mlp_bias=bool(layer.get("mlp_bias", False)),
                attention="gqa")
        except (KeyError, TypeError, ValueError, LeanLMError) as exc:
            raise CheckpointError(f"{where}: transformer_layer_config is invalid ({type(exc).__name__}: {exc}). "
                                  f"Fix: {fix}") from None
        if target_config is not None and (config.hidden_size, config.vocab_size) != (
                target_config.hidden_size, target_config.vocab_size):
            raise CheckpointError(f"draft head {path} was made for hidden size {config.hidden_size} / vocab "
                                  f"{config.vocab_size}, the target has {target_config.hidden_size} / "
                                  f"{target_config.vocab_size}. Fix: pass the head trained for this target")
        layers = cfg.get("eagle_aux_hidden_state_layer_ids")
        if layers is None:
            if target_config is None:
                raise CheckpointError(f"{where}: eagle_aux_hidden_state_layer_ids is not set and no target is given "
                                      f"to take the default from. Fix: set it in config.json")
            layers = default_feature_layers(target_config.num_hidden_layers)
        if target_config is not None:
            try:
                check_feature_layers(layers, target_config.num_hidden_layers)
            except LeanLMError as exc:
                raise CheckpointError(f"{where}: eagle_aux_hidden_state_layer_ids: {exc}") from None
        tensors = load_tensors(path / "model.safetensors", "draft head weights", fix)
        tensors.pop("embed_tokens.weight", None)  # speculators may store the target's embedding; leanlm reads the target's
        for name in ("verifier_lm_head.weight", "verifier_norm.weight"):
            tensors.pop(name, None)
        check_finite_tensors(tensors, f"draft head {path}", fix)
        n = int(cfg.get("draft_vocab_size") or config.vocab_size)
        vocab = None
        if n != config.vocab_size:
            if "d2t" not in tensors or "t2d" not in tensors:
                raise CheckpointError(f"draft head {path}: draft_vocab_size {n} < vocab {config.vocab_size} but "
                                      f"model.safetensors lacks d2t/t2d. Fix: {fix}")
            d2t, t2d = tensors["d2t"].long(), tensors["t2d"].bool()
            vocab = d2t + torch.arange(len(d2t))
            if len(d2t) != n or t2d.shape != (config.vocab_size,) or int(t2d.sum()) != n \
                    or bool((vocab < 0).any() | (vocab >= config.vocab_size).any()) or not bool(t2d[vocab].all()):
                raise CheckpointError(f"draft head {path}: d2t ({len(d2t)} ids) and t2d ({int(t2d.sum())} set) do not "
                                      f"describe one draft vocabulary of {n} ids. Fix: {fix}")
            tensors["d2t"], tensors["t2d"] = d2t, t2d
        else:
            tensors.pop("d2t", None)
            tensors.pop("t2d", None)
        try:
            head = cls(config, layers, vocab, norm_before_residual=bool(cfg.get("norm_before_residual", False)))
        except LeanLMError as exc:
            raise CheckpointError(f"draft head {path}: {exc}. Fix: {fix}") from None
        load_state_into(head, tensors, f"draft head {path}", fix)
        return head, cfg


def is_speculators_folder(path: str | Path) -> bool:
    """Whether `path` holds a speculators config (config.json with `speculators_model_type`)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "speculators_model_type" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
