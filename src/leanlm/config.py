"""Model configuration: Hugging Face Llama field names plus a per-layer attention choice.

`LeanLMConfig` is a `transformers.PreTrainedConfig`, so `save_pretrained`, `from_pretrained`, `AutoConfig`, peft
and lm-eval read it as they read any Llama config. The only new field is `attention`: either one attention kind
for every layer (`"gqa"`) or an explicit list with one kind per layer. Kinds are looked up in
`leanlm.attention.ATTENTION_REGISTRY`; new kinds (MLA, GLA, NSA, ASA) register themselves there.

Every value is checked when the config is built; a bad value raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from leanlm.errors import ConfigError


class LeanLMConfig(PreTrainedConfig):
    r"""Configuration of a leanlm decoder-only language model.

    Field names follow `transformers.LlamaConfig`. Extra fields:

    attention (`str` or `list[str]`, defaults to `"gqa"`):
        Attention kind of every layer, or a list with one kind per layer (length `num_hidden_layers`).
    """

    model_type = "leanlm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    attention: str | list[str] = "gqa"

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None and self.hidden_size:
            # SwiGLU sizing of Llama: 8/3 of the hidden size, rounded up to a multiple of 64.
            self.intermediate_size = 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        super().__post_init__(**kwargs)
        self.check()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def layer_attention(self) -> list[str]:
        """The attention kind of each layer, resolved to a list of length `num_hidden_layers`."""
        if isinstance(self.attention, str):
            return [self.attention] * self.num_hidden_layers
        return list(self.attention)

    def check(self) -> None:
        """Validate every field; raise `ConfigError` naming the first bad field and its fix."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}", f"set {name} to an integer > 0")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                "num_key_value_heads",
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}",
                "choose num_key_value_heads as a divisor of num_attention_heads",
            )
        if self.head_dim % 2 != 0:
            raise ConfigError("head_dim", f"RoPE rotates channel pairs, so head_dim must be even, got {self.head_dim}",
                              "choose an even head_dim (or a hidden_size / num_attention_heads that is even)")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError("rope_theta", f"must be > 0, got {self.rope_theta!r}", "use e.g. 10000.0")
        if not self.rms_norm_eps or self.rms_norm_eps <= 0:
            raise ConfigError("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps!r}", "use e.g. 1e-5")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ConfigError("attention_dropout", f"must be in [0, 1), got {self.attention_dropout!r}", "use 0.0")
        if self.hidden_act != "silu":
            raise ConfigError("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}",
                              "set hidden_act: silu")
        from leanlm.attention import ATTENTION_REGISTRY  # local import: attention modules import this file

        kinds = self.layer_attention
        if not isinstance(self.attention, str) and len(kinds) != self.num_hidden_layers:
            raise ConfigError("attention", f"lists {len(kinds)} layer kinds for num_hidden_layers="
                              f"{self.num_hidden_layers}", "give one kind per layer, or a single kind for all layers")
        for i, kind in enumerate(kinds):
            if kind not in ATTENTION_REGISTRY:
                where = "" if isinstance(self.attention, str) else f" (layer {i})"
                raise ConfigError("attention", f"unknown attention kind {kind!r}{where}",
                                  f"use one of {sorted(ATTENTION_REGISTRY)}")
            ATTENTION_REGISTRY[kind].check_config(self, i)
