"""The leanlm decoder-only language model (Llama family: RMSNorm, RoPE, SwiGLU, tied or untied embeddings).

Attention is chosen per layer by `config.attention` (see `leanlm.attention`). The model is a
`transformers.PreTrainedModel` with `GenerationMixin`, registered with `AutoConfig` / `AutoModelForCausalLM`, so
`save_pretrained`, `from_pretrained` (safetensors) and `generate()` work as for any HF causal LM. It keeps its own
KV cache (`leanlm.cache.LeanCache`), which every attention kind fills with its own per-layer state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from leanlm.attention import ATTENTION_CLASSES
from leanlm.cache import LeanCache
from leanlm.config import LeanLMConfig
from leanlm.rope import Positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, config: LeanLMConfig):
        super().__init__()
        c, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LeanLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTION_CLASSES[config.layer_attention[layer_idx]](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, positions: Positions, cache: LeanCache | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LeanLMPreTrainedModel(PreTrainedModel):
    config_class = LeanLMConfig
    config: LeanLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a DynamicCache: the model creates its own LeanCache on the first forward.
        return False


class LeanLMModel(LeanLMPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns hidden states."""

    def __init__(self, config: LeanLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S] with S = past + T, 1 = real token
        position_ids: torch.LongTensor | None = None,  # [B, T]
        past_key_values: LeanCache | None = None,
        inputs_embeds: torch.Tensor | None = None,  # [B, T, C]
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        b, t = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and not self.training:
            past_key_values = LeanCache(self.config.num_hidden_layers)
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() == 4 and position_ids is None:
            raise ValueError("a 4-D (tree) attention mask needs explicit position_ids")
        if position_ids is None:
            if attention_mask is not None:
                # Left padding: a token's position is the number of real tokens before it.
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=x.device).expand(b, t)
        positions = Positions(position_ids)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, positions, None, attention_mask)
            else:
                x = layer(x, positions, cache, attention_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states[-1] = x
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class LeanLMForCausalLM(LeanLMPreTrainedModel, GenerationMixin):
    """Causal LM head on `LeanLMModel`. With `labels` [B, T] the loss is next-token cross-entropy, -100 ignored."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LeanLMConfig):
        super().__init__(config)
        self.model = LeanLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: LeanCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states)
        h = out.last_hidden_state  # [B, T, C]
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)


AutoConfig.register("leanlm", LeanLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LeanLMConfig, LeanLMForCausalLM, exist_ok=True)
