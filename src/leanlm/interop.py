"""Interoperability with transformers' Llama: a leanlm GQA model and a `LlamaForCausalLM` with the same shapes share
parameter names and maths, so weights move between them with a plain `load_state_dict`."""

from __future__ import annotations

from leanlm.config import LeanLMConfig
from leanlm.errors import ConfigError
from leanlm.model import LeanLMForCausalLM


def to_llama_config(config: LeanLMConfig):
    """The `transformers.LlamaConfig` of the same architecture (GQA layers only)."""
    from transformers import LlamaConfig

    if any(kind != "gqa" for kind in config.layer_attention):
        raise ConfigError("attention", "only all-GQA models have a Llama equivalent", "use attention: gqa")
    c = config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                      max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                      rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                      attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, bos_token_id=c.bos_token_id,
                      eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    cfg._attn_implementation = "sdpa"
    return cfg


def to_llama(model: LeanLMForCausalLM):
    """A `LlamaForCausalLM` holding a copy of `model`'s weights."""
    from transformers import LlamaForCausalLM

    twin = LlamaForCausalLM(to_llama_config(model.config))
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(model.device)
